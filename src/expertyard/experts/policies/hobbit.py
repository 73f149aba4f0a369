"""HOBBIT's sequence-level multidimensional cache policy (arXiv 2411.01433, section "sequence-level
multidimensional expert caching"): evict the candidate with the lowest priority

    P(k) = w_lru * R(k) + w_lfu * F(k) + w_lhu * H(k) + w_fld * D(k)

with each term normalised to [0, 1] (1: keep):

  R  recency      1 - (now - last(k)) / (now - min_c last(c) + 1), the minimum over this eviction's candidates;
                  last(k) is the visit of k's latest use or load. Order-equivalent to LRU; the oldest candidate
                  scores 1 / (its age + 1), the newest up to 1.
  F  frequency    count(k) / max(1, max_j count(j)): requests of k in this sequence over the most requested
                  expert of the sequence (any expert, resident or not).
  H  high use     full(k) / max(1, count(k)): the share of k's requests in this sequence whose most demanding
                  pair needed full precision (`on_request` level FULL); 0 for an expert not requested yet.
  D  layer        1 - d(k) / n, d(k) = (pos(layer of k) - pos(current layer) - 1) mod n: the MoE layers still to
                  run before k's layer comes up (0: the next layer), n the MoE layers seen so far, pos() the
                  index among them; the current layer is that of the latest request or access.

Ties (equal P): the oldest last use, then the smallest key, so that weights (1, 0, 0, 0) are exactly LRU.

"Counters per sequence": `on_sequence_start` zeroes count and full (HOBBIT keeps its counters per sequence);
last use and the layer cycle are facts about residency and routing and are kept. Requests come from
`MixedPrecisionCache` (`on_request`, once per expert a visit requests, with the most demanding level of its
pairs). A cache that never calls `on_request` (the full-precision cache) counts its accesses as requests
instead, and H is then 0 for every expert (a constant: it does not change the order).

Victim selection is vectorised: per-expert counters live in numpy arrays indexed by a dense id, so an eviction
costs one pass to map the candidates to ids plus a few array operations: 75 / 140 / 180 us at 166 / 416 / 832
candidates against LRU's 45 / 85 / 170 us (2-core CPU under load), so a replay costs about what LRU's does.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from expertyard.experts.policies.base import CachePolicy, ExpertKey, Param
from expertyard.experts.policies.hobbit_weights import HobbitWeights, load_hobbit_weights
SMALL = 24  # candidates up to this many are scored in Python floats (numpy's per-call cost dominates)
FULL = 0  # expertyard.experts.precision.FULL (not imported: policies stay free of torch)


class HobbitPolicy(CachePolicy):
    name = "hobbit"
    params = (Param("weights", "weights file (`expertyard simulate --fit-weights`); None: equal weights, or "
                    "hobbit-weights.json beside the model", flag="policy_weights", beside_model="hobbit-weights.json"),)

    def __init__(self, weights: HobbitWeights | str | Path | None = None):
        if weights is None:
            weights = HobbitWeights()
        elif isinstance(weights, (str, Path)):
            weights = load_hobbit_weights(weights)
        elif not isinstance(weights, HobbitWeights):
            raise TypeError(f"weights must be HobbitWeights, a path or None, got {type(weights).__name__}")
        self.weights = weights
        self.index: dict[ExpertKey, int] = {}  # key -> dense id
        self.keys: list[ExpertKey] = []  # dense id -> key
        n = 64
        self.last = np.zeros(n, np.int64)  # visit of the latest use or load
        self.count = np.zeros(n, np.int64)  # requests in this sequence
        self.full = np.zeros(n, np.int64)  # of which at full precision
        self.lpos = np.zeros(n, np.int64)  # position of the key's layer among the layers seen
        self.max_count = 0
        self.layers: list[int] = []  # MoE layers seen, sorted
        self.current = -1  # position of the current layer (-1: none yet)
        self.counts_requests = False  # True once `on_request` is called: accesses are then not counted

    # ---- bookkeeping --------------------------------------------------------------------------------------
    def _id(self, key: ExpertKey) -> int:
        i = self.index.get(key)
        if i is not None:
            return i
        i = self.index[key] = len(self.keys)
        self.keys.append(key)
        if i == len(self.last):
            for name in ("last", "count", "full", "lpos"):
                arr = getattr(self, name)
                setattr(self, name, np.concatenate([arr, np.zeros_like(arr)]))
        layer = key[0]
        j = bisect.bisect_left(self.layers, layer)
        if j == len(self.layers) or self.layers[j] != layer:
            self.layers.insert(j, layer)
            pos = {lay: p for p, lay in enumerate(self.layers)}
            self.lpos[:i] = [pos[k[0]] for k in self.keys[:i]]
            if self.current >= j:
                self.current += 1
        self.lpos[i] = j
        return i

    def _count(self, i: int, full: bool) -> None:
        c = self.count[i] = self.count[i] + 1
        self.full[i] += full
        if c > self.max_count:
            self.max_count = int(c)

    def on_request(self, key: ExpertKey, level: int, now: int) -> None:
        """A visit at `now` requests `key`; `level` is the most demanding precision among its pairs."""
        i = self._id(key)
        self.counts_requests = True
        self._count(i, level == FULL)
        self.current = int(self.lpos[i])

    def on_access(self, key: ExpertKey, now: int) -> None:
        i = self._id(key)
        self.last[i] = now
        self.current = int(self.lpos[i])
        if not self.counts_requests:
            self._count(i, False)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        i = self._id(key)  # first: it may grow the arrays
        self.last[i] = now

    def on_sequence_start(self) -> None:
        self.count[:] = 0
        self.full[:] = 0
        self.max_count = 0

    # ---- eviction -----------------------------------------------------------------------------------------
    def priorities(self, candidates: list[ExpertKey], now: int) -> np.ndarray:
        """P(k) float64 for each candidate (module docstring)."""
        idx = np.fromiter((self.index[k] for k in candidates), np.int64, len(candidates))
        return self._priorities(idx, now)

    def _priorities(self, idx: np.ndarray, now: int) -> np.ndarray:
        w = self.weights
        last = self.last[idx]
        score = np.zeros(len(idx))
        if w.lru:
            score = score + w.lru * (1.0 - (now - last) / float(now - int(last.min()) + 1))
        if w.lfu:
            score = score + w.lfu * (self.count[idx] / float(max(1, self.max_count)))
        if w.lhu:
            score = score + w.lhu * (self.full[idx] / np.maximum(self.count[idx], 1))
        if w.fld:
            n = len(self.layers)
            score = score + w.fld * (1.0 - ((self.lpos[idx] - self.current - 1) % n) / n)
        return score

    def _priorities_small(self, idx: list[int], now: int) -> list[float]:
        """`_priorities` in Python floats: the same operations in the same order (bit-identical), faster than numpy
        for a few candidates."""
        w, last, count, full, lpos = self.weights, self.last, self.count, self.full, self.lpos
        lasts = [int(last[i]) for i in idx]
        span = float(now - min(lasts) + 1)
        mx = float(max(1, self.max_count))
        n, cur = len(self.layers), self.current
        out = []
        for i, li in zip(idx, lasts):
            s = 0.0
            if w.lru:
                s = s + w.lru * (1.0 - (now - li) / span)
            if w.lfu:
                s = s + w.lfu * (int(count[i]) / mx)
            if w.lhu:
                s = s + w.lhu * (int(full[i]) / max(int(count[i]), 1))
            if w.fld:
                s = s + w.fld * (1.0 - ((int(lpos[i]) - cur - 1) % n) / n)
            out.append(s)
        return out

    def victim(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        candidates = candidates if isinstance(candidates, list) else list(candidates)
        if len(candidates) <= SMALL:
            score = self._priorities_small([self.index[k] for k in candidates], now)
            m = min(score)
            ties = [c for c, v in zip(candidates, score) if v == m]
            if len(ties) == 1:
                return ties[0]
            return min(ties, key=lambda k: (int(self.last[self.index[k]]), k))
        idx = np.fromiter((self.index[k] for k in candidates), np.int64, len(candidates))
        score = self._priorities(idx, now)
        ties = np.flatnonzero(score == score.min())
        if len(ties) == 1:
            return candidates[int(ties[0])]
        return min((candidates[t] for t in ties.tolist()), key=lambda k: (int(self.last[self.index[k]]), k))
