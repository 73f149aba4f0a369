"""HOBBIT's cache policy (against a naive float64 re-derivation of its priority), its weights file, the
mixed-precision replay and the weight fit, and the `simulate` flags that expose them."""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.entrypoints.cli import main
from expertyard.errors import ConfigError
from expertyard.experts import precision
from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.mixed_cache import MixedPrecisionCache
from expertyard.experts.policies import (CachePolicy, HobbitPolicy, HobbitWeights, load_hobbit_weights, make_policy,
                                         save_hobbit_weights)
from expertyard.experts.policies import hobbit as hobbit_module
from expertyard.experts.precision import FULL, LOW, SKIP, PrecisionThresholds
from expertyard.trace import Trace, save_trace
from expertyard.trace.fit_hobbit import fit, grid, moves, slice_trace, split_at_sequence, to_weights
from expertyard.experts.offload.budget import split_pools
from expertyard.trace.mixed_simulate import byte_ratio, simulate_mixed, standin_weights, trace_levels
from expertyard.trace.simulate import Predictions, SimulationError, simulate

from test_trace_simulate import random_trace


# ---- the policy against a naive reference -------------------------------------------------------------------
class NaiveHobbit(CachePolicy):
    """The module docstring's definitions, in dicts and Python floats, recomputed for every candidate."""

    def __init__(self, w: HobbitWeights):
        self.w, self.last, self.count, self.full = w, {}, {}, {}
        self.layers, self.current, self.requests_seen = set(), None, False

    def _see(self, key):
        self.layers.add(key[0])

    def on_request(self, key, level, now):
        self._see(key)
        self.requests_seen = True
        self.count[key] = self.count.get(key, 0) + 1
        self.full[key] = self.full.get(key, 0) + (level == FULL)
        self.current = key[0]

    def on_access(self, key, now):
        self._see(key)
        self.last[key] = now
        self.current = key[0]
        if not self.requests_seen:
            self.count[key] = self.count.get(key, 0) + 1

    def on_insert(self, key, now):
        self._see(key)
        self.last[key] = now

    def on_sequence_start(self):
        self.count, self.full = {}, {}

    def priority(self, key, candidates, now) -> float:
        w = self.w
        span = float(now - min(self.last[c] for c in candidates) + 1)
        rec = 1.0 - (now - self.last[key]) / span
        freq = self.count.get(key, 0) / float(max([1, *self.count.values()]))
        high = self.full.get(key, 0) / max(self.count.get(key, 0), 1)
        layers = sorted(self.layers)
        n = len(layers)
        cur = -1 if self.current is None else layers.index(self.current)
        d = (layers.index(key[0]) - cur - 1) % n
        return w.lru * rec + w.lfu * freq + w.lhu * high + w.fld * (1.0 - d / n)

    def victim(self, candidates, now):
        candidates = list(candidates)
        return min(candidates, key=lambda k: (self.priority(k, candidates, now), self.last[k], k))


class Checked(CachePolicy):
    """Feeds every hook to the policy and to the reference; each victim must agree."""

    def __init__(self, w):
        self.real, self.ref, self.victims = HobbitPolicy(w), NaiveHobbit(w), 0

    def _both(self, name, *a):
        getattr(self.real, name)(*a)
        getattr(self.ref, name)(*a)

    def on_request(self, key, level, now):
        self._both("on_request", key, level, now)

    def on_access(self, key, now):
        self._both("on_access", key, now)

    def on_insert(self, key, now):
        self._both("on_insert", key, now)

    def on_evict(self, key):
        self._both("on_evict", key)

    def on_sequence_start(self):
        self._both("on_sequence_start")

    def victim(self, candidates, now):
        candidates = list(candidates)
        got, want = self.real.victim(candidates, now), self.ref.victim(candidates, now)
        assert got == want, (got, want, now)
        self.victims += 1
        return got


weight_values = st.sampled_from([0.0, 0.0, 0.1, 0.25, 1 / 3, 0.5, 1.0, 0.7])


