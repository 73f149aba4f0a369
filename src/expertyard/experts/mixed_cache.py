"""Two expert caches, one per precision (HOBBIT's multidimensional cache): pure bookkeeping, no torch, shared by
the GPU backend and the trace simulator.

The full-precision pool and the low-precision pool are each an `ExpertCacheState` with its own slots and policy.
A visit gives, per (token, expert) pair, the level `precision.FULL | LOW | SKIP` that pair would accept on a miss;
per expert, `access` decides (the same rule the device applied to the pairs in `precision.pair_plan`):

  resident at full precision      -> hit (serves every pair)
  some pair needs FULL            -> full-precision miss (the low copy, if resident, still serves LOW/SKIP pairs)
  resident at low precision       -> low hit
  some pair accepts LOW           -> low-precision miss (its SKIP pairs stay skipped)
  every pair is SKIP              -> skipped, nothing loaded

Predicted experts are prefetched into the low-precision pool: a wrong guess then costs bits_low/bits_full of a
full copy, and a right one serves the pairs that accept low precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from expertyard.experts.cache_state import ExpertCacheState, Load
from expertyard.experts.policies.base import CachePolicy, ExpertKey
from expertyard.experts.precision import FULL, LOW, SKIP

HIGH_POOL, LOW_POOL = "full", "low"


@dataclass
class PoolLoad:
    pool: str  # HIGH_POOL | LOW_POOL
    load: Load


@dataclass
class VisitPlan:
    """What one layer visit needs: the copies to make, and for the pairs that missed, the pool and slot of each
    expert they are computed from (the copy just made, or a full copy loaded for another pair)."""
    loads: list[PoolLoad]
    miss_source: dict[int, tuple[str, int]]  # expert -> (pool, slot) for pairs the speculative pass did not serve
    high_used: list[int]  # experts this visit accesses in each pool (protected until end_visit)
    low_used: list[int]
    skipped: list[int] = field(default_factory=list)  # experts no pair of this visit computes
    missed_pairs: list[int] = field(default_factory=list)  # pairs the device plan left to the host (in order)
    pairs_served: dict[str, int] = field(default_factory=dict)  # pairs from a full copy, a low copy, or skipped


@dataclass
class PrecisionCounters:
    """Per expert access of a visit (counted once per layer visit, like CacheCounters)."""
    full_hits: int = 0
    low_hits: int = 0  # a low copy served the expert (no full copy resident)
    full_misses: int = 0
    low_misses: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def miss_penalty(self, low_cost: float) -> float:
        """Full-copy equivalents moved: a low-precision miss costs `low_cost` (bits_low / bits_full) of a full one."""
        return self.full_misses + low_cost * self.low_misses


class MixedPrecisionCache:
    def __init__(self, high_slots: int, high_policy: CachePolicy, low_slots: int, low_policy: CachePolicy):
        self.high = ExpertCacheState(high_slots, high_policy)
        self.low = ExpertCacheState(low_slots, low_policy)
        self.counters = PrecisionCounters()

    @property
    def pools(self) -> dict[str, ExpertCacheState]:
        return {HIGH_POOL: self.high, LOW_POOL: self.low}

    def slot_of(self, key: ExpertKey) -> tuple[str, int] | None:
        """The copy a full-precision pair would be served from (full pool only), else the low copy, else None."""
        if (slot := self.high.slot_of(key)) is not None:
            return HIGH_POOL, slot
        if (slot := self.low.slot_of(key)) is not None:
            return LOW_POOL, slot
        return None

    def _notify(self, layer: int, expert: int, level: int, now: int) -> None:
        for state in (self.high, self.low):
            on_request = getattr(state.policy, "on_request", None)
            if on_request is not None:
                on_request((layer, expert), level, now)

    def access(self, layer: int, pairs: list[tuple[int, int]], now: int) -> VisitPlan:
        """pairs: (expert, level) for every (token, expert) pair of the visit. Returns the plan; the accessed
        experts stay protected in their pools until `end_visit`."""
        need: dict[int, int] = {}  # expert -> most demanding level of its pairs
        served, missed = {"full": 0, "low": 0, "skipped": 0}, []
        for p, (e, level) in enumerate(pairs):  # per pair, `precision.pair_plan`'s rule on the residency before
            need[e] = min(need.get(e, SKIP), level)
            key = (layer, e)
            if key in self.high.resident:
                served["full"] += 1
            elif key in self.low.resident and level != FULL:
                served["low"] += 1
            elif level == SKIP:
                served["skipped"] += 1
            else:
                missed.append(p)
        high_used, low_used, skipped, miss_pool = [], [], [], {}
        c = self.counters
        for e, level in need.items():
            key = (layer, e)
            self._notify(layer, e, level, now)
            in_low = key in self.low.resident
            if key in self.high.resident:
                c.full_hits += 1
                high_used.append(e)
                continue
            if in_low:
                low_used.append(e)  # serves the LOW/SKIP pairs
            if level == FULL:
                c.full_misses += 1
                high_used.append(e)
                miss_pool[e] = HIGH_POOL
            elif in_low:
                c.low_hits += 1
            elif level == LOW:
                c.low_misses += 1
                low_used.append(e)
                miss_pool[e] = LOW_POOL
            else:
                c.skipped += 1
                skipped.append(e)
        loads = [PoolLoad(HIGH_POOL, ld) for ld in self._access_pool(self.high, layer, high_used, now)]
        loads += [PoolLoad(LOW_POOL, ld) for ld in self._access_pool(self.low, layer, low_used, now)]
        miss_source = {e: (pool, self.pools[pool].slot_of((layer, e))) for e, pool in miss_pool.items()}
        for p in missed:
            served["full" if miss_source[pairs[p][0]][0] == HIGH_POOL else "low"] += 1
        return VisitPlan(loads, miss_source, high_used, low_used, skipped, missed, served)

    @staticmethod
    def _access_pool(state: ExpertCacheState, layer: int, experts: list[int], now: int) -> list[Load]:
        return state.access(layer, experts, now) if experts else []

    def end_visit(self, layer: int, plan: VisitPlan) -> None:
        self.high.end_visit(layer, plan.high_used)
        self.low.end_visit(layer, plan.low_used)

    def prefetch(self, keys: list[ExpertKey], now: int) -> list[PoolLoad]:
        """Load predicted experts that have no copy yet into the low-precision pool."""
        missing = [k for k in keys if k not in self.high.resident]
        return [PoolLoad(LOW_POOL, ld) for ld in self.low.prefetch(missing, now)]

    def release_prefetched(self) -> None:
        self.low.release_prefetched()


def adaptive_prefetch(cache, predicted: list[tuple[int, list[int]]], now: int) -> list:
    """HOBBIT's layer-level adaptive prefetch. `predicted`: (layer, experts) from the nearest layer outwards.
    Prefetch the nearest layer's predicted experts; go one layer deeper only while everything predicted so far
    was already cached (no copy started), so the copy engine works on the nearest need first and deeper
    predictions (less accurate) only use an idle link. `cache`: an ExpertCacheState or MixedPrecisionCache."""
    loads = []
    for layer, experts in predicted:
        loads = cache.prefetch([(layer, e) for e in experts], now)
        if loads:
            break
    return loads
