"""What the engine and the piecewise CUDA-graph runner call on an offloading backend."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from expertyard.experts.predictors.base import Predictor


@runtime_checkable
class OffloadingBackend(Protocol):
    """An expert backend that must run eagerly between graph pieces (it learns each layer's routing on the host).

    `predictor.predict(layer, x)` is captured INSIDE the decode graph pieces (`engine/piecewise_graph.py`), so it
    must be CUDA-graph capturable: no host sync (.item(), .tolist(), .cpu()), no allocation whose size depends on
    data, the same kernels for the same input shapes. `forward_routed` runs eagerly with its results.
    """

    graph_safe: bool  # False: decode runs in per-layer graph pieces
    predictor: Predictor
    visits: list[tuple[int, list[int]]] | None  # set to [] to record every visit's (layer, experts)

    def forward_routed(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                       preds: list[tuple[int, torch.Tensor]], prologue: dict | None = None) -> torch.Tensor:
        """y [T, D] for x [T, D] routed to topk_ids [T, K] with weights topk_w [T, K]; `preds` are the predictor's
        (target layer, expert ids [T, K]) computed from the same x. `prologue`: what `graph_prologue` returned,
        replayed in the graph piece just before (its rows cut to T)."""

    def graph_prologue(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                       preds: list[tuple[int, torch.Tensor]]) -> dict | None:
        """Captured INSIDE the graph piece that ends at `layer` (same rules as the predictor): the part of the
        visit that needs no host, as static tensors for `forward_routed`, or None (the visit runs eagerly)."""

    def before_graph_piece(self, layer: int) -> None:
        """Called before replaying the graph piece whose prologue is `layer`'s (order its reads after copies)."""

    def reset_stats(self) -> None:
        """Start counting cache, transfer and CPU statistics afresh (waits for the device)."""

    def report(self, tokens: int) -> dict:
        """Statistics since the last reset; per-token figures divide by `tokens`."""