@st.composite
def hobbit_runs(draw):
    w = draw(st.tuples(weight_values, weight_values, weight_values, weight_values).filter(lambda t: sum(t) > 0))
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(2, 12))
    k = draw(st.integers(1, min(3, experts)))
    visits = []
    for _ in range(draw(st.integers(1, 30))):
        new_seq = draw(st.booleans()) and draw(st.booleans())
        for layer in range(layers):
            es = draw(st.lists(st.integers(0, experts - 1), min_size=1, max_size=k, unique=True))
            visits.append((layer, [(e, draw(st.sampled_from([FULL, LOW, SKIP]))) for e in es], new_seq and not layer))
    high = draw(st.integers(k, max(k, layers * experts)))
    low = draw(st.integers(k, max(k, layers * experts)))
    return HobbitWeights(*w), visits, high, low


@settings(max_examples=150, deadline=None)
@given(hobbit_runs())
def test_hobbit_victims_match_a_naive_float64_reference(run):
    """Both pools of a mixed cache (requests with levels) and a plain full-precision cache (accesses only)."""
    w, visits, high, low = run
    cache = MixedPrecisionCache(high, Checked(w), low, Checked(w))
    plain = ExpertCacheState(high, Checked(w))
    for now, (layer, pairs, new_seq) in enumerate(visits):
        if new_seq:
            for policy in (cache.high.policy, cache.low.policy, plain.policy):
                policy.on_sequence_start()
        plan = cache.access(layer, pairs, now)
        cache.end_visit(layer, plan)
        experts = list(dict.fromkeys(e for e, _ in pairs))
        plain.access(layer, experts, now)
        plain.end_visit(layer, experts)


def test_the_numpy_path_is_exercised_and_agrees():
    """More candidates than the Python path takes (`SMALL`), every term on."""
    rng = np.random.default_rng(0)
    w = HobbitWeights(0.3, 0.2, 0.4, 0.1)
    cache = MixedPrecisionCache(60, Checked(w), 60, Checked(w))
    for now in range(400):
        layer = now % 5
        es = rng.choice(30, 4, replace=False).tolist()
        if now % 97 == 0:
            cache.high.policy.on_sequence_start()
        plan = cache.access(layer, [(e, int(rng.integers(0, 3))) for e in es], now)
        cache.end_visit(layer, plan)
    assert cache.high.policy.victims > 50 and hobbit_module.SMALL < 60


def test_defaults_registry_and_levels_constant():
    p = make_policy("hobbit")
    assert isinstance(p, HobbitPolicy) and p.weights == HobbitWeights(0.25, 0.25, 0.25, 0.25)
    assert hobbit_module.FULL == precision.FULL  # the policy keeps its own copy (no torch import)
    assert make_policy("hobbit", weights=HobbitWeights(lfu=1, lru=0, lhu=0, fld=0)).weights.lfu == 1


def test_counters_are_per_sequence():
    p = HobbitPolicy(HobbitWeights(lru=0, lfu=1, lhu=0, fld=0))
    for now in range(5):
        p.on_request((0, 1), FULL, now)
        p.on_access((0, 1), now)
    p.on_request((0, 2), LOW, 5)
    p.on_access((0, 2), 5)
    assert p.victim([(0, 1), (0, 2)], 6) == (0, 2)  # 5 uses against 1
    p.on_sequence_start()
    assert p.max_count == 0 and not p.count.any() and not p.full.any()
    p.on_request((0, 2), LOW, 7)
    p.on_access((0, 2), 7)
    assert p.victim([(0, 1), (0, 2)], 8) == (0, 1)  # the old sequence's uses no longer count


def test_lru_weights_are_exactly_lru():
    t = random_trace(tokens=200, layers=4, experts=16, k=3, seqs=6, seed=3)
    for pred in (None, Predictions.oracle(2)):
        h = simulate(t, "hobbit", 16, pred, policy_kwargs={"weights": HobbitWeights(1, 0, 0, 0)})
        assert asdict(h) | {"policy": "lru"} == asdict(simulate(t, "lru", 16, pred))


# ---- weights file -------------------------------------------------------------------------------------------
def test_weights_file_round_trip(tmp_path):
    w = HobbitWeights(0.5, 0.125, 0.0, 0.375)
    save_hobbit_weights(tmp_path / "w.json", w, {"trace": "x"}, {"held_out": {"hobbit": 1.0}})
    assert load_hobbit_weights(tmp_path / "w.json") == w
    assert make_policy("hobbit", weights=str(tmp_path / "w.json")).weights == w
    assert json.loads((tmp_path / "w.json").read_text())["fitted_on"] == {"trace": "x"}


