"""Pre-gate predictors: from the hidden state entering MoE layer l, guess the experts of the next MoE layers,
so that their copies start while layer l computes (Pre-gated MoE, ISCA'24)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

# T = tokens, D = hidden size, K = experts per token


class Predictor(ABC):
    name: str = ""

    def __init__(self, depth: int):
        if not 1 <= depth <= 3:
            raise ValueError(f"prefetch depth={depth} must be 1, 2 or 3")
        self.depth = depth

    @abstractmethod
    def predict(self, layer: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """x [T, D]: the input of MoE layer `layer`. Returns, for each of the next `depth` MoE layers (fewer
        near the end), (that layer, predicted expert ids [T, K] long on x.device), nearest first."""


class NoPredictor(Predictor):
    """On-demand loading: the baseline."""

    name = "none"

    def __init__(self, depth: int = 1):
        super().__init__(depth)

    def predict(self, layer: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        return []


class TraceOraclePredictor(Predictor):
    """Under routing forced from a trace: the trace's own experts of the next layers, i.e. a perfect
    predictor. An upper bound for what prediction can buy, not a method."""

    name = "oracle"

    def __init__(self, forced, moe_layers: list[int], depth: int = 1):
        super().__init__(depth)
        self.forced = forced
        self.targets = {l: moe_layers[i + 1:i + 1 + depth] for i, l in enumerate(moe_layers)}

    def predict(self, layer: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        return [(t, self.forced.ids(t)) for t in self.targets.get(layer, [])]
