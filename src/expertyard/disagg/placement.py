"""Which expert ranks hold which routed experts, per MoE layer, with optional replicas of hot experts.

Dispatch needs, for every (layer, expert), the expert ranks holding a copy and the copy's row in that rank's
local weight stack. Both live in device tables so that routing a token never touches the host:
  rank_of[l]  [E, R] int64: placement index (0..N-1) of replica r of expert e (padded by repeating replica 0)
  local_of[l] [E, R] int64: row of that replica in the rank's local stacks
  replicas[l] [E]    int64: number of replicas of expert e
A token picks replica (token index mod replicas), which spreads a hot expert's tokens over its copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertyard.errors import ConfigError

# E = routed experts, N = expert ranks, R = most replicas of one expert


@dataclass
class ExpertPlacement:
    num_experts: int
    num_ranks: int
    holders: dict[int, list[list[int]]]
    """layer -> per expert, the placement indices (0..N-1) of the ranks holding a copy."""

    def __post_init__(self):
        for layer, per_expert in self.holders.items():
            if len(per_expert) != self.num_experts:
                raise ConfigError(f"placement of layer {layer}: {len(per_expert)} experts listed, "
                                  f"the model has {self.num_experts}")
            for e, ranks in enumerate(per_expert):
                if not ranks:
                    raise ConfigError(f"placement of layer {layer}: expert {e} is on no rank")
                if len(set(ranks)) != len(ranks) or not all(0 <= r < self.num_ranks for r in ranks):
                    raise ConfigError(f"placement of layer {layer}: expert {e} on ranks {ranks}; each must be "
                                      f"distinct and in 0..{self.num_ranks - 1}")

    @classmethod
    def balanced(cls, layers: list[int] | tuple[int, ...], num_experts: int, num_ranks: int,
                 replicate: dict[int, list[int]] | None = None) -> ExpertPlacement:
        """Contiguous equal shares (expert e on rank e * N // E); with more ranks than experts, rank r also
        holds a copy of expert r mod E. `replicate` (layer -> experts) puts a copy of those hot experts on
        every rank."""
        if num_ranks < 1:
            raise ConfigError(f"num_ranks={num_ranks} must be >= 1")
        replicate = replicate or {}
        holders = {}
        for layer in layers:
            per_expert = [[e * num_ranks // num_experts] for e in range(num_experts)]
            for r in range(num_ranks):
                if r not in {h for hs in per_expert for h in hs}:
                    per_expert[r % num_experts].append(r)
            for e in replicate.get(layer, []):
                if not 0 <= e < num_experts:
                    raise ConfigError(f"replicate: expert {e} of layer {layer} outside 0..{num_experts - 1}")
                per_expert[e] = sorted(set(per_expert[e]) | set(range(num_ranks)))
            holders[layer] = per_expert
        return cls(num_experts, num_ranks, holders)

    def local_experts(self, layer: int, rank: int) -> list[int]:
        """Global ids of the experts rank `rank` (placement index) holds for `layer`, in local row order."""
        return [e for e, ranks in enumerate(self.holders[layer]) if rank in ranks]

    def tables(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rank_of [E, R], local_of [E, R], replicas [E]) of one layer, on `device` (see the module doc)."""
        per_expert = self.holders[layer]
        width = max(len(r) for r in per_expert)
        local_row = {r: {e: i for i, e in enumerate(self.local_experts(layer, r))} for r in range(self.num_ranks)}
        rank_of = [[ranks[j % len(ranks)] for j in range(width)] for ranks in per_expert]
        local_of = [[local_row[r][e] for r in row] for e, row in enumerate(rank_of)]
        as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return as_long(rank_of), as_long(local_of), as_long([len(r) for r in per_expert])
