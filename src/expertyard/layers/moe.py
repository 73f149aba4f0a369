"""The MoE block: router -> ExpertBackend -> combine (+ shared expert).

The block never owns routed-expert weights: it hands tokens to whichever `ExpertBackend` the model was
given (resident, offloaded, remote), so the model code does not change when experts live elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertyard.config import MoEConfig
from expertyard.layers.mlp import GatedMLP

# T = tokens, D = hidden, E = routed experts, K = experts per token


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())  # [T, E] float32

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> (topk_ids [T, K] long, topk_w [T, K] float32), sorted by weight."""
        cfg = self.cfg
        scores = logits.softmax(dim=-1)
        if cfg.topk_method == "group_limited_greedy":
            t = scores.shape[0]
            group_scores = scores.view(t, cfg.n_group, -1).amax(dim=-1)  # [T, n_group]
            top_groups = group_scores.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            scores = scores.masked_fill(~group_mask.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1), 0.0)
        topk_w, topk_ids = scores.topk(cfg.top_k, dim=-1)
        if cfg.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        return topk_ids, topk_w * cfg.routed_scaling_factor

    def weights_at(self, logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Gate weights [T, K] the model would give experts `topk_ids` (used when routing is forced)."""
        topk_w = logits.softmax(dim=-1).gather(1, topk_ids)
        if self.cfg.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        return topk_w * self.cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.select(self.logits(x))


class SparseMoeBlock(nn.Module):
    def __init__(self, layer: int, cfg: MoEConfig, hidden_size: int):
        super().__init__()
        self.layer = layer
        self.gate = Router(cfg, hidden_size)
        self.shared_expert = GatedMLP(hidden_size, cfg.shared_intermediate_size) if cfg.shared_intermediate_size else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if cfg.shared_expert_gate else None
        self.experts = None  # an ExpertBackend, set by the model; not a submodule
        self.forced = None  # a ForcedRouting replacing the router's choices (benchmarks on real traces)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids [T, K], topk_w [T, K] float32): the router's choice, or the forced one."""
        if self.forced is None:
            return self.gate(x)
        topk_ids = self.forced.ids(self.layer)
        return topk_ids, self.gate.weights_at(self.gate.logits(x), topk_ids)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's output [T, D] (gated for Qwen2-MoE), or None."""
        if self.shared_expert is None:
            return None
        out = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_w = self.route(x)  # [T, K], [T, K]
        y = self.experts.forward(self.layer, x, topk_ids, topk_w)  # [T, D]
        shared = self.shared(x)
        return y if shared is None else y + shared
