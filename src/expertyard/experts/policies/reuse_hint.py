"""Reuse-distance eviction with a next-token routing hint, learned online from routing alone.

`reuse` estimates an expert's next use as d + n m(a), where m(a) is the same for every expert of age a. Written
one sweep at a time, m(a) = (1 - h(a)) (1 + m(a + 1)), with h(a) the share of experts of age a that are used at
their next chance. This policy replaces that global h(a) by a hint p(k) specific to the expert:

    next_use(k) = d(k) + n (1 - p(k)) (1 + m(a(k) + 1))

  p(k)  for k = (layer, e): the mean, over the experts S that the latest sweep used at k's layer, of
        follow[layer][s][e] / uses[layer][s]: of the sweeps that used s at that layer, the share whose next
        sweep used e there (the next token's routing after this token's, at the same layer). Learned from every
        access as it happens; while the current visit of a layer runs, S is the part of its experts accessed so
        far, and a layer with no such sweep yet falls back to `reuse`'s estimate d + n m(a).

Everything else (d, a, m, ties) is `reuse`'s. A next-layer (same token) hint was measured too and changed
nothing (docs/simulation.md). Costs: O(|S|) table updates and O(experts that follow) hint updates per access,
O(1) per candidate per eviction. The hint sums are accumulated access by access in the same order, in float64,
by the numba replay (`trace.fast_replay`), so both compute bit-identical estimates.

Scan resistance: when every sweep uses the same experts, p = 1 for each of them and d decides, as in `reuse`.
"""

from __future__ import annotations

from collections import defaultdict

from expertyard.experts.policies.base import ExpertKey
from expertyard.experts.policies.reuse import MAX_AGE, ReusePolicy


class ReuseHintPolicy(ReusePolicy):
    name = "reuse-hint"

    def __init__(self):
        super().__init__()
        self.uses: dict[ExpertKey, int] = defaultdict(int)  # (layer, s) -> sweeps that used s at layer
        self.follow: dict[ExpertKey, dict[int, int]] = defaultdict(dict)  # (layer, s) -> {e: next sweep used e}
        self.previous: dict[int, list[int]] = {}  # layer -> experts the sweep before the latest used there
        self.latest: dict[int, list[int]] = {}  # layer -> experts the latest sweep used there (so far)
        self.latest_sweep: dict[int, int] = {}  # layer -> sweep of `latest`
        self.hint_sum: dict[int, dict[int, float]] = {}  # layer -> {e: sum over s in latest of follow / uses}

    def on_access(self, key: ExpertKey, now: int) -> None:
        super().on_access(key, now)
        layer, e = key
        if self.latest_sweep.get(layer) != self.sweep:  # the first access of this layer in this sweep
            self.previous[layer] = self.latest.get(layer, [])
            self.latest[layer] = []
            self.latest_sweep[layer] = self.sweep
            self.hint_sum[layer] = {}
        if e in self.latest[layer]:
            return  # the same expert again within the sweep (a batched visit accessed in groups)
        for s in self.previous[layer]:
            row = self.follow[(layer, s)]
            row[e] = row.get(e, 0) + 1
        self.uses[key] += 1
        self.latest[layer].append(e)
        n_uses, hint = self.uses[key], self.hint_sum[layer]
        for e2, c in self.follow[key].items():
            hint[e2] = hint.get(e2, 0.0) + c / n_uses

    def victim(self, candidates, now: int) -> ExpertKey:
        return self.victim_by_estimate(candidates, now)  # the hint is per expert: scored one by one

    def hint(self, key: ExpertKey) -> float | None:
        """p(key): the chance that key's layer's next run after the latest one uses it (None: no sweep yet)."""
        layer, e = key
        n = len(self.latest.get(layer, ()))
        return self.hint_sum[layer].get(e, 0.0) / n if n else None

    def estimate(self, key: ExpertKey) -> float:
        p = self.hint(key)
        if p is None:
            return super().estimate(key)
        d, a = self.distance_and_age(key)
        return d + len(self.layers) * (1.0 - p) * (1.0 + self.m[min(a + 1, MAX_AGE)])
