"""All routed experts on one device: the GPU-only baseline and the CPU path."""

from __future__ import annotations

import torch

from expertyard.config import ModelConfig
from expertyard.errors import CheckpointError
from expertyard.experts.backend import ExpertBackend, Projection

# E = experts, I = expert intermediate size, D = hidden size


class ResidentExperts(ExpertBackend):
    def __init__(self, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype):
        e, i, d = cfg.moe.num_experts, cfg.moe.intermediate_size, cfg.hidden_size
        self.intermediate_size = i
        # gate and up stacked: w13[e] = [gate_proj; up_proj] of expert e
        self.w13 = {layer: torch.empty(e, 2 * i, d, device=device, dtype=dtype) for layer in cfg.moe_layers}  # [E, 2I, D]
        self.w2 = {layer: torch.empty(e, d, i, device=device, dtype=dtype) for layer in cfg.moe_layers}  # [E, D, I]
        self._expected = {(layer, x, p) for layer in cfg.moe_layers for x in range(e) for p in ("gate", "up", "down")}

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        from expertyard.kernels.fused_moe import fused_moe

        return fused_moe(x, self.w13[layer], self.w2[layer], topk_ids, topk_w)

    def load_expert_weight(self, layer: int, expert: int, proj: Projection, tensor: torch.Tensor) -> None:
        i = self.intermediate_size
        if proj == "down":
            dst = self.w2[layer][expert]
        else:
            dst = self.w13[layer][expert, :i] if proj == "gate" else self.w13[layer][expert, i:]
        if dst.shape != tensor.shape:
            raise CheckpointError(f"expert {expert} {proj} of layer {layer}: expected shape {tuple(dst.shape)}, "
                                  f"checkpoint has {tuple(tensor.shape)}")
        dst.copy_(tensor)

    def expected_weights(self) -> set[tuple[int, int, str]]:
        return self._expected

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.w13.values(), *self.w2.values()))
