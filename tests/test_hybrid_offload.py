"""Hybrid CPU-GPU offloading: misses computed on the host CPU from host memory beside copies, split per layer by
the cost model. Exact against resident execution in float32 (the CPU standing in for the device here; the CUDA
path is in tests/gpu/test_hybrid_cuda.py); the split against a brute-force optimum; bad input."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.entrypoints.cli import main
from expertyard.errors import ConfigError
from expertyard.experts.cpu import CpuExpertCompute, CpuExpertStore, HybridCosts
from expertyard.experts.cpu.weights import default_group_size, int4_grid, int8_grid
from expertyard.experts.offload.build import full_precision_backend
from expertyard.experts.offload.config import OffloadConfig
from expertyard.experts.offload.host_loader import HostLoadedExperts
from expertyard.experts.offload.hybrid import HybridExecutor, best_split
from expertyard.experts.policies import make_policy
from expertyard.experts.predictors import NextGatePredictor
from expertyard.loader import load_model

from conftest import ARCH_CASES
from test_offload import _engine, _prompts, resident_tokens_and_logprobs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.0, 10.0), min_size=0, max_size=7), st.floats(0.01, 10.0),
       st.one_of(st.just(0.0), st.floats(0.0, 20.0)))
def test_best_split_is_the_optimum_over_every_subset(cpu_costs, copy_s, host_s):
    """Layer time of a split: the link copies its share while the host thread does its own work and then (only
    if the CPU has a share) computes it."""
    cpu_costs = sorted(cpu_costs)
    n = len(cpu_costs)

    def finish(subset):
        host = host_s + sum(cpu_costs[i] for i in subset)
        return max(host, (n - len(subset)) * copy_s)

    brute = min(finish(subset) for r in range(n + 1) for subset in itertools.combinations(range(n), r))
    on_cpu, t = best_split(cpu_costs, copy_s, host_s)
    assert t == pytest.approx(brute)
    assert t == pytest.approx(finish(range(on_cpu)))


def test_host_thread_time_is_learned_within_a_step_and_tips_the_split():
    """The host thread's own time per visit (between routing reads of one step, less CPU compute) is learned;
    a busy host thread sends a miss that would go to the CPU to the link instead."""
    from types import SimpleNamespace

    no_experts = SimpleNamespace(store=SimpleNamespace(keys=[]))  # the split's learning needs no expert
    ex = HybridExecutor(no_experts, _costs(1.0, 1.2, 1000), "auto", "full", torch.device("cpu"), torch.float32)
    t = 0.0
    for step in range(40):
        for layer in range(4):
            ex.routing_read(layer, t, t + 1e-4)  # a 0.1 ms wait
            t += 1e-4 + 2e-3  # 2 ms of host work, of which the CPU computes 1.5 ms
            ex._learn(predicted=1e-3, measured=1.5e-3)
        t += 50e-3  # the engine between steps: not a visit's host time
    assert ex.host_s == pytest.approx(0.5e-3, rel=0.05)
    assert best_split([1.0e-3], 1.2e-3)[0] == 1  # alone the CPU is faster than the link
    assert best_split([1.0e-3], 1.2e-3, ex.host_s)[0] == 0  # after the host's own 0.5 ms, it is not


def _costs(cpu_ms: float, copy_ms: float, expert_bytes: int) -> HybridCosts:
    """Fixed figures (not measured), so that the split is decided by the test: CPU time per expert and per token
    against the link's time per expert."""
    return HybridCosts(pcie_bytes_per_s=expert_bytes / (copy_ms / 1e3), cpu_fit={p: (cpu_ms / 1e3, cpu_ms / 1e4)
                       for p in ("full", "int8", "int4")}, gpu_fit=(1e-5, 1e-6),
                       expert_bytes={"full": expert_bytes, "int8": expert_bytes // 2, "int4": expert_bytes // 4})


def hybrid_engine(path, device, dtype, slots, mode="auto", precision="full", cpu_ms=1.0, copy_ms=1.0, depth=1,
                  graphs=False, predict=True, timeline=False, host_budget=None):
    loaded = load_model(path, device, dtype, progress=False, backend_factory=HostLoadedExperts.factory(host_budget))
    host = loaded.model.experts
    store = CpuExpertStore(host.store, host.keys, {"full", precision}, progress=False)
    hybrid = HybridExecutor(CpuExpertCompute(store), _costs(cpu_ms, copy_ms, host.store.expert_bytes), mode,
                            precision, host.device, dtype, learn=False)
    predictor = NextGatePredictor(loaded.model, depth) if predict else None
    backend = full_precision_backend(loaded.model, slots, make_policy("lru"), predictor, timeline, hybrid)
    loaded.model.set_expert_backend(backend)
    return _engine(loaded, graphs=graphs)


@pytest.mark.parametrize("arch", ARCH_CASES)
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_hybrid_generation_equals_resident(arch, mode, tiny_checkpoint):
    """float32: the same greedy tokens and logprobs as resident experts, with misses on the CPU (every one with
    `on`; with `auto` at equal CPU and link costs, a 2-miss visit splits one and one) and copies evicting."""
    path, _ = tiny_checkpoint(arch)
    ref_tokens, ref_logp = resident_tokens_and_logprobs(path, "cpu", torch.float32)
    top_k = load_model(path, "cpu", torch.float32, progress=False).config.moe.top_k
    slots = top_k + 1 if mode == "on" else 3 * top_k + 1  # auto: a decode step's 3 x top_k experts fit, copies evict
    engine = hybrid_engine(path, "cpu", torch.float32, slots=slots, mode=mode)
    seqs = engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    assert [s.output_token_ids for s in seqs] == ref_tokens
    torch.testing.assert_close(torch.tensor([[x["logprob"] for x in s.logprobs] for s in seqs]),
                               torch.tensor(ref_logp), atol=1e-4, rtol=1e-4)
    r = engine.model.experts.report(tokens=36)
    assert r["cpu_experts_per_token"] > 0
    if mode == "on":
        assert r["copied_misses_per_token"] == 0
    else:
        assert r["copied_misses_per_token"] > 0 and r["bytes_copied"] > 0
    splits = r["split_per_layer"]
    assert sum(v["cpu"] for v in splits.values()) == round(r["cpu_experts_per_token"] * 36)


def dequantized_resident_tokens_and_logprobs(path, device, dtype, precision):
    """The reference for low-precision CPU compute: resident experts replaced by the dequantized CPU copies."""
    loaded = load_model(path, device, dtype, progress=False)
    experts = loaded.model.experts
    cfg = loaded.config
    group = default_group_size(cfg.hidden_size, cfg.moe.intermediate_size)
    for layer in cfg.moe_layers:
        for e in range(cfg.moe.num_experts):
            for w in (experts.w13[layer][e], experts.w2[layer][e]):  # [2I, D], [D, I]
                grid = int8_grid(w.cpu(), dtype) if precision == "int8" else int4_grid(w.cpu(), group, dtype)
                w.copy_(grid.dequantize())
    seqs = _engine(loaded).generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    return [s.output_token_ids for s in seqs], [[x["logprob"] for x in s.logprobs] for s in seqs]


def check_low_precision_cpu_compute(path, device: str, precision: str, tol: float) -> None:
    """float32, every expert on the CPU from int8/int4 copies (no prediction, so nothing is ever copied to the
    cache): the tokens and logprobs of a resident model whose experts are those copies dequantized (the kernels
    are exact up to float rounding; quality is measured by perplexity in docs/offloading.md)."""
    ref_tokens, ref_logp = dequantized_resident_tokens_and_logprobs(path, device, torch.float32, precision)
    engine = hybrid_engine(path, device, torch.float32, slots=3, mode="on", precision=precision, predict=False)
    seqs = engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    assert [s.output_token_ids for s in seqs] == ref_tokens
    torch.testing.assert_close(torch.tensor([[x["logprob"] for x in s.logprobs] for s in seqs]),
                               torch.tensor(ref_logp), atol=tol, rtol=tol)
    assert engine.model.experts.report(tokens=36)["hits"] == 0


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_low_precision_cpu_compute_equals_its_dequantized_model(precision, tiny_checkpoint):
    check_low_precision_cpu_compute(tiny_checkpoint("mixtral")[0], "cpu", precision, 1e-4)


def test_disk_tier_experts_are_copied_not_computed_from_files(tiny_checkpoint):
    """Past --host-memory-budget, experts stay in the safetensors files: even with every miss sent to the CPU,
    those are copied (a full-precision CPU visit would read the file each time), and tokens stay exact."""
    path, _ = tiny_checkpoint("mixtral")
    ref_tokens, _ = resident_tokens_and_logprobs(path, "cpu", torch.float32)
    one_expert = load_model(path, "cpu", torch.float32, progress=False).config.expert_bytes(4)
    engine = hybrid_engine(path, "cpu", torch.float32, slots=7, mode="on", predict=False, host_budget=5 * one_expert)
    seqs = engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12))
    assert [s.output_token_ids for s in seqs] == ref_tokens
    r = engine.model.experts.report(tokens=36)
    assert r["cpu_experts_per_token"] > 0 and r["copied_misses_per_token"] > 0


