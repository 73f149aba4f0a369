"""Offloaded experts give the same tokens and logits as resident ones, under budgets that evict constantly."""

import pytest
import torch

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.errors import ConfigError
from expertyard.experts.offload.budget import parse_size, plan_gpu_budget
from expertyard.experts.offload.build import full_precision_backend
from expertyard.experts.offload.host_loader import HostLoadedExperts
from expertyard.experts.policies import make_policy
from expertyard.experts.predictors import NextGatePredictor, NoPredictor
from expertyard.loader import load_model

from conftest import ARCH_CASES


def _prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 4, 15)]


def _engine(loaded, max_num_seqs=3, graphs=False):
    return LLMEngine(loaded, None, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=96, cuda_graphs=graphs),
                     eos_token_ids=set())


def offloaded_engine(path, device, dtype, slots, predictor="next-gate", depth=1, policy="lru", host_budget=None,
                     graphs=False, timeline=False):
    loaded = load_model(path, device, dtype, progress=False, backend_factory=HostLoadedExperts.factory(host_budget))
    pred = NextGatePredictor(loaded.model, depth) if predictor == "next-gate" else NoPredictor()
    loaded.model.set_expert_backend(full_precision_backend(loaded.model, slots, make_policy(policy), pred,
                                                                   timeline))
    return _engine(loaded, graphs=graphs)


def resident_tokens_and_logprobs(path, device, dtype):
    seqs = _engine(load_model(path, device, dtype, progress=False)).generate(
        _prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    return [s.output_token_ids for s in seqs], [[x["logprob"] for x in s.logprobs] for s in seqs]


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_offloaded_generation_equals_resident_under_constant_eviction(arch, tiny_checkpoint):
    path, _ = tiny_checkpoint(arch)
    ref_tokens, ref_logp = resident_tokens_and_logprobs(path, "cpu", torch.float32)
    # top_k slots: every visit evicts, and batched prefill visits need more experts than fit (grouped path)
    top_k = load_model(path, "cpu", torch.float32, progress=False).config.moe.top_k
    engine = offloaded_engine(path, "cpu", torch.float32, slots=top_k + 1, depth=2)
    seqs = engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    assert [s.output_token_ids for s in seqs] == ref_tokens
    torch.testing.assert_close(torch.tensor([[x["logprob"] for x in s.logprobs] for s in seqs]),
                               torch.tensor(ref_logp), atol=1e-4, rtol=1e-4)
    report = engine.model.experts.report(tokens=36)
    assert report["misses"] > 0 and report["bytes_copied"] == engine.model.experts.expert_bytes * (
        report["misses"] + report["prefetches"])


@pytest.mark.parametrize("policy,predictor", [("lfu", "none"), ("lru", "none"), ("lfu", "next-gate"),
                                              ("layer-distance", "next-gate")])
def test_offload_policies_and_predictors_keep_tokens_exact(policy, predictor, tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe")
    ref_tokens, _ = resident_tokens_and_logprobs(path, "cpu", torch.float32)
    engine = offloaded_engine(path, "cpu", torch.float32, slots=5, predictor=predictor, policy=policy)
    assert [s.output_token_ids for s in engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12))] \
        == ref_tokens


def test_disk_tier_gives_the_same_tokens(tiny_checkpoint):
    path, _ = tiny_checkpoint("mixtral")
    ref_tokens, _ = resident_tokens_and_logprobs(path, "cpu", torch.float32)
    loaded = load_model(path, "cpu", torch.float32, progress=False)
    one_expert = loaded.config.expert_bytes(4)
    engine = offloaded_engine(path, "cpu", torch.float32, slots=4, host_budget=5 * one_expert)
    store = engine.model.experts.store
    assert len(store.host_keys) == 5 and len(store.disk) == len(engine.model.experts.keys) - 5
    assert [s.output_token_ids for s in engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12))] \
        == ref_tokens


def test_next_gate_prefetch_is_used_and_counted(tiny_checkpoint):
    path, _ = tiny_checkpoint("olmoe")
    engine = offloaded_engine(path, "cpu", torch.float32, slots=12, depth=1)
    engine.generate(_prompts()[:1], SamplingParams(temperature=0, max_tokens=20))
    r = engine.model.experts.report(tokens=29)
    assert r["prefetches"] > 0 and 0 < r["prefetch_hits"] <= r["prefetches"]
    assert 0 < r["predictor_recall"] <= 1 and 0 < r["predictor_precision"] <= 1


