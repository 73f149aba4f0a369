"""Which experts are resident in which cache slot: pure bookkeeping (no torch), shared by the GPU expert cache
and the trace simulator, so that a simulated policy is exactly the engine's.

A visit: the experts a MoE layer uses now are `access`ed (hits counted, misses loaded into slots, evicting by
the policy) and protected until the visit ends; predicted experts of later layers are `prefetch`ed and stay
protected until their layer's visit ends (or a demand load needs the slot).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from expertyard.experts.policies.base import CachePolicy, ExpertKey


@dataclass
class Load:
    key: ExpertKey
    slot: int
    evicted: ExpertKey | None
    prefetch: bool


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    prefetches: int = 0  # loads started by a prediction
    prefetch_hits: int = 0  # accesses served, at the visit it was predicted for, by an expert a prediction loaded
    wasted_prefetches: int = 0  # predicted experts that visit did not use (they stay resident as plain entries)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ExpertCacheState:
    capacity: int  # slots
    policy: CachePolicy
    resident: dict[ExpertKey, int] = field(default_factory=dict)  # key -> slot
    protected: set[ExpertKey] = field(default_factory=set)  # in use now, or prefetched and not yet used
    counters: CacheCounters = field(default_factory=CacheCounters)
    _prefetched_unused: set[ExpertKey] = field(default_factory=set)
    _free: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f"capacity={self.capacity} must be >= 1 slot")
        self._free = list(range(self.capacity - 1, -1, -1))

    def slot_of(self, key: ExpertKey) -> int | None:
        return self.resident.get(key)

    def _load(self, key: ExpertKey, now: int, prefetch: bool, keep_layers: frozenset[int] = frozenset()) -> Load | None:
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = self.policy.victim_among_resident(self.resident, self.protected, keep_layers, now)
            if evicted is None:
                return None  # everything resident is in use: no room (caller decides)
            slot = self.resident.pop(evicted)
            self.policy.on_evict(evicted)
            if evicted in self._prefetched_unused:
                self._prefetched_unused.discard(evicted)
                self.counters.wasted_prefetches += 1
        self.resident[key] = slot
        self.policy.on_insert(key, now)
        return Load(key, slot, evicted, prefetch)

    def access(self, layer: int, experts: list[int], now: int) -> list[Load]:
        """Use `experts` of `layer` at visit `now`: returns the loads the misses need (in order). The experts
        stay protected until `end_visit`. Raises if the cache cannot hold one visit's experts."""
        keys = [(layer, e) for e in dict.fromkeys(experts)]
        self.policy.on_visit(layer, now)
        for wrong in [k for k in self._prefetched_unused if k[0] == layer and k not in keys]:
            self.protected.discard(wrong)  # this layer's routing is known now: its mispredictions may go
        self.protected.update(keys)
        loads = []
        for key in keys:
            if key in self.resident:
                self.counters.hits += 1
                if key in self._prefetched_unused:
                    self.counters.prefetch_hits += 1
                    self._prefetched_unused.discard(key)
            else:
                self.counters.misses += 1
                load = self._load(key, now, prefetch=False)
                if load is None:  # a demand beats a prediction: unprotect other layers' unused prefetches
                    for other in [k for k in self._prefetched_unused if k[0] != layer]:
                        self.protected.discard(other)
                    load = self._load(key, now, prefetch=False)
                if load is None:
                    raise RuntimeError(f"cache of {self.capacity} slots cannot hold the {len(keys)} experts "
                                       f"layer {layer} needs at once")
                loads.append(load)
            self.policy.on_access(key, now)
        return loads

    def end_visit(self, layer: int, experts: list[int]) -> None:
        """The visit is over: its experts, and predictions for this layer that it did not use, may be evicted."""
        for e in experts:
            self.protected.discard((layer, e))
        for key in [k for k in self._prefetched_unused if k[0] == layer]:  # mispredicted: plain residents now
            self.protected.discard(key)
            self._prefetched_unused.discard(key)
            self.counters.wasted_prefetches += 1

    def prefetch(self, keys: list[ExpertKey], now: int) -> list[Load]:
        """Load predicted experts that are not resident, while free or unprotected slots last; protect them
        until used. A prediction never evicts an expert of a layer it predicts for: those are about to be
        needed too, and a wrong guess would cost two loads. Returns the loads started."""
        loads = []
        targets = frozenset(k[0] for k in keys)
        for key in dict.fromkeys(keys):
            if key in self.resident:
                continue
            load = self._load(key, now, prefetch=True, keep_layers=targets)
            if load is None:
                break
            self.counters.prefetches += 1
            self._prefetched_unused.add(key)
            self.protected.add(key)
            loads.append(load)
        return loads

    def release_prefetched(self) -> None:
        """Stop protecting every prefetched expert (they stay resident as ordinary entries)."""
        for key in self._prefetched_unused:
            self.protected.discard(key)
