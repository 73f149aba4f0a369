"""Predictors that score the next layers' experts with one stacked matmul over the current hidden state."""

from __future__ import annotations

import torch

from expertyard.experts.predictors.base import Predictor

# T = tokens, D = hidden, E = experts, d = prefetch depth, K = experts per token


class StackedGatePredictor(Predictor):
    """For each MoE layer l, a matrix [d*E, D] (and optional bias) whose product with x gives logits of the
    next d MoE layers; their top-k are the prediction. All d future gates are one matmul."""

    def __init__(self, moe_layers: list[int], top_k: int, depth: int,
                 weights: dict[int, torch.Tensor], biases: dict[int, torch.Tensor] | None = None):
        super().__init__(depth)
        self.top_k = top_k
        self.targets = {l: moe_layers[i + 1:i + 1 + depth] for i, l in enumerate(moe_layers)}
        self.weights = weights  # layer -> [len(targets) * E, D]
        self.biases = biases or {}

    def predict(self, layer: int, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        targets = self.targets.get(layer, [])
        if not targets:
            return []
        w = self.weights[layer]
        logits = torch.nn.functional.linear(x.to(w.dtype), w, self.biases.get(layer))  # [T, n*E]
        ids = logits.view(x.shape[0], len(targets), -1).topk(self.top_k, dim=-1).indices  # [T, n, K]
        return [(t, ids[:, i]) for i, t in enumerate(targets)]


class NextGatePredictor(StackedGatePredictor):
    """Training-free: the future layers' own routers applied to the current hidden state."""

    name = "next-gate"

    def __init__(self, model, depth: int = 1):
        cfg = model.cfg
        moe_layers = list(cfg.moe_layers)
        routers = {l: model.layers[l].mlp.gate.weight for l in moe_layers}  # [E, D] each
        weights = {}
        for i, l in enumerate(moe_layers):
            targets = moe_layers[i + 1:i + 1 + depth]
            if targets:
                weights[l] = torch.cat([routers[t] for t in targets]).float()  # [n*E, D]
        super().__init__(moe_layers, cfg.moe.top_k, depth, weights)
