"""Eviction policies: small pluggable classes, chosen by name, shared by the engine and the trace simulator.

The clock `now` counts *layer visits*: one visit is one MoE layer computing one step (a decode step of the
batch, or one prefill chunk). The cache calls `on_visit` when a visit begins, `on_access` for every expert a
visit uses, `on_insert` when an expert is loaded (demand miss or prefetch), `on_evict` when one leaves, and
`victim` to choose which resident expert to evict. Policies keep no tensors and never look at weights.

Each class declares the parameters its constructor takes (`params`), so that one factory
(`policies.registry.make_policy`) builds any of them by name for the CLI and the simulator alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ExpertKey = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Param:
    """A constructor parameter of a policy: its keyword, what it is, and the CLI flag that sets it (None:
    set by the simulator only, e.g. Belady's future)."""

    name: str
    help: str
    flag: str | None = None  # argparse dest, e.g. "policy_weights" for --policy-weights
    beside_model: str | None = None  # file name read from the model directory when the flag is not given
    kind: type = Path


class CachePolicy(ABC):
    name: str = ""
    params: tuple[Param, ...] = ()  # constructor keywords (all optional unless `required`)
    online: bool = True  # False: reads the future (a bound for simulation, not a policy an engine can run)

    def on_visit(self, layer: int, now: int) -> None:
        """A visit of MoE `layer` begins at `now` (before its accesses; called again for the same visit when
        it is accessed in groups)."""

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

    def victim_among_resident(self, resident: Iterable[ExpertKey], excluded: set[ExpertKey],
                              keep_layers: frozenset[int], now: int) -> ExpertKey | None:
        """`victim` among the `resident` keys that are not `excluded` and not of a layer in `keep_layers`; None
        when none may go. Policies that keep their own index of the resident keys override it to skip building
        the candidate list (a cache of hundreds of experts evicts on most misses); the choice must be `victim`'s."""
        candidates = [k for k in resident if k not in excluded and k[0] not in keep_layers]
        return self.victim(candidates, now) if candidates else None
