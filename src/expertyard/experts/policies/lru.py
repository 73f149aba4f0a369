from __future__ import annotations

from collections.abc import Iterable

from expertyard.experts.policies.base import CachePolicy, ExpertKey


class LRUPolicy(CachePolicy):
    """Evict the expert whose last use (or load) is oldest."""

    name = "lru"

    def __init__(self):
        self.last_use: dict[ExpertKey, int] = {}

    def on_access(self, key: ExpertKey, now: int) -> None:
        self.last_use[key] = now

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self.last_use[key] = now

    def on_evict(self, key: ExpertKey) -> None:
        self.last_use.pop(key, None)

    def victim(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        return min(candidates, key=lambda k: (self.last_use.get(k, -1), k))
