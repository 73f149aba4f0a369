"""Token-level precision (HOBBIT) and the two-pool cache: the device rule against a float64 re-derivation, the
host rule against the device rule, adaptive prefetch."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.errors import ConfigError
from expertyard.experts.mixed_cache import HIGH_POOL, LOW_POOL, MixedPrecisionCache, adaptive_prefetch
from expertyard.experts.policies import make_policy
from expertyard.experts.precision import FULL, LOW, SKIP, PrecisionThresholds, levels, pair_plan


def _levels_by_hand(w: list[float], t1: float, t2: float) -> tuple[list[int], list[float]]:
    """(level, score) per column, in float64."""
    total = sum(w)
    order = sorted(range(len(w)), key=lambda k: -w[k])  # stable: ties keep column order
    out, scores, above = [0] * len(w), [0.0] * len(w), 0.0
    for k in order:
        out[k] = FULL if above <= t1 else LOW if above <= t2 else SKIP
        scores[k] = above
        above += w[k] / total
    return out, scores


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 1.0), min_size=2, max_size=8).map(tuple), min_size=1, max_size=6),
       st.floats(0, 1), st.floats(0, 1))
def test_levels_match_a_float64_rederivation(rows, a, b):
    k = min(len(r) for r in rows)
    w = torch.tensor([r[:k] for r in rows], dtype=torch.float32)  # the weights a router hands over
    t1, t2 = min(a, b), max(a, b)
    got = levels(w, PrecisionThresholds(t1, t2)).tolist()
    for row, lv in zip(w.tolist(), got):  # the same float32 weights, ranked and summed in float64
        want, scores = _levels_by_hand(row, t1, t2)
        for x, y, score in zip(lv, want, scores):
            if x != y:  # float32 sums may land on the other side of a threshold only within rounding of it
                assert min(abs(score - t1), abs(score - t2)) < 1e-5


def test_top1_is_never_skipped_and_defaults_are_hobbits():
    th = PrecisionThresholds()
    assert (th.full, th.low) == (0.6, 0.9)
    w = torch.tensor([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.34, 0.33, 0.33]])
    assert levels(w, th).tolist() == [[FULL, SKIP, SKIP], [FULL, FULL, LOW], [FULL, FULL, LOW]]


@pytest.mark.parametrize("text", ["0.9,0.6", "0.5", "a,b", "-0.1,0.5", "0.5,1.5"])
def test_bad_thresholds_name_the_value(text):
    with pytest.raises(ConfigError, match="thresholds"):
        PrecisionThresholds.parse(text)


def test_pair_plan_serves_resident_copies_skips_and_renormalises():
    ids = torch.tensor([[0, 1, 2], [3, 2, 1]])
    w = torch.tensor([[0.5, 0.3, 0.2], [0.96, 0.03, 0.01]])  # levels: [F, F, L], [F, S, S]
    high = torch.tensor([-1, 4, -1, -1], dtype=torch.int32)  # expert 1 in the full pool, slot 4
    low = torch.tensor([-1, -1, 7, -1], dtype=torch.int32)  # expert 2 in the low pool, slot 7
    plan = pair_plan(ids, w, high, low, PrecisionThresholds())
    assert plan.high_slots.tolist() == [[-1, 4, -1], [-1, -1, 4]]
    assert plan.low_slots.tolist() == [[-1, -1, 7], [-1, 7, -1]]
    # row 1: expert 3 misses (full), expert 2 is served low, expert 1 is resident at full precision: nothing skipped
    torch.testing.assert_close(plan.weights, w)
    high[1] = -1  # now row 1's expert 1 (level SKIP) has no copy: skipped, the others scaled back to sum 1
    plan = pair_plan(ids, w, high, low, PrecisionThresholds())
    torch.testing.assert_close(plan.weights[1], torch.tensor([0.96, 0.03, 0.0]) / 0.99)
    assert plan.low_slots[0, 2] == 7 and plan.high_slots[0, 1] == -1  # row 0's expert 1 (FULL) now misses


def _cache(high=4, low=4, policy="lru"):
    return MixedPrecisionCache(high, make_policy(policy), low, make_policy(policy))


def test_access_rules_per_expert():
    cache = _cache()
    plan = cache.access(0, [(0, FULL), (1, LOW), (2, SKIP), (1, SKIP)], now=0)
    assert [(p.pool, p.load.key) for p in plan.loads] == [(HIGH_POOL, (0, 0)), (LOW_POOL, (0, 1))]
    assert plan.skipped == [2]
    assert plan.miss_source == {0: (HIGH_POOL, plan.loads[0].load.slot), 1: (LOW_POOL, plan.loads[1].load.slot)}
    cache.end_visit(0, plan)
    # expert 1 is low-resident: a LOW pair hits it; a FULL pair loads the full copy
    plan = cache.access(0, [(1, LOW)], now=1)
    assert plan.loads == [] and plan.miss_source == {}
    cache.end_visit(0, plan)
    plan = cache.access(0, [(1, FULL), (1, LOW), (0, SKIP)], now=2)
    assert [(p.pool, p.load.key) for p in plan.loads] == [(HIGH_POOL, (0, 1))]
    assert plan.low_used == [1] and sorted(plan.high_used) == [0, 1]
    cache.end_visit(0, plan)
    c = cache.counters
    assert (c.full_hits, c.low_hits, c.full_misses, c.low_misses, c.skipped) == (1, 1, 2, 1, 1)
    assert c.miss_penalty(0.25) == 2.25


def _device_served(ids, w, cache, layer, th):
    """Which pairs the device plan serves, skips or leaves to the host, from the cache's residency."""
    e = int(ids.max()) + 1
    high = torch.full((e,), -1, dtype=torch.int32)
    low = torch.full((e,), -1, dtype=torch.int32)
    for (l, x), s in cache.high.resident.items():
        if l == layer and x < e:
            high[x] = s
    for (l, x), s in cache.low.resident.items():
        if l == layer and x < e:
            low[x] = s
    return pair_plan(ids, w, high, low, th)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_every_pair_is_computed_exactly_once_from_a_copy_it_accepts(seed):
    """Random visits: the device plan and the host plan together give each pair exactly one source (or a skip),
    a FULL pair is never served by a low copy, and a skip only happens where the pair is SKIP and no copy was
    resident."""
    g = torch.Generator().manual_seed(seed)
    th = PrecisionThresholds()
    cache = _cache(high=6, low=6)
    for now in range(12):
        layer = now % 3
        ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(2)])  # [T=2, K=3]
        w = torch.rand(2, 3, generator=g) ** 3 + 1e-3
        plan_dev = _device_served(ids, w, cache, layer, th)
        pairs = list(zip(ids.flatten().tolist(), plan_dev.level.flatten().tolist()))
        plan = cache.access(layer, pairs, now)
        for (t, k) in itertools.product(range(2), range(3)):
            e, lv = int(ids[t, k]), int(plan_dev.level[t, k])
            served_high, served_low = plan_dev.high_slots[t, k] >= 0, plan_dev.low_slots[t, k] >= 0
            skipped = plan_dev.weights[t, k] == 0
            missed = not (served_high or served_low or skipped)
            assert served_high + served_low + skipped + missed == 1
            assert (t * 3 + k in plan.missed_pairs) == missed  # the host's mirror of the device plan
            if missed:
                pool, slot = plan.miss_source[e]
                assert slot == cache.pools[pool].slot_of((layer, e))
                assert lv == LOW or pool == HIGH_POOL
            if served_low:
                assert lv != FULL
            if skipped:
                assert lv == SKIP
        cache.end_visit(layer, plan)


def test_adaptive_prefetch_goes_deeper_only_while_predictions_are_cached():
    cache = _cache(high=4, low=4)
    plan = cache.access(1, [(0, FULL), (1, FULL)], now=0)
    cache.end_visit(1, plan)
    loads = adaptive_prefetch(cache, [(1, [0, 1]), (2, [5]), (3, [6])], now=1)  # layer 1 cached: go to layer 2
    assert [(p.pool, p.load.key) for p in loads] == [(LOW_POOL, (2, 5))]
    loads = adaptive_prefetch(cache, [(2, [5]), (3, [6, 7])], now=2)
    assert [p.load.key for p in loads] == [(3, 6), (3, 7)]
    assert adaptive_prefetch(cache, [(2, [5]), (3, [6, 7])], now=3) == []