def test_timeline_shows_each_layers_cpu_share(tiny_checkpoint, tmp_path):
    """`--timeline` records every CPU share of a layer as a host span named by layer and expert count."""
    import json

    path, _ = tiny_checkpoint("mixtral")
    engine = hybrid_engine(path, "cpu", torch.float32, slots=3, mode="on", timeline=True)
    engine.generate(_prompts()[:1], SamplingParams(temperature=0, max_tokens=6))
    engine.model.experts.timeline.write(tmp_path / "t.json")
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    cpu = [e for e in events if e["pid"] == "host" and e["tid"] == "CPU experts"]
    r = engine.model.experts.report(tokens=1)
    assert sum(int(e["name"].split(": ")[1].split()[0]) for e in cpu) == sum(
        v["cpu"] for v in r["split_per_layer"].values())
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in cpu) and {e["name"].split(":")[0] for e in cpu} == {
        f"cpu L{layer}" for layer in engine.model_config.moe_layers}


def test_cpu_share_of_a_visit_against_a_float64_reference(tiny_checkpoint):
    """One visit through the executor (int8 CPU copies): y equals sum_k w * expert_k(x) computed in float64 from
    the very dequantized weights the CPU reads."""
    path, _ = tiny_checkpoint("mixtral")
    loaded = load_model(path, "cpu", torch.float32, progress=False, backend_factory=HostLoadedExperts.factory())
    host, cfg = loaded.model.experts, loaded.config
    store = CpuExpertStore(host.store, host.keys, {"full", "int8"}, progress=False)
    hybrid = HybridExecutor(CpuExpertCompute(store), _costs(1, 1, host.store.expert_bytes), "on", "int8",
                            torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    t, k, layer = 5, cfg.moe.top_k, cfg.moe_layers[0]
    x = torch.randn(t, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.moe.num_experts, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    on_cpu = sorted(set(ids.flatten().tolist()))[:3]
    y = hybrid.compute(layer, hybrid.stage_input(x, w), ids.flatten().tolist(), on_cpu, ids.shape)
    ref = torch.zeros(t, cfg.hidden_size, dtype=torch.float64)
    for i in range(t):
        for j in range(k):
            e = int(ids[i, j])
            if e in on_cpu:
                w13, w2 = (m.double() for m in store.get((layer, e), "int8").dequantize())
                gate, up = (w13 @ x[i].double()).chunk(2)
                ref[i] += float(w[i, j]) * (w2 @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


def test_measured_cpu_time_corrects_the_split(tiny_checkpoint):
    """A CPU that turns out slower than its start-up figure loses its share: after visits measured at 10x the
    model, a two-miss visit goes wholly to the link."""
    path, _ = tiny_checkpoint("mixtral")
    loaded = load_model(path, "cpu", torch.float32, progress=False, backend_factory=HostLoadedExperts.factory())
    host = loaded.model.experts
    store = CpuExpertStore(host.store, host.keys, {"full"}, progress=False)
    hybrid = HybridExecutor(CpuExpertCompute(store), _costs(1.0, 1.0, host.store.expert_bytes), "auto", "full",
                            torch.device("cpu"), torch.float32)
    from expertyard.experts.cache_state import ExpertCacheState

    state = ExpertCacheState(4, make_policy("lru"))
    assert len(hybrid.assign(0, [1, 2], state)) == 1  # equal costs: one on each pipe
    hybrid._learn(predicted=0.001, measured=0.010)
    assert hybrid.cpu_scale == pytest.approx(10.0)
    assert hybrid.assign(0, [1, 2], state) == []


def test_a_prefill_sized_visit_goes_to_the_link():
    """CPU time grows with tokens, a copy does not: many tokens per expert send every miss to the link."""
    costs = _costs(cpu_ms=1.0, copy_ms=1.0, expert_bytes=1000)
    assert best_split(sorted(costs.cpu_s("full", 512) for _ in range(4)), costs.copy_s(1000))[0] == 0
    assert best_split([costs.cpu_s("full", 1)] * 2, costs.copy_s(1000))[0] == 1


def test_offload_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="--cpu-threads 100000 is out of range"):
        OffloadConfig(expert_cache_fraction=0.5, cpu_threads=100000)
    with pytest.raises(ConfigError, match="--cpu-precision 'int3'"):
        OffloadConfig(expert_cache_fraction=0.5, cpu_precision="int3")
    with pytest.raises(ConfigError, match="--cpu-compute off turns off"):
        OffloadConfig(expert_cache_fraction=0.5, cpu_compute="off", cpu_threads=1)
    with pytest.raises(ConfigError, match="exactly one of"):
        OffloadConfig()
    with pytest.raises(ConfigError, match="--policy 'foo'"):
        OffloadConfig(expert_cache_fraction=0.5, policy="foo")


def test_flags_are_checked_before_the_model_loads(capsys, tmp_path):
    missing = tmp_path / "no-model"  # would fail to load: the flag error must come first
    assert main(["generate", "--model", str(missing), "--prompt", "x", "--low-precision", "int4"]) != 0
    assert "only act(s) on offloaded experts: add --offload" in capsys.readouterr().err
    assert main(["generate", "--model", str(missing), "--prompt", "x", "--cpu-precision", "int4"]) != 0
    assert "--cpu-precision only act(s) on offloaded experts" in capsys.readouterr().err
    assert main(["generate", "--model", str(missing), "--prompt", "x", "--offload", "--expert-cache-fraction", "0.3",
                 "--cpu-threads", "0"]) != 0
    assert "--cpu-threads 0 is out of range" in capsys.readouterr().err


def test_generate_with_cpu_compute_prints_the_split(capsys):
    assert main(["generate", "--prompt", "Once upon a time", "--max-tokens", "8", "--temperature", "0",
                 "--offload", "--expert-cache-fraction", "0.25", "--cpu-compute", "on", "--stats"]) == 0
    out = capsys.readouterr()
    assert "on the CPU" in out.out + out.err


def test_server_with_cpu_compute_answers_concurrent_clients_like_resident(bundled_engine):
    """`serve --offload` with the CPU computing misses, under continuous batching: 40 requests from 8 clients
    (completions and chat, streamed or not) get the texts the resident model gives each prompt alone."""
    import asyncio

    from servers import RunningServer
    from test_server_load import PROMPTS, _load

    from expertyard.entrypoints.common import bundled_model_path, load_tokenizer

    path = bundled_model_path()
    loaded = load_model(path, "cpu", torch.float32, progress=False, backend_factory=HostLoadedExperts.factory())
    offload = OffloadConfig(expert_cache_fraction=0.25, cpu_compute="auto", cpu_precision="full")
    engine = LLMEngine(loaded, load_tokenizer(path), EngineConfig(max_num_seqs=8, max_model_len=256, offload=offload))
    ref = bundled_engine(max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=16)
    expected = {(p, chat): ref.generate([[{"role": "user", "content": p}] if chat else p], params)[0].text
                for p in PROMPTS for chat in (False, True)}
    server = RunningServer(engine)
    try:
        results = asyncio.run(_load(server.url, 40, 8))
    finally:
        server.stop()
    assert all(status == 200 for status, *_ in results), [r for r in results if r[0] != 200][:3]
    assert [(p, chat) for _, p, text, chat in results if text != expected[(p, chat)]] == []
    r = engine.model.experts.report(tokens=40 * 16)
    assert r["cpu_experts_per_token"] > 0