@pytest.mark.parametrize("content,match", [
    ("not json", "not a JSON"),
    ("[1, 2]", "JSON object"),
    ('{"policy": "lru", "weights": {}}', "key 'policy'"),
    ('{"policy": "hobbit"}', "key 'weights'"),
    ('{"policy": "hobbit", "weights": {"lru": 1, "lfu": 0, "lhu": 0}}', r"key 'weights\.fld' is missing"),
    ('{"policy": "hobbit", "weights": {"lru": 1, "lfu": 0, "lhu": 0, "fld": 0, "xyz": 1}}', r"'weights\.xyz'"),
    ('{"policy": "hobbit", "weights": {"lru": -1, "lfu": 0, "lhu": 0, "fld": 0}}', r"'weights\.lru'.*>= 0"),
    ('{"policy": "hobbit", "weights": {"lru": "a", "lfu": 0, "lhu": 0, "fld": 0}}', r"'weights\.lru'"),
    ('{"policy": "hobbit", "weights": {"lru": 0, "lfu": 0, "lhu": 0, "fld": 0}}', "all 0"),
])
def test_bad_weights_files_name_file_and_key(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        load_hobbit_weights(path)
    assert str(path) in str(e.value)


def test_missing_weights_file_and_bad_values():
    with pytest.raises(ConfigError, match="no such hobbit weights file"):
        load_hobbit_weights("/nonexistent/w.json")
    with pytest.raises(ConfigError, match="lhu=nan"):
        HobbitWeights(1, 0, float("nan"), 0)


# ---- mixed-precision replay ---------------------------------------------------------------------------------
def test_pool_sizes_and_byte_ratio():
    assert byte_ratio(4, 2048, 1408) == (0.28125, "packed int4 G64 layout, D=2048 I=1408")
    assert byte_ratio(4)[0] == 4.5 / 16 and byte_ratio(8)[0] == 8.5 / 16
    assert split_pools(16, 0.28125, 0.25, 4) == (12, 14) and split_pools(416, 0.28125, 0.25, 6) == (312, 369)
    with pytest.raises(ConfigError, match="must hold the 4 experts"):
        split_pools(5, 0.28125, 0.25, 4)
    with pytest.raises(ConfigError, match="--low-pool-fraction 1.0"):
        split_pools(16, 0.28, 1.0, 4)


def test_mixed_counters_count_every_request_once():
    t = random_trace(tokens=150, layers=3, experts=8, k=3, seqs=5, seed=1)
    levels, source = trace_levels(t, PrecisionThresholds())
    assert source == "trace gate weights" and set(np.unique(levels)) <= {FULL, LOW, SKIP}
    for policy in ("lru", "lfu", "hobbit", "belady"):
        r = simulate_mixed(t, levels, policy, 6, 7, 0.25, Predictions.oracle(1))
        assert r.requests == t.experts.size and r.visits == 150 * 3
        assert r.penalty == r.full_misses + 0.25 * r.low_misses
        assert r.skipped >= 0 and r.summary(0.28)["loads_per_token"] > 0
    a = simulate_mixed(t, levels, "lru", 6, 7, 0.25, Predictions.oracle(2), adaptive=True)
    b = simulate_mixed(t, levels, "lru", 6, 7, 0.25, Predictions.oracle(2))
    for r in (a, b):  # the oracle is never wrong, and a prefetch stays protected until its visit
        assert r.prefetches > 0 and r.prefetch_hits == r.prefetches
    assert a.prefetches != b.prefetches  # adaptive: a deeper layer only when the nearer one was all cached


def test_belady_bounds_lru_at_full_precision():
    t = random_trace(tokens=300, layers=4, experts=16, k=3, seqs=5, seed=7)
    for cap in (4, 16, 32):
        assert simulate(t, "belady", cap).misses <= min(simulate(t, p, cap).misses for p in ("lru", "hobbit"))


def test_standin_weights_are_seeded_rank_free_and_used_for_nan_traces():
    t = random_trace(tokens=100, layers=2, experts=16, k=4)
    w = standin_weights(t, seed=3)
    assert np.allclose(w.sum(-1), 1) and np.array_equal(w, standin_weights(t, seed=3))
    assert not np.array_equal(w, standin_weights(t, seed=4))
    assert (w[..., 0] == w.max(-1)).mean() < 0.5  # the top weight lands anywhere in the list
    window = slice_trace(t, int(t.seq_starts[2]), 100)  # a window gets the whole trace's stand-in draws
    np.testing.assert_array_equal(standin_weights(window, 3, offset=int(t.seq_starts[2])), w[t.seq_starts[2]:])
    t.weights[:] = np.nan
    levels, source = trace_levels(t, PrecisionThresholds(), seed=3)
    assert source.startswith("stand-in") and levels.shape == t.experts.shape
    t.weights[0, 0, 0] = 0.5
    with pytest.raises(ValueError, match="NaN for some pairs"):
        trace_levels(t, PrecisionThresholds())


# ---- the fit ------------------------------------------------------------------------------------------------
def test_grid_and_moves_stay_on_the_simplex():
    g = grid()
    assert len(g) == 35 and all(sum(p) == 16 and min(p) >= 0 for p in g)
    assert {(16, 0, 0, 0), (0, 16, 0, 0), (0, 0, 16, 0), (0, 0, 0, 16)} <= set(g)
    assert all(sum(q) == 16 and min(q) >= 0 for q in moves((14, 2, 0, 0), 2)) and len(moves((14, 2, 0, 0), 2)) == 6


def test_fit_finds_the_minimum_of_a_known_function():
    target = (2, 5, 0, 9)
    res = fit(lambda pts: [sum(abs(a - b) for a, b in zip(p, target)) for p in pts])
    assert res.best == target and res.penalty == 0


def cyclic_trace(tokens=240, seqs=2, seed=0) -> Trace:
    """Each layer draws its 2 experts from its own 3 (12 keys in a 4-layer cycle); equal gate weights (every
    pair FULL). With 6 full slots only keeping the next layers pays: layer distance is the term to use."""
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(3, 2, replace=False) + 3 * li for li in range(4)]) for _ in range(tokens)])
    starts = np.arange(seqs) * (tokens // seqs)
    return Trace(ex, np.full(ex.shape, 0.5, np.float32), starts, 12, "toy", "test", "prefill")


def test_fit_puts_the_weight_on_layer_distance_for_a_cyclic_sweep():
    t = cyclic_trace()
    levels, _ = trace_levels(t, PrecisionThresholds())
    assert (levels == FULL).all()
    split = split_at_sequence(t, 0.5)
    cal, lv = slice_trace(t, 0, split), levels[:split]

    def penalties(points):
        return [simulate_mixed(cal, lv, "hobbit", 6, 4, 0.25, policy_kwargs={"weights": to_weights(p)}).penalty
                for p in points]

    res = fit(penalties, rounds=2)
    assert res.weights.fld >= 0.5, res.weights
    assert res.penalty <= min(res.single_terms().values())
    assert res.single_terms()["fld"] < res.single_terms()["lru"]


# ---- commands -----------------------------------------------------------------------------------------------
def test_simulate_precision_full_is_todays_simulate(tmp_path, capsys):
    """Counters recorded with the simulator before mixed precision existed (same trace, 16 slots)."""
    t = random_trace(tokens=200, layers=4, experts=16, k=3, seqs=6, seed=3)
    before = {("lru", 1, False): (448, 1952, 0, 0, 0, 0), ("lru", 1, True): (1894, 506, 1497, 1497, 0, 1497),
              ("lru", 3, False): (23, 2031, 0, 0, 0, 0), ("lfu", 1, False): (473, 1927, 0, 0, 0, 0),
              ("lfu", 1, True): (1840, 560, 1446, 1446, 0, 1446), ("lfu", 3, False): (250, 1804, 0, 0, 0, 0),
              # layer-distance measures from the layer of the visit (`on_visit`), no longer from the previous one
              ("layer-distance", 1, False): (608, 1792, 0, 0, 0, 0),
              ("layer-distance", 3, False): (353, 1701, 0, 0, 0, 0), ("belady", 1, False): (1223, 1177, 0, 0, 0, 0),
              ("belady", 1, True): (2002, 398, 902, 902, 0, 902), ("belady", 3, False): (762, 1292, 0, 0, 0, 0)}
    for (policy, batch, oracle), want in before.items():
        r = simulate(t, policy, 16, Predictions.oracle(2) if oracle else None, batch)
        assert (r.hits, r.misses, r.prefetches, r.prefetch_hits, r.wasted_prefetches, r.prefetch_hits_on_time) == want
    save_trace(tmp_path / "t.npz", t)
    args = ["simulate", "--trace", str(tmp_path / "t.npz"), "--cache-experts", "16", "--policy", "lru", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--precision", "full"]) == 0
    assert json.loads(capsys.readouterr().out) == plain and plain["result"]["misses"] == 1952


def test_simulate_mixed_fit_and_policy_weights_commands(tmp_path, capsys):
    t = random_trace(tokens=160, layers=4, experts=16, k=2, seqs=4, seed=2)
    save_trace(tmp_path / "t.npz", t)
    base = ["simulate", "--trace", str(tmp_path / "t.npz")]
    assert main(base + ["--precision", "mixed", "--cache-experts", "12", "--predictor", "oracle", "--policy", "lru",
                        "--adaptive-prefetch", "--json"]) == 0
    o = json.loads(capsys.readouterr().out)
    run, bound = o["runs"]
    assert (run["policy"], run["adaptive"], bound["policy"]) == ("lru", True, "belady")
    assert run["requests"] == t.experts.size and (run["high_slots"], run["low_slots"]) == (9, 10)
    assert run["miss_penalty"] == run["full_misses"] + 0.25 * run["low_misses"] and o["byte_ratio"] == 4.5 / 16
    out = tmp_path / "w.json"
    assert main(base + ["--precision", "mixed", "--cache-experts", "12", "--fit-weights", str(out),
                        "--calibration-fraction", "0.5", "--json"]) == 0
    o = json.loads(capsys.readouterr().out)
    w = load_hobbit_weights(out)
    assert w.as_dict() == o["weights"] and set(o["held_out"]) == {"lru", "lfu", "hobbit", "belady"}
    assert o["calibration"]["hobbit_fitted"] <= min(o["calibration"]["single_term"].values())
    doc = json.loads(out.read_text())
    assert doc["fitted_on"]["calibration_tokens"] == o["calibration_tokens"] and "held_out" in doc["miss_penalty"]
    assert main(base + ["--cache-experts", "12", "--policy", "hobbit", "--policy-weights", str(out)]) == 0
    assert "hobbit" in capsys.readouterr().out
    assert main(base + ["--precision", "mixed", "--sweep"]) == 0
    table = capsys.readouterr().out
    assert table.count("hobbit ") == 3 and "penalty/tok" in table


@pytest.mark.parametrize("argv,match", [
    (["--cache-experts", "6", "--policy", "hobbit", "--policy-weights", "{bad}"], r"bad\.json: key 'policy'"),
    (["--cache-experts", "6", "--policy", "lru", "--policy-weights", "{good}"], "is for --policy hobbit"),
    (["--cache-experts", "6", "--precision", "mixed", "--batch-size", "2"], "one token at a time"),
    (["--cache-experts", "2", "--precision", "mixed"], "each pool must hold the 2 experts"),
    (["--cache-experts", "6", "--precision", "mixed", "--precision-thresholds", "0.9,0.1"], "T1 <= T2"),
    (["--sweep", "--precision", "mixed", "--fit-weights", "{out}"], "fits at one cache size"),
    (["--cache-experts", "6", "--start-token", "1"], "--start-token 1 is not the first token"),
])
def test_mixed_errors_are_messages(tmp_path, capsys, argv, match):
    save_trace(tmp_path / "t.npz", random_trace())
    (tmp_path / "bad.json").write_text('{"policy": "lfu"}')
    save_hobbit_weights(tmp_path / "good.json", HobbitWeights())
    argv = [a.format(bad=tmp_path / "bad.json", good=tmp_path / "good.json", out=tmp_path / "o.json") for a in argv]
    assert main(["simulate", "--trace", str(tmp_path / "t.npz"), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_the_bundled_models_fitted_weights_load():
    from expertyard.entrypoints.common import bundled_model_path

    w = load_hobbit_weights(bundled_model_path() / "hobbit-weights.json")
    assert abs(sum(w.as_tuple()) - 1) < 1e-9


def test_adaptive_prefetch_at_full_precision():
    t = random_trace(tokens=200, layers=4, experts=16, k=3, seqs=6, seed=3)
    a = simulate(t, "lru", 16, Predictions.oracle(2), adaptive=True)
    b = simulate(t, "lru", 16, Predictions.oracle(2))
    assert a.prefetches > 0 and a.prefetch_hits == a.prefetches and a.visits == b.visits
    assert a.prefetches != b.prefetches
