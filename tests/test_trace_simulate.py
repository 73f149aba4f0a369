"""Routing traces: the npz format, recording from the engine (checked against transformers' routers), replay
through the engine's cache bookkeeping, and the `trace` / `simulate` commands."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.entrypoints.cli import main
from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.policies import make_policy
from expertyard.loader import load_model
from expertyard.trace import Trace, TraceError, load_trace, save_trace
from expertyard.trace.record import RecordingBackend, record_documents, split_documents
from expertyard.trace.simulate import (Predictions, SimulationError, capacity_for, schedule, simulate, visit,
                                       visits)

from conftest import SHARED

DEEPSEEK = next((d / "data" / "traces" / "deepseek-v2-lite.prefill.a.npz" for d in (
    SHARED, Path(__file__).resolve().parents[1] / ".." / "shared", Path("/work/shared"))
    if (d / "data" / "traces" / "deepseek-v2-lite.prefill.a.npz").is_file()), SHARED / "data" / "traces" / "none")


def random_trace(tokens=60, layers=3, experts=8, k=2, seqs=4, hidden=None, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    starts = np.sort(rng.choice(np.arange(1, tokens), seqs - 1, replace=False))
    h = rng.standard_normal((tokens, layers, hidden)).astype(np.float16) if hidden else None
    return Trace(ids, rng.random((tokens, layers, k), dtype=np.float32), np.r_[0, starts], experts, "toy", "test",
                 "prefill", h)


def _engine(path, max_model_len=128):
    loaded = load_model(path, "cpu", torch.float32, progress=False)
    return LLMEngine(loaded, None, EngineConfig(max_num_seqs=2, max_model_len=max_model_len, cuda_graphs=False),
                     eos_token_ids=set())


# ---- format -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [None, 16])
def test_trace_round_trip_keeps_exact_dtypes(tmp_path, hidden):
    t = random_trace(hidden=hidden)
    save_trace(tmp_path / "t.npz", t)
    with np.load(tmp_path / "t.npz") as z:
        dtypes = {k: z[k].dtype for k in z.files}
    assert dtypes["experts"] == np.int16 and dtypes["weights"] == np.float32 and dtypes["seq_starts"] == np.int64
    assert dtypes["num_experts"] == np.int64 and dtypes["model"].kind == "U"
    assert ("hidden" in dtypes) == bool(hidden) and dtypes.get("hidden", np.float16) == np.float16
    back = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.experts, t.experts)
    np.testing.assert_array_equal(back.weights, t.weights)
    np.testing.assert_array_equal(back.seq_starts, t.seq_starts)
    assert (back.num_experts, back.model, back.source, back.phase) == (8, "toy", "test", "prefill")
    if hidden:
        np.testing.assert_array_equal(back.hidden, t.hidden)
        assert load_trace(tmp_path / "t.npz", hidden=False).hidden is None


def _write(path: Path, **override):
    t = random_trace()
    arrays = dict(experts=t.experts, weights=t.weights, seq_starts=t.seq_starts, num_experts=np.int64(8),
                  model=np.str_("toy"), source=np.str_("test"), phase=np.str_("prefill"))
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize("key,value,match", [
    ("experts", None, "'experts' is missing"),
    ("seq_starts", None, "'seq_starts' is missing"),
    ("phase", None, "'phase' is missing"),
    ("experts", np.full((60, 3, 2), 9, np.int16), "'experts'.*0..num_experts-1=7"),
    ("experts", np.zeros((60, 3), np.int16), "'experts'.*\\[T, L, K\\]"),
    ("experts", np.zeros((60, 3, 2), np.float32), "'experts'.*integers"),
    ("weights", np.zeros((60, 3, 3), np.float32), "'weights'.*shape"),
    ("seq_starts", np.array([1, 5]), "'seq_starts'.*start at 0"),
    ("seq_starts", np.array([0, 7, 7]), "'seq_starts'.*increase"),
    ("num_experts", np.int64(0), "'num_experts'"),
    ("num_experts", np.array([8, 8]), "'num_experts'.*scalar"),
    ("phase", np.str_("train"), "'phase'.*prefill, decode"),
    ("hidden", np.zeros((60, 2, 4), np.float16), "'hidden'"),
])
def test_trace_validation_names_the_key(tmp_path, key, value, match):
    _write(tmp_path / "t.npz", **{key: value})
    with pytest.raises(TraceError, match=match):
        load_trace(tmp_path / "t.npz")


def test_unreadable_or_missing_trace_files(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not a readable"):
        load_trace(tmp_path / "junk.npz")


def test_head_cuts_tokens_and_sequences():
    t = random_trace(tokens=60, seqs=4)
    h = t.head(int(t.seq_starts[2]) + 1)
    assert h.num_tokens == t.seq_starts[2] + 1 and list(h.seq_starts) == list(t.seq_starts[:3])
    assert t.head(10**6) is t


# ---- replay -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3, 10])
def test_schedule_runs_every_token_once_in_sequence_order(batch):
    t = random_trace(tokens=50, seqs=7)
    steps = list(schedule(t, batch))
    flat = [tok for step in steps for tok in step]
    assert sorted(flat) == list(range(50)) and all(len(s) <= batch for s in steps)
    pos = {tok: i for i, step in enumerate(steps) for tok in step}
    for start, end in t.sequences():  # a sequence advances one token per step
        assert [pos[tok] for tok in range(start, end)] == list(range(pos[start], pos[start] + end - start))
    if batch == 1:
        assert steps == [[i] for i in range(50)]


def test_batched_visits_use_the_union_of_the_step_tokens():
    t = random_trace(tokens=30, seqs=5)
    steps = list(schedule(t, 3))
    vs = list(visits(t, 3))
    assert len(vs) == len(steps) * t.num_layers
    for i, step in enumerate(steps):
        for li in range(t.num_layers):
            layer, experts, _, tokens = vs[i * t.num_layers + li]
            assert layer == li and tokens == len(step)
            assert experts == list(dict.fromkeys(int(e) for tok in step for e in t.experts[tok, li]))


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_a_cache_holding_everything_misses_each_expert_once(policy):
    t = random_trace()
    distinct = len({(li, int(e)) for li in range(3) for e in np.unique(t.experts[:, li])})
    r = simulate(t, policy, capacity=3 * 8)
    assert r.misses == distinct and r.hits + r.misses == t.experts.size and r.visits == 60 * 3


def test_oracle_prefetch_is_exact_and_belady_bounds_demand_misses():
    t = random_trace(tokens=200, layers=4, experts=16, k=3, seed=3)
    cap = capacity_for(t, cache_fraction=0.25)
    base = {p: simulate(t, p, cap) for p in ("lru", "lfu", "belady")}
    assert base["belady"].misses <= min(base["lru"].misses, base["lfu"].misses)
    oracle = simulate(t, "lru", cap, Predictions.oracle(2))
    assert oracle.prefetches > 0 and oracle.prefetch_hits == oracle.prefetches  # never wrong, never evicted
    assert oracle.prefetch_hits_on_time == oracle.prefetches
    assert oracle.misses < base["lru"].misses
    for depth in (1, 2, 3):  # prefetching moves no fewer experts than Belady's demand misses
        for policy in ("lru", "lfu"):
            r = simulate(t, policy, cap, Predictions.oracle(depth))
            assert r.misses + r.prefetches >= base["belady"].misses
    s = oracle.summary(expert_bytes=100)
    assert s["prefetch_precision"] == 1.0 and s["bytes_per_token"] == 100 * (oracle.misses + oracle.prefetches) / 200


def test_capacity_validation():
    t = random_trace()
    assert capacity_for(t, cache_fraction=0.25) == 6 and capacity_for(t, cache_experts=5) == 5
    for kwargs, match in [(dict(cache_fraction=0.0), r"\(0, 1\]"), (dict(cache_fraction=1.5), r"\(0, 1\]"),
                          (dict(cache_experts=0), "1..24"), (dict(cache_experts=25), "1..24"),
                          ({}, "exactly one"), (dict(cache_experts=3, cache_fraction=0.5), "exactly one")]:
        with pytest.raises(ValueError, match=match):
            capacity_for(t, **kwargs)
    with pytest.raises(SimulationError, match="cannot hold the 2 experts"):
        simulate(t, "lru", capacity=1)


class LoggedPredictor:
    """Wraps an engine predictor and logs, per call, the keys the engine will prefetch (nearest layer first)."""

    def __init__(self, inner):
        self.inner, self.depth, self.keys = inner, inner.depth, []

    def predict(self, layer, x):
        preds = self.inner.predict(layer, x)
        self.keys.append([(t, e) for t, p in preds for e in dict.fromkeys(p.reshape(-1).tolist())])
        return preds


@pytest.mark.parametrize("policy,predictor", [("lru", "none"), ("lfu", "next-gate"), ("belady", "next-gate"),
                                              ("reuse", "none"), ("reuse", "next-gate")])
def test_simulator_matches_the_offloaded_engine(tiny_checkpoint, policy, predictor):
    """The engine's own visits (OffloadedExperts on the CPU: its load-first path, with batched prefill, eviction
    on every visit and next-gate prefetch) replayed by the simulator's `visit` give the engine's counters."""
    from expertyard.engine.sampling_params import SamplingParams
    from expertyard.experts.offload.build import full_precision_backend
    from expertyard.experts.offload.host_loader import HostLoadedExperts
    from expertyard.experts.policies import BeladyPolicy
    from expertyard.experts.predictors import NextGatePredictor, NoPredictor

    path, _ = tiny_checkpoint("qwen3_moe")
    prompts, params = [[5, 9, 14, 3], [7, 7, 21]], SamplingParams(temperature=0, max_tokens=8)

    def run(make_policy_):
        loaded = load_model(path, "cpu", torch.float32, progress=False, backend_factory=HostLoadedExperts.factory())
        pred = LoggedPredictor(NextGatePredictor(loaded.model, 2) if predictor == "next-gate" else NoPredictor())
        backend = full_precision_backend(loaded.model, 5, make_policy_(), pred)
        loaded.model.set_expert_backend(backend)
        backend.visits = []
        LLMEngine(loaded, None, EngineConfig(max_num_seqs=2, max_model_len=64, cuda_graphs=False),
                  eos_token_ids=set()).generate(prompts, params)
        return backend, pred.keys

    backend, keys = run(lambda: make_policy("lru" if policy == "belady" else policy))
    if policy == "belady":  # the future is the routing of the run (the same with any policy: routing is exact)
        future = list(backend.visits)
        backend, keys = run(lambda: BeladyPolicy(future))
        assert backend.visits == future
    state = ExpertCacheState(5, BeladyPolicy(backend.visits) if policy == "belady" else make_policy(policy))
    for now, ((layer, used), predicted) in enumerate(zip(backend.visits, keys, strict=True)):
        visit(state, layer, used, predicted, now, pairs=state.capacity + 1, top_k=3)  # the CPU engine's path
    assert state.counters.as_dict() == backend.state.counters.as_dict()
    assert state.resident == backend.state.resident
    if predictor != "none":
        assert state.counters.prefetches > 0


# ---- recording ----------------------------------------------------------------------------------------------
def test_recording_backend_records_the_routers_of_transformers(tiny_checkpoint):
    path, hf = tiny_checkpoint("qwen3_moe")
    engine = _engine(path)
    ids = torch.randint(3, 128, (23,), generator=torch.Generator().manual_seed(4)).tolist()
    experts, weights, starts, hidden = record_documents(engine, [ids], save_hidden=True)
    with torch.no_grad():
        logits = hf(torch.tensor([ids]), output_router_logits=True).router_logits  # L x [T, E]
    k = hf.config.num_experts_per_tok
    for li, lg in enumerate(logits):
        w, e = lg.float().softmax(-1).topk(k, dim=-1)
        w = w / w.sum(-1, keepdim=True)  # norm_topk_prob
        np.testing.assert_array_equal(experts[:, li], e.numpy())
        np.testing.assert_allclose(weights[:, li], w.numpy(), rtol=1e-4, atol=1e-5)
    assert experts.dtype == np.int16 and list(starts) == [0] and hidden.shape == (23, 3, 64)
    assert (np.diff(weights, axis=-1) <= 0).all()  # by gate weight, descending
    assert not isinstance(engine.model.experts, RecordingBackend)  # the model's backend is restored


@pytest.mark.parametrize("arch,moe_layers", [("deepseek_v2", 2), ("qwen2_moe", 2), ("mixtral", 3)])
def test_recording_skips_dense_layers_and_chunks_long_documents(tiny_checkpoint, arch, moe_layers):
    path, _ = tiny_checkpoint(arch)
    engine = _engine(path, max_model_len=16)
    # 40 tokens: chunks 16+16+8; [5] is skipped; 17 tokens: 16 + a single token that `score` cannot take
    docs = [list(range(3, 3 + 40)), [5], list(range(10, 27))]
    experts, weights, starts, hidden = record_documents(engine, docs)
    assert experts.shape[:2] == (56, moe_layers) and list(starts) == [0, 40] and hidden is None
    e2, _, s2, _ = record_documents(engine, docs, max_tokens=45)
    assert e2.shape[0] == 45 and list(s2) == [0, 40]
    np.testing.assert_array_equal(e2, experts[:45])


def test_split_documents():
    assert split_documents("a b<|endoftext|>\n c <|endoftext|>  ") == ["a b", "c"]
    assert split_documents("para one\nline\n\n  \npara two\n") == ["para one\nline", "para two"]


# ---- commands -----------------------------------------------------------------------------------------------
def test_trace_and_simulate_commands_on_the_bundled_model(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat.<|endoftext|>The dog ran to the park and played.\n"
                    "<|endoftext|>Lily and Tom went home.")
    out = tmp_path / "t.npz"
    assert main(["trace", "--text", str(text), "--out", str(out), "--save-hidden", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    t = load_trace(out)
    assert info["tokens"] == t.num_tokens > 10 and len(t.seq_starts) == 3 and t.hidden.shape[1:] == (4, 256)
    assert t.model == "tiny-moe" and t.phase == "prefill"
    for predictor in ("oracle", "next-gate"):
        assert main(["simulate", "--trace", str(out), "--cache-fraction", "0.25", "--predictor", predictor,
                     "--prefetch-depth", "2", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["expert_bytes"] == 3 * 256 * 256 * 2 and r["result"]["prefetches"] > 0
        assert r["belady_bound"]["policy"] == "belady" and r["belady_bound"]["prefetches"] == 0
    assert main(["simulate", "--trace", str(out), "--sweep", "--batch-size", "2"]) == 0
    table = capsys.readouterr().out
    assert table.count("lfu ") == 3 and "belady (bound, no prediction)" in table and "MB/token" in table
    png = tmp_path / "curves.png"
    assert main(["simulate", "--trace", str(out), "--sweep", "--fractions", "0.1,0.3,0.6,1", "--policies",
                 "lru,reuse", "--plot", str(png), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sweep"]
    assert [r["policy"] for r in rows] == ["lru"] * 4 + ["reuse"] * 4 + ["belady"] * 4
    bound = {r["capacity"]: r["misses"] for r in rows if r["policy"] == "belady"}
    for r in rows:
        assert r["misses_vs_belady"] == r["misses"] / bound[r["capacity"]] and r["misses_vs_belady"] >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("argv,match", [
    (["--cache-fraction", "2"], r"--cache-fraction 2.0 must be in \(0, 1\]"),
    ([], "exactly one of --cache-experts and --cache-fraction"),
    (["--cache-experts", "1"], "cannot hold the 2 experts"),
    (["--cache-experts", "4", "--predictor", "next-gate"], "'hidden' is missing"),
    (["--cache-experts", "4", "--predictor", "oracle", "--prefetch-depth", "4"], "must be 1, 2 or 3"),
    (["--sweep", "--cache-experts", "4"], "--sweep runs each of --fractions"),
    (["--cache-experts", "4", "--batch-size", "0"], "--batch-size 0 must be >= 1"),
])
def test_simulate_errors_are_messages(tmp_path, capsys, argv, match):
    save_trace(tmp_path / "t.npz", random_trace())
    assert main(["simulate", "--trace", str(tmp_path / "t.npz"), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_simulate_unknown_model_reports_traffic_in_experts(tmp_path, capsys):
    save_trace(tmp_path / "t.npz", random_trace())
    assert main(["simulate", "--trace", str(tmp_path / "t.npz"), "--cache-experts", "6", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["expert_bytes"] is None and "bytes_per_token" not in r["result"]
    assert main(["simulate", "--trace", str(tmp_path / "t.npz"), "--cache-experts", "6", "--expert-bytes", "10",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["bytes_per_token"] > 0


@pytest.mark.skipif(not DEEPSEEK.is_file(), reason="shared DeepSeek-V2-Lite trace not present")
def test_real_deepseek_trace_loads_and_simulates(capsys):
    t = load_trace(DEEPSEEK)
    assert t.experts.shape[1:] == (26, 6) and t.num_experts == 64 and t.num_tokens == 94165
    assert main(["simulate", "--trace", str(DEEPSEEK), "--cache-fraction", "0.1", "--max-tokens", "300",
                 "--predictor", "oracle", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 300 and r["expert_bytes"] == 3 * 2048 * 1408 * 2
    assert r["belady_bound"]["misses"] <= simulate(t.head(300), "lru", r["result"]["capacity"]).misses
    assert 0 < r["result"]["hit_rate"] <= 1
