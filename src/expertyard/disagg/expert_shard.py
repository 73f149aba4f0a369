"""The routed experts one expert rank holds: for each MoE layer, its share (and replicas) stacked."""

from __future__ import annotations

import torch

from expertyard.config import ModelConfig
from expertyard.disagg.placement import ExpertPlacement
from expertyard.errors import CheckpointError
from expertyard.experts.backend import ExpertBackend, Projection
from expertyard.experts.resident import ResidentExperts
from expertyard.kernels.fused_moe import fused_moe

# T = tokens, K = experts per token, E_l = local experts of a layer, I = expert intermediate, D = hidden


class ExpertShard(ExpertBackend):
    """Local stacks w13[layer] [E_l, 2I, D], w2[layer] [E_l, D, I]; as an ExpertBackend it only loads weights
    (a checkpoint loader hands it every expert, it keeps those the placement gives to `index`)."""

    def __init__(self, cfg: ModelConfig, placement: ExpertPlacement, index: int, device: torch.device | str,
                 dtype: torch.dtype):
        i, d = cfg.moe.intermediate_size, cfg.hidden_size
        self.intermediate_size = i
        self.local = {layer: placement.local_experts(layer, index) for layer in cfg.moe_layers}
        self.row = {layer: {e: j for j, e in enumerate(es)} for layer, es in self.local.items()}
        self.w13 = {layer: torch.empty(len(es), 2 * i, d, device=device, dtype=dtype) for layer, es in self.local.items()}
        self.w2 = {layer: torch.empty(len(es), d, i, device=device, dtype=dtype) for layer, es in self.local.items()}
        self._expected = _all_experts(cfg)

    @classmethod
    def from_resident(cls, resident: ResidentExperts, cfg: ModelConfig, placement: ExpertPlacement,
                      index: int) -> ExpertShard:
        any_w = next(iter(resident.w13.values()))
        shard = cls(cfg, placement, index, any_w.device, any_w.dtype)
        for layer, experts in shard.local.items():
            rows = torch.tensor(experts, dtype=torch.long, device=any_w.device)
            shard.w13[layer] = resident.w13[layer].index_select(0, rows)
            shard.w2[layer] = resident.w2[layer].index_select(0, rows)
        return shard

    def compute(self, layer: int, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], local_ids [T, K] (-1: not here), weights [T, K] -> [T, D], the sum over local experts."""
        w13, w2 = self.w13[layer], self.w2[layer]
        if w13.shape[0] == 0 or x.shape[0] == 0:
            return x.new_zeros(x.shape)
        if x.is_cuda:  # the Triton kernel drops ids outside [0, E_l): no host sync
            return fused_moe(x, w13, w2, local_ids, weights)
        # the torch kernel rejects -1: send those pairs to row 0 with weight 0 (x rows of unused slots are zero)
        return fused_moe(x, w13, w2, local_ids.clamp(min=0), weights)

    def forward(self, layer, x, topk_ids, topk_w):
        raise TypeError("an ExpertShard computes local experts only (ExpertShard.compute); it is not a model's backend")

    def load_expert_weight(self, layer: int, expert: int, proj: Projection, tensor: torch.Tensor) -> None:
        j = self.row.get(layer, {}).get(expert)
        if j is None:
            return  # another rank's expert
        i = self.intermediate_size
        dst = self.w2[layer][j] if proj == "down" else (self.w13[layer][j, :i] if proj == "gate" else self.w13[layer][j, i:])
        if dst.shape != tensor.shape:
            raise CheckpointError(f"expert {expert} {proj} of layer {layer}: expected shape {tuple(dst.shape)}, "
                                  f"checkpoint has {tuple(tensor.shape)}")
        dst.copy_(tensor)

    def expected_weights(self) -> set[tuple[int, int, str]]:
        return self._expected  # every expert: the checkpoint must be complete, whichever share this rank keeps


class NoExperts(ExpertBackend):
    """Loading placeholder for attention-only ranks: drops every routed-expert tensor."""

    def __init__(self, cfg: ModelConfig):
        self._expected = _all_experts(cfg)

    def expected_weights(self) -> set[tuple[int, int, str]]:
        return self._expected

    def forward(self, layer, x, topk_ids, topk_w):
        raise TypeError("this rank holds no routed experts")

    def load_expert_weight(self, layer, expert, proj, tensor) -> None:
        pass


def _all_experts(cfg: ModelConfig) -> set[tuple[int, int, str]]:
    return {(layer, e, p) for layer in cfg.moe_layers for e in range(cfg.moe.num_experts) for p in ("gate", "up", "down")}