def test_parse_size_and_budget_errors():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("1.5G") == int(1.5 * 2**30)
    assert parse_size("800MB") == 800 * 2**20
    assert parse_size("123") == 123
    with pytest.raises(ConfigError, match="cannot read size"):
        parse_size("lots")


def test_budget_too_small_names_the_minimum(tiny_checkpoint):
    path, _ = tiny_checkpoint("mixtral")
    cfg = load_model(path, "cpu", torch.float32, progress=False).config
    eb = cfg.expert_bytes(4)
    plan = plan_gpu_budget(10_000 + 5 * eb, cfg, resident=4000, kv_cache=3000, workspace=3000, expert_bytes=eb)
    assert plan.slots == 5
    with pytest.raises(ConfigError, match=r"need at least"):
        plan_gpu_budget(10_000 + eb, cfg, resident=4000, kv_cache=3000, workspace=3000, expert_bytes=eb)
    full = plan_gpu_budget(10**12, cfg, resident=0, kv_cache=0, workspace=0, expert_bytes=eb)
    assert full.slots == len(cfg.moe_layers) * cfg.moe.num_experts  # never more slots than experts


def test_a_demand_miss_evicts_unused_predictions_of_other_layers():
    from expertyard.experts.cache_state import ExpertCacheState

    state = ExpertCacheState(3, make_policy("lru"))
    state.access(0, [0, 1], now=0)
    state.end_visit(0, [0, 1])
    loads = state.prefetch([(1, 5), (2, 6), (2, 7)], now=0)  # fills the cache with protected predictions
    assert len(loads) == 3 and state.protected == {(1, 5), (2, 6), (2, 7)}
    loads = state.access(1, [5, 4], now=1)  # 5 was predicted (hit); 4 must take a layer-2 prediction's slot
    assert [ld.key for ld in loads] == [(1, 4)] and loads[0].evicted in {(2, 6), (2, 7)}
    assert state.counters.prefetch_hits == 1


def test_a_visit_may_evict_its_own_layer_mispredictions():
    from expertyard.experts.cache_state import ExpertCacheState

    state = ExpertCacheState(2, make_policy("lru"))
    state.prefetch([(1, 5), (1, 6)], now=0)  # both wrong
    loads = state.access(1, [3, 4], now=1)
    assert sorted(ld.evicted for ld in loads) == [(1, 5), (1, 6)]
    assert state.counters.misses == 2 and state.counters.prefetch_hits == 0


class _FakeEvent:  # what TransferStats reads of a CUDA event pair: query() and elapsed_time()
    def __init__(self, t_ms: float, done: bool = True):
        self.t, self.done = t_ms, done

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end) -> float:
        return end.t - self.t


def test_transfer_stats_stay_bounded_and_sum_every_copy():
    """A server copies for days: finished event pairs are folded into a sum, the unfinished kept; the totals
    equal the sum over every pair."""
    from expertyard.experts.telemetry import TransferStats

    stats = TransferStats()
    total = 0.0
    for i in range(5 * TransferStats.FOLD_AT + 7):
        ms = 0.5 + (i % 7) * 0.25
        stats.add_copy(_FakeEvent(0.0), _FakeEvent(ms, done=i % 100 != 99))  # a few still in flight
        stats.add_stall(_FakeEvent(0.0), _FakeEvent(2 * ms))
        total += ms
    assert len(stats.copy_events) < TransferStats.FOLD_AT and len(stats.stall_events) < TransferStats.FOLD_AT
    assert stats.busy_seconds() == pytest.approx(total / 1e3)
    assert stats.stall_seconds() == pytest.approx(2 * total / 1e3)


def test_hybrid_sweep_names_are_checked_before_loading(capsys):
    from expertyard.entrypoints.cli import main

    assert main(["bench", "--offload", "--expert-cache-fraction", "0.5", "--hybrid-sweep", "hybrid,int5"]) != 0
    assert "choose from copy-only, CPU-only, hybrid, hybrid-int4, int4-both" in capsys.readouterr().err

