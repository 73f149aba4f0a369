"""Cache policies (lru, lfu, belady) driven through ExpertCacheState, against naive list-based references and,
for Belady, an exhaustive search over eviction choices; cache-state invariants under prefetch."""

from __future__ import annotations

import argparse
import itertools
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.errors import ConfigError
from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.policies import (DEFAULT_POLICY, ONLINE_POLICIES, POLICIES, BeladyPolicy, HobbitWeights,
                                         ReusePolicy, make_policy, policy_from_args, save_hobbit_weights)
from expertyard.experts.policies import reuse as reuse_mod
from expertyard.trace.simulate import visit


@st.composite
def visit_traces(draw, max_layers=3, max_experts=6, max_visits=40):
    """(visits [(layer, experts)], capacity, top_k): layers in order, as the engine visits them."""
    layers = draw(st.integers(1, max_layers))
    experts = draw(st.integers(2, max_experts))
    k = draw(st.integers(1, experts))
    steps = draw(st.integers(1, max_visits // layers))
    visits = []
    for _ in range(steps):
        for layer in range(layers):
            visits.append((layer, draw(st.lists(st.integers(0, experts - 1), min_size=1, max_size=k, unique=True))))
    capacity = draw(st.integers(k, layers * experts))
    return visits, capacity, k


def run_state(policy_name: str, visits, capacity: int) -> tuple[list[int], ExpertCacheState]:
    """Misses per visit, the engine's way: access then end_visit."""
    policy = BeladyPolicy(visits) if policy_name == "belady" else make_policy(policy_name)
    state = ExpertCacheState(capacity, policy)
    misses = []
    for now, (layer, experts) in enumerate(visits):
        before = state.counters.misses
        state.access(layer, experts, now)
        state.end_visit(layer, experts)
        misses.append(state.counters.misses - before)
    return misses, state


def reference(policy_name: str, visits, capacity: int) -> tuple[list[int], set]:
    """A plain list cache. LRU: recency order, a visit's experts moved to the end by key; evict the first entry
    the visit does not use. LFU: whole-run use counts, ties by last use then key."""
    cache: list = []
    count: dict = {}
    last: dict = {}
    misses = []
    for now, (layer, experts) in enumerate(visits):
        keys = [(layer, e) for e in experts]
        n = 0
        for key in keys:
            if key not in cache:
                n += 1
                if len(cache) == capacity:
                    others = [c for c in cache if c not in keys]
                    if policy_name == "lru":
                        victim = others[0]
                    else:
                        victim = min(others, key=lambda c: (count.get(c, 0), last[c], c))
                    cache.remove(victim)
                cache.append(key)
            count[key] = count.get(key, 0) + 1
            last[key] = now
        for key in sorted(keys):  # most recent at the end; equal recency: smaller key first
            cache.remove(key)
            cache.append(key)
        misses.append(n)
    return misses, set(cache)


def optimum(visits, capacity: int) -> int:
    """Fewest misses over every eviction choice (exhaustive, memoised on the resident set)."""

    @lru_cache(maxsize=None)
    def best(i: int, resident: frozenset) -> int:
        if i == len(visits):
            return 0
        layer, experts = visits[i]
        keys = {(layer, e) for e in experts}
        missing = keys - resident
        overflow = len(resident) + len(missing) - capacity
        if overflow <= 0:
            return len(missing) + best(i + 1, resident | missing)
        return len(missing) + min(best(i + 1, (resident - set(out)) | missing)
                                  for out in itertools.combinations(sorted(resident - keys), overflow))

    return best(0, frozenset())


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@settings(max_examples=150, deadline=None)
@given(case=visit_traces())
def test_lru_and_lfu_match_a_naive_list_cache(policy, case):
    visits, capacity, _ = case
    misses, state = run_state(policy, visits, capacity)
    ref_misses, ref_resident = reference(policy, visits, capacity)
    assert misses == ref_misses
    assert set(state.resident) == ref_resident
    assert state.counters.hits + state.counters.misses == sum(len(e) for _, e in visits)


@settings(max_examples=150, deadline=None)
@given(case=visit_traces())
def test_belady_never_misses_more_than_lru_or_lfu(case):
    visits, capacity, _ = case
    belady = sum(run_state("belady", visits, capacity)[0])
    assert belady <= sum(run_state("lru", visits, capacity)[0])
    assert belady <= sum(run_state("lfu", visits, capacity)[0])


@settings(max_examples=120, deadline=None)
@given(case=visit_traces(max_layers=2, max_experts=4, max_visits=12))
def test_belady_equals_the_exhaustive_optimum(case):
    visits, capacity, _ = case
    assert sum(run_state("belady", visits, capacity)[0]) == optimum(visits, capacity)


def test_belady_textbook_example():
    # one layer, capacity 2: a b c a b -> MIN keeps a for visit 3 and misses a, b, c, b = 4 (LRU misses 5)
    visits = [(0, [e]) for e in (0, 1, 2, 0, 1)]
    assert sum(run_state("belady", visits, 2)[0]) == 4
    assert sum(run_state("lru", visits, 2)[0]) == 5


def test_lfu_keeps_counts_across_evictions():
    # expert 0 is used 3 times, then evicted by a burst; when it comes back it outranks the one-off experts
    visits = [(0, [0]), (0, [0]), (0, [0]), (0, [1]), (0, [2]), (0, [0]), (0, [3])]
    _, state = run_state("lfu", visits, 2)
    assert (0, 0) in state.resident


def test_policies_are_registered_by_name():
    assert {"lru", "lfu", "belady"} <= set(POLICIES)
    assert make_policy("belady", future=[(0, [1])]).name == "belady"
    with pytest.raises(ConfigError, match="unknown cache policy"):
        make_policy("fifo")


class Checked:
    """Wraps a policy: fails if the cache evicts a protected expert or one the policy did not choose."""

    def __init__(self, inner, state_ref):
        self.inner, self.state_ref, self.chosen = inner, state_ref, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def victim(self, candidates, now):
        candidates = list(candidates)
        assert candidates and not set(candidates) & self.state_ref[0].protected
        self.chosen = self.inner.victim(candidates, now)
        return self.chosen

    def victim_among_resident(self, resident, excluded, keep_layers, now):
        """The policy's own index (when it has one) must choose what `victim` over the candidate list would."""
        candidates = [k for k in resident if k not in excluded and k[0] not in keep_layers]
        self.chosen = self.inner.victim_among_resident(resident, excluded, keep_layers, now)
        assert self.chosen == (self.inner.victim(candidates, now) if candidates else None)
        return self.chosen

    def on_evict(self, key):
        assert key == self.chosen and key not in self.state_ref[0].protected
        self.inner.on_evict(key)


@pytest.mark.parametrize("policy", ["lru", "lfu", "layer-distance", "reuse", "reuse-hint", "belady"])
@settings(max_examples=60, deadline=None)
@given(case=visit_traces(max_visits=30), data=st.data())
def test_cache_state_invariants_with_prefetch(policy, case, data):
    """Slots unique and in range, capacity respected, protected experts never evicted (the policy only ever sees
    unprotected candidates), no protection left behind by a finished layer."""
    visits, capacity, k = case
    layers = 1 + max(layer for layer, _ in visits)
    experts = 1 + max(e for _, es in visits for e in es)
    ref = [None]
    state = ref[0] = ExpertCacheState(capacity, Checked(
        BeladyPolicy(visits) if policy == "belady" else make_policy(policy), ref))
    for now, (layer, used) in enumerate(visits):
        predicted = data.draw(st.lists(st.tuples(st.integers(layer + 1, layer + 2), st.integers(0, experts - 1)),
                                       max_size=2 * k))
        predicted = [key for key in predicted if key[0] < layers]
        load_first = data.draw(st.booleans())  # the engine's path when a step's pairs exceed the cache
        before = state.counters.misses + state.counters.hits
        released, loads = visit(state, layer, used, predicted, now, pairs=capacity + 1 if load_first else len(used),
                                top_k=k)
        assert all(ld.prefetch and ld.key in predicted and ld.key in state.resident for ld in loads)
        assert state.counters.misses + state.counters.hits == before + len(used)
        assert load_first or not released
        assert len(state.resident) <= capacity
        slots = list(state.resident.values())
        assert len(set(slots)) == len(slots) and all(0 <= s < capacity for s in slots)
        assert state.protected <= set(state.resident)
        assert not {key for key in state.protected if key[0] <= layer}
    c = state.counters
    assert c.hits + c.misses == sum(len(e) for _, e in visits)
    assert c.prefetch_hits + c.wasted_prefetches <= c.prefetches


# ---- reuse (the default) -----------------------------------------------------------------------------------
def reuse_reference(visits, capacity: int, layers: int) -> list[tuple[int, int] | None]:
    """The evicted key of every miss (None: a free slot), from the reuse policy's definition with the whole
    history in lists: sweep of visit i = i // layers; m(a) = mean(R | bucket(R) >= a) - a over every reuse
    distance R seen before the sweep began; evict max (d + n m(age), -last touch, -key)."""
    max_age = reuse_mod.MAX_AGE
    resident: set = set()
    last_use: dict = {}
    touch: dict = {}  # key -> (sweep, visit)
    dists: list[int] = []
    m_dists: list[int] = []
    out = []
    for i, (layer, experts) in enumerate(visits):
        sweep = i // layers
        if i % layers == 0:
            m_dists = list(dists)
        n = min(layers, i + 1)

        def m(a):
            rs = [r for r in m_dists if min(r, max_age) >= a]
            return sum(rs) / len(rs) - a if rs else reuse_mod.UNKNOWN

        keys = [(layer, e) for e in experts]
        for key in keys:
            if key not in resident:
                if len(resident) < capacity:
                    out.append(None)
                else:
                    def rank(k):
                        d = (k[0] - layer - 1) % n
                        a = sweep + (k[0] <= layer) - touch[k][0]
                        return (d + n * m(min(a, max_age)), -touch[k][1], -k[0], -k[1])
                    victim = max((k for k in resident if k not in keys), key=rank)
                    resident.discard(victim)
                    out.append(victim)
                resident.add(key)
            if key in last_use and last_use[key] < sweep:
                dists.append(sweep - last_use[key])
            last_use[key] = sweep
            touch[key] = (sweep, i)
    return out


class Evictions:
    def __init__(self, inner):
        self.inner, self.log = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def victim(self, candidates, now):
        v = self.inner.victim(candidates, now)
        self.log.append(v)
        return v


@settings(max_examples=80, deadline=None)
@given(case=visit_traces(max_layers=3, max_experts=6, max_visits=60))
def test_reuse_evicts_as_its_definition_says(case):
    visits, capacity, _ = case
    layers = 1 + max(layer for layer, _ in visits)
    policy = Evictions(make_policy("reuse"))
    state = ExpertCacheState(capacity, policy)
    got = []
    for now, (layer, experts) in enumerate(visits):
        for load in state.access(layer, experts, now):
            got.append(load.evicted)
        state.end_visit(layer, experts)
    assert got == reuse_reference(visits, capacity, layers)


def cyclic_hits(policy: str, tokens: int = 40, layers: int = 32, k: int = 2, slots: int = 62) -> list[int]:
    """Hits per token when every token uses the same k experts at each of `layers` layers (64 > 62 slots)."""
    state = ExpertCacheState(slots, make_policy(policy))
    out, now = [], 0
    for _ in range(tokens):
        before = state.counters.hits
        for layer in range(layers):
            state.access(layer, list(range(k)), now)
            state.end_visit(layer, list(range(k)))
            now += 1
        out.append(state.counters.hits - before)
    return out


def test_reuse_is_scan_resistant():
    """A working set of 64 experts per token over 62 slots: LRU evicts what the next visit needs and never hits;
    the default keeps a stable resident set and misses about what Belady misses."""
    assert sum(cyclic_hits("lru")) == 0
    hits = cyclic_hits(DEFAULT_POLICY)
    assert all(h >= 60 for h in hits[2:]), hits
    visits = [(layer, [0, 1]) for _ in range(40) for layer in range(32)]
    belady = sum(run_state("belady", visits, 62)[0])
    assert 40 * 64 - sum(hits) <= 1.3 * belady, (40 * 64 - sum(hits), belady)


def test_reuse_hint_is_scan_resistant():
    """The same working set as above: every expert is followed by itself (p = 1), so d decides, as in reuse."""
    hits = cyclic_hits("reuse-hint")
    assert all(h >= 60 for h in hits[2:]), hits


def two_layer_visits(tokens: int = 24) -> list[tuple[int, list[int]]]:
    """Layer 0 cycles over 4 experts; layer 1 keeps an expert for two tokens, then switches (A A B B ...)."""
    return [(layer, [(t % 4, t // 2 % 2)[layer]]) for t in range(tokens) for layer in (0, 1)]


def test_reuse_hint_avoids_misses_lru_and_reuse_take():
    """With 3 slots for 6 experts, layer 0's misses must evict: LRU and reuse evict by age, which cannot tell
    the layer-1 expert that comes back next token from the one that does not; the next-token table can (after A
    A, it has seen B follow A), and the hint policy misses exactly what Belady misses."""
    visits = two_layer_visits()
    misses = {p: sum(run_state(p, visits, 3)[0]) for p in ("lru", "reuse", "reuse-hint", "belady")}
    assert misses == {"lru": 36, "reuse": 30, "reuse-hint": 26, "belady": 26}


def test_reuse_hint_learns_the_next_token_table():
    """p(key) = mean over the latest sweep's experts s at key's layer of follow[s][e] / uses[s]."""
    policy = make_policy("reuse-hint")
    for now, experts in enumerate([[0, 1], [0, 2], [1, 2], [0, 1]]):  # one layer, one sweep per visit
        policy.on_visit(0, now)
        for e in experts:
            policy.on_insert((0, e), now)
            policy.on_access((0, e), now)
    # uses: 0 x3, 1 x3, 2 x2; the sweeps after those using 0 used {0, 2} and {1, 2}; after 1: {0, 2}, {0, 1}
    assert policy.follow[(0, 0)] == {0: 1, 1: 1, 2: 2} and policy.follow[(0, 1)] == {0: 2, 1: 1, 2: 1}
    assert policy.uses[(0, 0)] == 3 and policy.uses[(0, 2)] == 2
    assert policy.hint((0, 2)) == (2 / 3 + 1 / 3) / 2  # the latest sweep used 0 and 1
    assert policy.hint((0, 0)) == (1 / 3 + 2 / 3) / 2
    assert policy.hint((1, 0)) is None  # a layer never run: reuse's estimate


def test_default_policy_is_online_and_registered():
    assert DEFAULT_POLICY == "reuse" and POLICIES[DEFAULT_POLICY].online
    assert "belady" not in ONLINE_POLICIES and set(ONLINE_POLICIES) | {"belady"} == set(POLICIES)


def test_the_factory_checks_each_class_parameters(tmp_path):
    with pytest.raises(ConfigError, match="'reuse' takes no parameter 'weights'"):
        make_policy("reuse", weights="w.json")
    with pytest.raises(ConfigError, match="lru.*no parameter 'future'"):
        make_policy("lru", future=[])
    args = argparse.Namespace(policy="lru", policy_weights=tmp_path / "w.json")
    with pytest.raises(ConfigError, match="--policy-weights is for --policy hobbit, not lru"):
        policy_from_args(args)
    save_hobbit_weights(tmp_path / "hobbit-weights.json", HobbitWeights(1, 0, 0, 0))
    beside = policy_from_args(argparse.Namespace(policy="hobbit", policy_weights=None), tmp_path)
    assert beside.weights == HobbitWeights(1, 0, 0, 0)
    assert policy_from_args(argparse.Namespace(policy="hobbit", policy_weights=None)).weights == HobbitWeights()
    assert isinstance(policy_from_args(argparse.Namespace(policy="reuse", policy_weights=None)), ReusePolicy)


@settings(max_examples=60, deadline=None)
@given(case=visit_traces(max_layers=3, max_experts=6, max_visits=60))
def test_reuse_array_victim_equals_scoring_each_candidate(case):
    """`ReusePolicy.victim` (arrays) picks what scoring each candidate by `estimate` picks, at every eviction."""
    visits, capacity, _ = case
    policy = make_policy("reuse")
    state = ExpertCacheState(capacity, policy)
    for now, (layer, experts) in enumerate(visits):
        candidates = list(state.resident)
        if candidates:
            assert policy.victim(candidates, now) == policy.victim_by_estimate(candidates, now)
        state.access(layer, experts, now)
        state.end_visit(layer, experts)
