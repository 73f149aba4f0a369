"""Token-level dynamic precision (HOBBIT): which copy of an expert a (token, expert) pair needs on a cache miss.

Rank a token's top-k experts by gate weight (normalised to sum 1); an expert's *score* is the sum of the weights
ranked above it, so the top-1 scores 0 and the last scores 1 - its own weight. On a miss, score <= T1 loads the
full-precision copy, score <= T2 a low-precision copy, and above T2 the expert is skipped: its weight is
renormalised away (the token's other weights are scaled up to keep their sum). A resident copy is always used:
a full-precision one serves any pair, a low-precision one serves pairs that would accept low precision or a
skip.

The rule runs on the device (`pair_plan`: no host sync, graph-safe) and the host reproduces the per-expert
decision from the same per-pair levels (`expertyard.experts.mixed_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertyard.errors import ConfigError

# T = tokens, K = experts per token

FULL, LOW, SKIP = 0, 1, 2  # per-pair precision levels, most demanding first


@dataclass(frozen=True)
class PrecisionThresholds:
    full: float = 0.6  # T1: score <= T1 loads the full-precision copy
    low: float = 0.9  # T2: score <= T2 loads a low-precision copy; above, the expert is skipped

    def __post_init__(self):
        if not 0.0 <= self.full <= self.low <= 1.0:
            raise ConfigError(f"precision thresholds {self.full},{self.low} must satisfy 0 <= T1 <= T2 <= 1 "
                              "(e.g. --precision-thresholds 0.6,0.9)")

    @classmethod
    def parse(cls, text: str) -> PrecisionThresholds:
        try:
            t1, t2 = (float(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"--precision-thresholds {text!r}: write two numbers T1,T2, e.g. 0.6,0.9") from None
        return cls(t1, t2)


def scores(topk_w: torch.Tensor) -> torch.Tensor:
    """topk_w [T, K] -> score [T, K] float32: the normalised weight of the experts ranked above each pair (ties
    keep column order)."""
    w = topk_w.float()
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    order = torch.sort(w, dim=-1, descending=True, stable=True).indices  # [T, K]
    ranked = w.gather(1, order)
    above = ranked.cumsum(dim=-1) - ranked  # [T, K] in rank order
    return torch.empty_like(above).scatter_(1, order, above)


def levels(topk_w: torch.Tensor, thresholds: PrecisionThresholds) -> torch.Tensor:
    """Per-pair precision level [T, K] int32: FULL, LOW or SKIP."""
    s = scores(topk_w)
    return (s > thresholds.full).to(torch.int32) + (s > thresholds.low).to(torch.int32)


@dataclass
class PairPlan:
    """Where each (token, expert) pair of a visit is served from, decided on the device before the host knows the
    routing: `high_slots`/`low_slots` [T, K] int32 (-1: not from that pool), `level` [T, K] int32, and `weights`
    [T, K] float32 with skipped pairs renormalised away."""
    high_slots: torch.Tensor
    low_slots: torch.Tensor
    level: torch.Tensor
    weights: torch.Tensor


def pair_plan(topk_ids: torch.Tensor, topk_w: torch.Tensor, high_table: torch.Tensor, low_table: torch.Tensor,
              thresholds: PrecisionThresholds, force: int | None = None) -> PairPlan:
    """The speculative pass's plan. high_table/low_table [E] int32: the slot of each resident expert of this layer
    in the full / low-precision pool, -1 if absent. A pair is served by its full copy if resident; else by its
    low copy if resident and its level is LOW or SKIP; else it is skipped if its level is SKIP; else it misses
    (slot -1 in both: the host loads it and a second pass computes it). `force`: one level for every pair
    instead of the thresholds (LOW: the all-low-precision quality baselines)."""
    if force is None:
        level = levels(topk_w, thresholds)  # [T, K]
    else:
        level = torch.full(topk_ids.shape, force, dtype=torch.int32, device=topk_ids.device)
    hs = high_table[topk_ids]  # [T, K]
    ls = low_table[topk_ids]
    in_high = hs >= 0
    use_low = ~in_high & (ls >= 0) & (level != FULL)
    skip = ~in_high & (ls < 0) & (level == SKIP)
    kept = topk_w.float() * ~skip  # [T, K]
    weights = kept * (topk_w.float().sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp_min(1e-30))
    minus = torch.full_like(hs, -1)
    return PairPlan(torch.where(in_high, hs, minus), torch.where(use_low, ls, minus), level, weights)
