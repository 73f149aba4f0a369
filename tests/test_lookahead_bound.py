"""The lookahead oracle of `trace.fast_replay` (Belady within the next W visits, `reuse` beyond them) against a
naive re-derivation: `ReusePolicy` (the Python reference) driving `ExpertCacheState`, with a victim rule that
scans the future visits for each candidate's next use. W = 0 is reuse, W = inf misses what Belady misses."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from test_fast_replay import DEEPSEEK, needs_deepseek, skewed_trace

from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.policies.reuse import ReusePolicy
from expertyard.trace import save_trace
from expertyard.trace.fast_replay import FREE, HIT, fast_replay
from expertyard.trace.simulate import capacity_for, schedule, visits


class NaiveLookahead(ReusePolicy):
    """Evict by (known, next use) within the window, else by reuse's (estimate, oldest touch, smallest key);
    every known candidate stays before every unknown one. Ties among known ones: the oldest insertion (the
    first in the cache's resident order, as `BeladyPolicy`'s `max`)."""

    def __init__(self, future: list[tuple[int, set[int]]], window: float):
        super().__init__()
        self.future, self.window = future, window

    def next_use(self, key, now: int) -> int | None:
        end = len(self.future) if self.window == math.inf else min(len(self.future), now + int(self.window) + 1)
        for u in range(now + 1, end):
            if self.future[u][0] == key[0] and key[1] in self.future[u][1]:
                return u
        return None

    def victim(self, candidates, now):
        def rank(item):
            i, k = item
            u = self.next_use(k, now)
            if u is not None:
                return (0, u, -i)
            return (1, self.estimate(k), -int(self.touched.now[self.touched.row[k]]), -k[0], -k[1])

        return max(enumerate(candidates), key=rank)[1]


def naive_log(trace, capacity: int, window: float) -> list[int]:
    """Per access (batch 1): HIT, FREE or the evicted key, as `fast_replay` logs it."""
    E = trace.num_experts
    steps = [(layer, experts) for layer, experts, _, _ in visits(trace, 1)]
    state = ExpertCacheState(capacity, NaiveLookahead([(layer, set(g)) for layer, g in steps], window))
    out = []
    for now, (layer, group) in enumerate(steps):
        before = set(state.resident)
        loads = iter(state.access(layer, group, now))
        for e in group:
            if (layer, e) in before:
                out.append(HIT)
            else:
                ev = next(loads).evicted
                out.append(FREE if ev is None else ev[0] * E + ev[1])
        state.end_visit(layer, group)
    return out


def kernel_log(trace, policy: str, capacity: int, window: float | None = None, batch_size: int = 1):
    (hits, misses, _, _), (_, _, log) = fast_replay(trace, policy, capacity, batch_size, schedule, log=True,
                                                    lookahead=window)
    return hits, misses, log.tolist()


@pytest.mark.parametrize("capacity", [3, 10, 29])
@pytest.mark.parametrize("window", [0, 1, 2, 4, 9, math.inf])
def test_kernel_makes_the_naive_decisions(capacity, window):
    trace = skewed_trace(seed=capacity)  # 4 layers: W = 4 knows the next token
    assert kernel_log(trace, "reuse", capacity, window)[2] == naive_log(trace, capacity, window)


@pytest.mark.parametrize("capacity,batch_size", [(3, 1), (10, 1), (29, 1), (5, 3), (24, 2)])
def test_no_lookahead_is_reuse_and_an_unbounded_one_misses_what_belady_misses(capacity, batch_size):
    trace = skewed_trace(seed=capacity)
    if batch_size == 1:  # batched, a visit split in groups knows its own later groups at W = 0
        assert kernel_log(trace, "reuse", capacity, 0) == kernel_log(trace, "reuse", capacity)
    belady = kernel_log(trace, "belady", capacity, batch_size=batch_size)[1]
    assert kernel_log(trace, "reuse", capacity, math.inf, batch_size)[1] == belady
    for w in (1, 4, 40):  # and any window misses at least as many as Belady
        assert kernel_log(trace, "reuse", capacity, w, batch_size)[1] >= belady


@needs_deepseek
def test_on_the_real_trace():
    from expertyard.trace import load_trace

    trace = load_trace(DEEPSEEK, hidden=False).head(120)
    for fraction in (0.1, 0.5):
        c = capacity_for(trace, cache_fraction=fraction)
        assert kernel_log(trace, "reuse", c, 0) == kernel_log(trace, "reuse", c)
        assert kernel_log(trace, "reuse", c, math.inf)[1] == kernel_log(trace, "belady", c)[1]
    short = trace.head(30)
    assert kernel_log(short, "reuse", 166, 26)[2] == naive_log(short, 166, 26)


def test_script_prints_the_table(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lookahead_bound.py"
    spec = importlib.util.spec_from_file_location("lookahead_bound", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    save_trace(tmp_path / "t.npz", skewed_trace(seed=1))
    script.main(["--trace", str(tmp_path / "t.npz"), "--windows", "0,4,inf", "--fractions", "0.25,0.5",
                 "--json", str(tmp_path / "out.json")])
    table = capsys.readouterr().out
    assert "| inf (Belady) | 1.000 (" in table and "16 slots" in table
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["window"] for r in rows] == ["0 (reuse)", "4", "inf (Belady)"] * 2
    assert all(r["ratio"] >= 1 for r in rows)
