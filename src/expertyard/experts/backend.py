"""The seam between the model and wherever the routed experts live."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch

Projection = Literal["gate", "up", "down"]


class ExpertBackend(ABC):
    """Computes the routed experts of a MoE layer.

    forward(layer, x [T, D], topk_ids [T, K], topk_w [T, K] float32) -> y [T, D], where
    y[t] = sum_k topk_w[t, k] * expert_{topk_ids[t, k]}(x[t]).
    """

    graph_safe: bool = True  # forward never syncs with the host, so a whole decode step fits one CUDA graph

    @abstractmethod
    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def load_expert_weight(self, layer: int, expert: int, proj: Projection, tensor: torch.Tensor) -> None:
        """Receive one checkpoint tensor: gate/up [I, D] or down [D, I] of one expert."""

    def load_stacked_weight(self, layer: int, proj: Literal["gate_up", "down"], tensor: torch.Tensor) -> None:
        """Receive all experts of a layer at once (transformers 5 fused layout): gate_up [E, 2I, D], down [E, D, I]."""
        for e in range(tensor.shape[0]):
            if proj == "down":
                self.load_expert_weight(layer, e, "down", tensor[e])
            else:
                gate, up = tensor[e].chunk(2, dim=0)
                self.load_expert_weight(layer, e, "gate", gate)
                self.load_expert_weight(layer, e, "up", up)

    def on_sequence_start(self) -> None:
        """A sequence begins on an idle engine (backends with per-sequence state, e.g. HOBBIT's cache counters)."""

    def expected_weights(self) -> set[tuple[int, int, str]]:
        """Every (layer, expert, proj) that loading must fill; used to report missing tensors."""
        return set()
