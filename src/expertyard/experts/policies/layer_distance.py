from __future__ import annotations

import bisect
from collections.abc import Iterable

from expertyard.experts.policies.base import CachePolicy, ExpertKey


class LayerDistancePolicy(CachePolicy):
    """Evict the expert whose layer comes up last in the layer sweep (ties: least recently used).

    Decoding visits the MoE layers in a cycle, so an expert of the layer just computed cannot be needed before
    every other layer has run, while LRU evicts exactly the experts of the *next* layers (visited longest ago).
    This is the layer-distance term of HOBBIT's cache policy, on its own.
    """

    name = "layer-distance"

    def __init__(self):
        self.last_use: dict[ExpertKey, int] = {}
        self.layers: list[int] = []  # MoE layers seen, sorted
        self.current = 0  # layer of the current visit (or of the latest access, for a cache without visits)

    def _see(self, layer: int) -> None:
        i = bisect.bisect_left(self.layers, layer)
        if i == len(self.layers) or self.layers[i] != layer:
            self.layers.insert(i, layer)

    def on_visit(self, layer: int, now: int) -> None:
        self._see(layer)
        self.current = layer

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._see(key[0])
        self.current = key[0]
        self.last_use[key] = now

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._see(key[0])
        self.last_use[key] = now

    def on_evict(self, key: ExpertKey) -> None:
        self.last_use.pop(key, None)

    def distance(self, layer: int) -> int:
        """Visits until `layer` runs again, counted in MoE layers (0: the next one)."""
        n = len(self.layers)
        return (self.layers.index(layer) - self.layers.index(self.current) - 1) % n

    def victim(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        return max(candidates, key=lambda k: (self.distance(k[0]), -self.last_use.get(k, -1), k))
