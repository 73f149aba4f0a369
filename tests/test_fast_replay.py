"""The compiled replay (`trace.fast_replay`) against the Python policy classes driving `ExpertCacheState`:
the same decision at every access, on random traces and on a slice of the real DeepSeek-V2-Lite trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from expertyard.errors import ConfigError
from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.policies import BeladyPolicy, make_policy
from expertyard.trace import Trace
from expertyard.trace.fast_replay import FREE, HIT, KERNELS, fast_replay
from expertyard.trace.fit_hobbit import split_at_sequence, slice_trace
from expertyard.trace.simulate import capacity_for, schedule, simulate, visits


def shared_dir() -> Path | None:
    """../shared beside the checkout (a worktree's or the main one's), else /work/shared."""
    here = Path(__file__).resolve().parents[1]
    for cand in (here / ".." / "shared", here.parents[1] / "shared", Path("/work/shared")):
        if (cand / "data").is_dir():
            return cand
    return None


SHARED = shared_dir()
DEEPSEEK = SHARED / "data" / "traces" / "deepseek-v2-lite.prefill.a.npz" if SHARED else None
needs_deepseek = pytest.mark.skipif(DEEPSEEK is None or not DEEPSEEK.is_file(),
                                    reason="needs ../shared/data/traces/deepseek-v2-lite.prefill.a.npz")


def skewed_trace(tokens=120, layers=4, experts=16, k=3, seqs=5, seed=0) -> Trace:
    """Zipf-like routing with per-sequence favourites: reuse at every distance, ties in every policy."""
    rng = np.random.default_rng(seed)
    starts = np.r_[0, np.sort(rng.choice(np.arange(1, tokens), seqs - 1, replace=False))]
    ids = np.empty((tokens, layers, k), np.int64)
    for t in range(tokens):
        favour = rng.permutation(experts) if t in starts else favour
        p = 1.0 / np.arange(1, experts + 1)
        for li in range(layers):
            ids[t, li] = favour[rng.choice(experts, k, replace=False, p=p / p.sum())]
    return Trace(ids, np.full((tokens, layers, k), np.nan, np.float32), starts, experts, "toy", "test", "prefill")


def python_log(trace: Trace, policy: str, capacity: int, batch_size: int) -> list[int]:
    """Per access, as `fast_replay` logs it: HIT, FREE or the evicted key (layer * E + expert), from the Python
    classes and `ExpertCacheState` (the engine's bookkeeping), visit by visit as `simulate.visit` makes them."""
    E, k = trace.num_experts, trace.top_k
    pol = (BeladyPolicy([(lay, ex) for lay, ex, _, _ in visits(trace, batch_size)]) if policy == "belady"
           else make_policy(policy))
    state = ExpertCacheState(capacity, pol)
    out = []
    for now, (layer, experts, _, tokens) in enumerate(visits(trace, batch_size)):
        room = capacity if tokens * k > capacity else len(experts)
        for g in range(0, len(experts), room):
            group = list(dict.fromkeys(experts[g:g + room]))
            before = set(state.resident)
            loads = iter(state.access(layer, group, now))
            for e in group:
                if (layer, e) in before:
                    out.append(HIT)
                else:
                    load = next(loads)
                    assert load.key == (layer, e)
                    out.append(FREE if load.evicted is None else load.evicted[0] * E + load.evicted[1])
            state.end_visit(layer, group)
    return out


def _check(trace: Trace, policy: str, capacity: int, batch_size: int) -> None:
    (hits, misses, _, _), (_, _, log) = fast_replay(trace, policy, capacity, batch_size, schedule, log=True)
    ref = python_log(trace, policy, capacity, batch_size)
    assert log.tolist() == ref
    assert hits == ref.count(HIT) and misses == len(ref) - hits


@pytest.mark.parametrize("policy", sorted(KERNELS))
@pytest.mark.parametrize("capacity,batch_size", [(3, 1), (10, 1), (29, 1), (5, 3), (24, 2)])
def test_compiled_replay_makes_the_python_decisions(policy, capacity, batch_size):
    _check(skewed_trace(seed=capacity), policy, capacity, batch_size)


@needs_deepseek
@pytest.mark.parametrize("policy", sorted(KERNELS))
def test_compiled_replay_matches_python_on_the_real_trace(policy):
    from expertyard.trace import load_trace

    trace = load_trace(DEEPSEEK).head(120)
    for fraction in (0.1, 0.5):
        _check(trace, policy, capacity_for(trace, cache_fraction=fraction), 1)
    _check(trace.head(40), policy, 100, 4)


def test_simulate_uses_the_compiled_replay_with_identical_counters():
    trace = skewed_trace(seed=3)
    for policy in KERNELS:
        assert simulate(trace, policy, 11) == simulate(trace, policy, 11, fast=False)
    with pytest.raises(ConfigError, match="compiled replay"):
        simulate(trace, "hobbit", 11, fast=True)


@needs_deepseek
def test_reuse_and_reuse_hint_against_lru_on_either_half():
    """Belady <= reuse-hint < reuse (the default) < LRU at 10/25/50% on the start of each half of the real trace."""
    from expertyard.trace import load_trace

    full = load_trace(DEEPSEEK)
    cut = split_at_sequence(full, 0.5)
    for part in (slice_trace(full, 0, cut).head(3000), slice_trace(full, cut, full.num_tokens).head(3000)):
        for fraction in (0.1, 0.25, 0.5):
            c = capacity_for(part, cache_fraction=fraction)
            hint, reuse, lru, bound = (simulate(part, p, c).misses for p in ("reuse-hint", "reuse", "lru", "belady"))
            assert bound <= hint < reuse < lru, (fraction, hint, reuse, lru, bound)
