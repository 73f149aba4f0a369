"""The shape of a distributed deployment: roles, ranks, micro-batches, timeouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from expertyard.errors import ConfigError

Mode = Literal["disaggregated", "colocated"]
Role = Literal["attention", "expert", "both"]


@dataclass(frozen=True)
class DisaggConfig:
    mode: Mode = "disaggregated"
    """disaggregated: attention ranks and expert ranks are different processes (MegaScale-Infer);
    colocated: every rank runs attention for its own requests and a share of the experts (wide EP)."""
    attention_ranks: int = 1
    """M: data-parallel attention ranks (colocated: every rank)."""
    expert_ranks: int = 1
    """N: expert-parallel ranks (colocated: must equal attention_ranks)."""
    micro_batches: int = 1
    """m: micro-batches of the ping-pong pipeline (1 = no overlap)."""
    dist_timeout: float = 120.0
    """Seconds any rank waits for a peer before the deployment is declared down."""
    capacity_multiple: int = 8
    """Per-step buffer capacity (tokens per source and destination) is rounded up to this multiple."""
    replicate: dict[int, list[int]] = field(default_factory=dict)
    """MoE layer -> hot experts copied to every expert rank (the rest are spread evenly)."""

    def __post_init__(self):
        if self.mode not in ("disaggregated", "colocated"):
            raise ConfigError(f"mode={self.mode!r} must be 'disaggregated' or 'colocated'")
        if self.attention_ranks < 1:
            raise ConfigError(f"attention_ranks={self.attention_ranks} must be >= 1")
        if self.expert_ranks < 1:
            raise ConfigError(f"expert_ranks={self.expert_ranks} must be >= 1")
        if self.mode == "colocated" and self.expert_ranks != self.attention_ranks:
            raise ConfigError(f"colocated: expert_ranks={self.expert_ranks} must equal "
                              f"attention_ranks={self.attention_ranks} (every rank is both)")
        if not 1 <= self.micro_batches <= 4:
            raise ConfigError(f"micro_batches={self.micro_batches} must be in 1..4")
        if not self.dist_timeout > 0:
            raise ConfigError(f"dist_timeout={self.dist_timeout} must be > 0 seconds")
        if self.capacity_multiple < 1:
            raise ConfigError(f"capacity_multiple={self.capacity_multiple} must be >= 1")
        for layer, experts in self.replicate.items():
            if layer < 0 or any(e < 0 for e in experts):
                raise ConfigError(f"replicate={self.replicate}: layers and experts are indices >= 0")

    @classmethod
    def colocated(cls, world_size: int, **kw) -> DisaggConfig:
        return cls(mode="colocated", attention_ranks=world_size, expert_ranks=world_size, **kw)

    @property
    def world_size(self) -> int:
        return self.attention_ranks if self.mode == "colocated" else self.attention_ranks + self.expert_ranks

    @property
    def attention_rank_ids(self) -> list[int]:
        """Global ranks that run attention; rank 0 drives the engine."""
        return list(range(self.attention_ranks))

    @property
    def expert_rank_ids(self) -> list[int]:
        """Global ranks that hold experts, in placement order."""
        if self.mode == "colocated":
            return list(range(self.attention_ranks))
        return list(range(self.attention_ranks, self.attention_ranks + self.expert_ranks))

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} outside 0..{self.world_size - 1}")
        if self.mode == "colocated":
            return "both"
        return "attention" if rank < self.attention_ranks else "expert"

    def capacity(self, max_tokens_per_micro_batch: int) -> int:
        """Rows each (source, destination) buffer holds this step: the worst case (every token of the largest
        micro-batch to one destination), rounded up. A token goes to a destination at most once, so no
        buffer can overflow."""
        c = max(1, max_tokens_per_micro_batch)
        return -(-c // self.capacity_multiple) * self.capacity_multiple
