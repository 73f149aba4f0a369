"""Routing forced from a recorded trace: the router's expert choices are replaced by a real model's, so that a
random-weight model sees a real access pattern. Gate weights still come from the model's own router, read at
the forced experts (softmax probabilities, renormalised as the model does)."""

from __future__ import annotations

import numpy as np
import torch

from expertyard.config import ModelConfig
from expertyard.errors import ConfigError

# T = tokens in the step, N = tokens in the trace, L = MoE layers, K = experts per token


class ForcedRouting:
    def __init__(self, experts: np.ndarray, cfg: ModelConfig, device: torch.device, source: str = "trace"):
        n, layers, k = experts.shape
        if layers < len(cfg.moe_layers) or k != cfg.moe.top_k or int(experts.max()) >= cfg.moe.num_experts:
            raise ConfigError(f"{source}: routing of {layers} MoE layers, top-{k}, experts < {int(experts.max()) + 1} "
                              f"cannot drive a model of {len(cfg.moe_layers)} MoE layers, top-{cfg.moe.top_k}, "
                              f"{cfg.moe.num_experts} experts")
        self.table = torch.from_numpy(experts.astype(np.int64)).to(device)  # [N, L, K]
        self.column = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        self.cursor, self.rows = 0, None
        self._buffers: dict[int, torch.Tensor] = {}

    def begin_step(self, num_tokens: int, padded_to: int | None = None) -> None:
        """The next `num_tokens` tokens take the next trace rows (wrapping around). With `padded_to`, the row
        buffer has that many entries (CUDA-graph buckets); each size keeps one buffer, updated in place, since
        a captured graph reads that very tensor."""
        n, size = self.table.shape[0], padded_to or num_tokens
        rows = (torch.arange(size, device=self.table.device) + self.cursor) % n  # [T]
        if size in self._buffers:
            self._buffers[size].copy_(rows)
        else:
            self._buffers[size] = rows
        self.rows = self._buffers[size]
        self.cursor = (self.cursor + num_tokens) % n

    def ids(self, layer: int) -> torch.Tensor:
        return self.table[self.rows, self.column[layer]]  # [T, K]
