from __future__ import annotations

from collections.abc import Iterable

from expertyard.experts.policies.base import CachePolicy, ExpertKey


class LFUPolicy(CachePolicy):
    """Evict the expert used least often; among equals, the one whose last use (or load) is oldest.

    Frequencies count every access over the whole run and survive eviction (classic "perfect" LFU, as in
    MoE-Infinity's activation counts): an expert popular in the past comes back with its history, which is what
    makes LFU robust to a burst of one-off experts. A prefetch load is not a use; it only refreshes recency.
    """

    name = "lfu"

    def __init__(self):
        self.count: dict[ExpertKey, int] = {}  # accesses over the whole run, kept after eviction
        self.rank: dict[ExpertKey, tuple[int, int, ExpertKey]] = {}  # resident key -> (count, last use, key)

    def on_access(self, key: ExpertKey, now: int) -> None:
        n = self.count[key] = self.count.get(key, 0) + 1
        self.rank[key] = (n, now, key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        self.rank[key] = (self.count.get(key, 0), now, key)

    def on_evict(self, key: ExpertKey) -> None:
        self.rank.pop(key, None)

    def victim(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        return min(candidates, key=self.rank.__getitem__)
