"""Eviction policies: small pluggable classes, chosen by name, shared by the engine and the trace simulator.

The clock `now` counts *layer visits*: one visit is one MoE layer computing one step (a decode step of the
batch, or one prefill chunk). The cache calls `on_access` for every expert a visit uses, `on_insert` when an
expert is loaded (demand miss or prefetch), `on_evict` when one leaves, and `victim` to choose which resident
expert to evict. Policies keep no tensors and never look at weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

ExpertKey = tuple[int, int]  # (layer, expert)


class CachePolicy(ABC):
    name: str = ""

    def on_access(self, key: ExpertKey, now: int) -> None:
        """A visit at time `now` uses `key` (after it is resident)."""

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """`key` was loaded into the cache at time `now`."""

    def on_evict(self, key: ExpertKey) -> None:
        """`key` left the cache."""

    def on_sequence_start(self) -> None:
        """A new sequence begins (policies with per-sequence counters reset them)."""

    @abstractmethod
    def victim(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        """The resident expert to evict, among `candidates` (resident and not protected; never empty)."""
