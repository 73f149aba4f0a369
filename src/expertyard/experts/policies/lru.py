from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from expertyard.experts.policies.base import CachePolicy, ExpertKey


class LRUPolicy(CachePolicy):
    """Evict the expert whose last use (or load) is oldest; among equals, the smallest key."""

    name = "lru"

    def __init__(self):
        self.last_use: OrderedDict[ExpertKey, int] = OrderedDict()  # oldest first while `now` never goes back
        self._in_order = True

    def _touch(self, key: ExpertKey, now: int) -> None:
        if self.last_use and now < next(reversed(self.last_use.values())):
            self._in_order = False  # a clock that went back: scan everything from now on
        self.last_use[key] = now
        self.last_use.move_to_end(key)

    def on_access(self, key: ExpertKey, now: int) -> None:
        self._touch(key, now)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self._touch(key, now)

    def on_evict(self, key: ExpertKey) -> None:
        self.last_use.pop(key, None)

    def victim(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        return min(candidates, key=lambda k: (self.last_use.get(k, -1), k))

    def victim_among_resident(self, resident, excluded, keep_layers, now):
        """From the oldest end of the recency order: the first allowed key and its equals in last use (the
        order holds exactly the resident keys: loads insert, evictions remove, only residents are accessed)."""
        if not self._in_order or len(self.last_use) != len(resident):
            return super().victim_among_resident(resident, excluded, keep_layers, now)
        best, oldest = None, None
        for k, t in self.last_use.items():
            if oldest is not None and t != oldest:
                break
            if k in excluded or k[0] in keep_layers:
                continue
            if oldest is None or k < best:
                best, oldest = k, t
        return best
