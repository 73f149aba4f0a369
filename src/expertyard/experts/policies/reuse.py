"""Reuse-distance eviction: an online estimate of Belady's "farthest next use".

Belady evicts the expert whose next use is farthest in the future. This policy estimates that time from what
it has seen so far, in layer visits:

    next_use(k) = d(k) + n * m(a(k))

  d(k)  visits until k's layer runs again: (pos(layer of k) - pos(current layer) - 1) mod n, n the MoE layers
        seen so far, pos() the index among them (0: the next layer). Exact: layers run in a cycle.
  a(k)  k's age, in sweeps (a sweep: one pass over the MoE layers, one decode step or prefill token), at the
        next sweep k's layer can run: sweep(k's next chance) - sweep of k's last use or load.
  m(a)  expected sweeps still to wait for an expert of age a, learned online from every reuse seen so far:
        m(a) = mean(R - a | R >= a) over the reuse distances R (sweeps between two uses of the same expert),
        from a histogram of R (distances above MAX_AGE pooled, with their exact sum).

Ties (equal estimate): the oldest last touch (use or load), then the smallest key. The histogram's table m is
recomputed once per sweep, in float64, from integer counts, so the numba replay (`trace.fast_replay`)
computes bit-identical estimates.

Scan resistance: when one sweep needs more experts than the cache holds, every resident expert has the same
age and the same m; d then decides, so the experts of the layer just computed (needed again last) are evicted
and the rest stay resident, where LRU evicts exactly the experts of the next layers and misses everything.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

import numpy as np

from expertyard.experts.policies.base import CachePolicy, ExpertKey

MAX_AGE = 128  # reuse distances above this many sweeps share one histogram bucket (their exact sum is kept)
UNKNOWN = float(MAX_AGE)  # m(a) for an age with no reuse seen yet: far (evict first)


def expected_wait(hist: list[int], sums: list[int]) -> list[float]:
    """m[a] for a = 0..MAX_AGE from hist[r] (reuses at distance r >= 1; r = MAX_AGE: r >= MAX_AGE) and sums[r]
    (the sum of those distances): mean(R | R >= a) - a, UNKNOWN where no reuse that long was seen."""
    m = [UNKNOWN] * (MAX_AGE + 1)
    s, w = 0, 0
    for a in range(MAX_AGE, -1, -1):
        s += sums[a]
        w += hist[a]
        if w:
            m[a] = s / w - a
    return m


class ReusePolicy(CachePolicy):
    name = "reuse"

    def __init__(self):
        self.layers: list[int] = []  # MoE layers seen, sorted
        self.pos: dict[int, int] = {}  # layer -> index in self.layers
        self.layer = -1  # layer of the current visit
        self.visit = -1  # `now` of the current visit
        self.sweep = 0
        self.last_use: dict[ExpertKey, int] = {}  # sweep of the key's latest use (kept after eviction)
        self.hist = [0] * (MAX_AGE + 1)
        self.sums = [0] * (MAX_AGE + 1)
        self.m = np.array(expected_wait(self.hist, self.sums))  # [MAX_AGE + 1] float64
        self.touched = _TouchTable()  # resident key -> sweep and `now` of its latest use or load, as arrays
        self.layer_pos = np.zeros(0, dtype=np.int64)  # [max layer + 1] self.pos as an array (-1: not seen)

    def _see(self, layer: int) -> None:
        if layer not in self.pos:
            i = bisect_left(self.layers, layer)
            self.layers.insert(i, layer)
            self.pos = {lay: p for p, lay in enumerate(self.layers)}
            self.layer_pos = np.full(self.layers[-1] + 1, -1, dtype=np.int64)
            self.layer_pos[self.layers] = np.arange(len(self.layers))

    def on_visit(self, layer: int, now: int) -> None:
        if now == self.visit and layer == self.layer:
            return  # the same visit again (a visit accessed in groups)
        if self.visit >= 0 and layer <= self.layer:
            self.sweep += 1
            self.m = np.array(expected_wait(self.hist, self.sums))
        self._see(layer)
        self.layer, self.visit = layer, now

    def on_access(self, key: ExpertKey, now: int) -> None:
        if key[0] != self.layer or self.visit < 0:
            self.on_visit(key[0], now)  # a cache that does not announce visits
        last = self.last_use.get(key)
        if last is not None and last < self.sweep:
            r = self.sweep - last
            b = min(r, MAX_AGE)
            self.hist[b] += 1
            self.sums[b] += r
        self.last_use[key] = self.sweep
        self._touch(key, now)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._see(key[0])
        self._touch(key, now)

    def on_evict(self, key: ExpertKey) -> None:
        self.touched.remove(key)

    def _touch(self, key: ExpertKey, now: int) -> None:
        self.touched.set(key, self.sweep, now)

    def distance_and_age(self, key: ExpertKey) -> tuple[int, int]:
        """(d, a) of the module docstring for a resident `key`."""
        cur, p = self.pos.get(self.layer, -1), self.pos[key[0]]
        chance = self.sweep if p > cur else self.sweep + 1
        return (p - cur - 1) % len(self.layers), chance - int(self.touched.sweep[self.touched.row[key]])

    def estimate(self, key: ExpertKey) -> float:
        """Expected visits until `key` is used again (the eviction score: the largest goes)."""
        d, a = self.distance_and_age(key)
        return d + len(self.layers) * self.m[min(a, MAX_AGE)]

    def victim(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        """The largest `estimate`, then the oldest last touch, then the smallest key: scored as arrays over the
        candidates (a cache of hundreds of experts evicts on most misses), with `estimate`'s float64 arithmetic."""
        t = self.touched
        return self._victim_of_rows(np.fromiter((t.row[k] for k in candidates), dtype=np.int64))

    def victim_among_resident(self, resident, excluded, keep_layers, now):
        """`victim` over the touch table's live rows less the excluded ones: no candidate list (the table holds
        exactly the resident keys: loads insert, evictions remove, only residents are accessed)."""
        t = self.touched
        if type(self).victim is not ReusePolicy.victim or len(t.row) != len(resident):
            return super().victim_among_resident(resident, excluded, keep_layers, now)
        live = t.live.copy()  # [R] bool
        live[[t.row[k] for k in excluded if k in t.row]] = False
        if keep_layers:
            live &= ~np.isin(t.layer, list(keep_layers))
        rows = np.flatnonzero(live)
        return self._victim_of_rows(rows) if rows.size else None

    def _victim_of_rows(self, rows: np.ndarray) -> ExpertKey:
        """The victim among the touch table's `rows` [C] (see `victim`)."""
        t = self.touched
        n, cur = len(self.layers), self.pos.get(self.layer, -1)
        p = self.layer_pos[t.layer[rows]]  # [C] position of each candidate's layer
        d = (p - cur - 1) % n
        chance = np.where(p > cur, self.sweep, self.sweep + 1)
        score = d + n * self.m[np.minimum(chance - t.sweep[rows], MAX_AGE)]  # [C] float64
        best = rows[score == score.max()]
        if len(best) > 1:  # ties: the oldest touch, then the smallest (layer, expert)
            best = best[np.lexsort((t.expert[best], t.layer[best], t.now[best]))]
        return int(t.layer[best[0]]), int(t.expert[best[0]])

    def victim_by_estimate(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        """`victim` by calling `estimate` per candidate (for subclasses that refine the estimate)."""
        best, best_rank = None, None
        for k in candidates:
            rank = (self.estimate(k), -int(self.touched.now[self.touched.row[k]]), -k[0], -k[1])
            if best_rank is None or rank > best_rank:
                best, best_rank = k, rank
        return best


class _TouchTable:
    """Resident keys in rows of int64 arrays: layer, expert, sweep and `now` of the latest use or load."""

    def __init__(self, capacity: int = 64):
        self.row: dict[ExpertKey, int] = {}
        self.free: list[int] = []
        self.layer, self.expert, self.sweep, self.now = (np.zeros(capacity, dtype=np.int64) for _ in range(4))
        self.live = np.zeros(capacity, dtype=bool)  # rows that hold a key

    def set(self, key: ExpertKey, sweep: int, now: int) -> None:
        r = self.row.get(key)
        if r is None:
            r = self.free.pop() if self.free else self._grow()
            self.row[key] = r
            self.layer[r], self.expert[r] = key
            self.live[r] = True
        self.sweep[r], self.now[r] = sweep, now

    def remove(self, key: ExpertKey) -> None:
        r = self.row.pop(key, None)
        if r is not None:
            self.free.append(r)
            self.live[r] = False

    def _grow(self) -> int:
        n = len(self.row) + len(self.free)
        if n == len(self.layer):
            self.layer, self.expert, self.sweep, self.now, self.live = (
                np.concatenate([a, np.zeros_like(a)]) for a in (self.layer, self.expert, self.sweep, self.now, self.live))
        return n
