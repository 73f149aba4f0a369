"""Hybrid CPU-GPU offloading on CUDA: misses computed on the host CPU beside copies over the link give the same
tokens as resident experts (float32), within tolerance in bfloat16, eagerly and in piecewise CUDA graphs; the
routing read-back is timed; start-up measures the cost model on this machine."""

import pytest
import torch

from expertyard.engine.sampling_params import SamplingParams
from expertyard.experts.cpu import CpuExpertStore, measure_costs
from expertyard.loader import load_model

from conftest import ARCH_CASES
from test_hybrid_offload import check_low_precision_cpu_compute, hybrid_engine
from test_offload import _prompts, resident_tokens_and_logprobs
from test_shared_int4 import check_both_pipes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("arch", ARCH_CASES)
@pytest.mark.parametrize("mode,graphs", [("on", False), ("auto", False), ("auto", True), ("on", True)])
def test_cuda_hybrid_equals_resident(arch, mode, graphs, tiny_checkpoint):
    path, _ = tiny_checkpoint(arch)
    ref_tokens, ref_logp = resident_tokens_and_logprobs(path, "cuda", torch.float32)
    top_k = load_model(path, "cpu", torch.float32, progress=False).config.moe.top_k
    engine = hybrid_engine(path, "cuda", torch.float32, slots=3 * top_k + 1, mode=mode, graphs=graphs)
    seqs = engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    assert [s.output_token_ids for s in seqs] == ref_tokens
    torch.testing.assert_close(torch.tensor([[x["logprob"] for x in s.logprobs] for s in seqs]),
                               torch.tensor(ref_logp), atol=2e-3, rtol=2e-3)
    r = engine.model.experts.report(tokens=36)
    assert r["cpu_experts_per_token"] > 0 and r["routing_wait_us_p50"] > 0
    if mode == "auto":
        assert r["copied_misses_per_token"] > 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v2_full"])
@pytest.mark.parametrize("mode", ["auto", "on"])
def test_cuda_hybrid_graph_prologue_at_batch_1(arch, mode, tiny_checkpoint, monkeypatch):
    """Batch 1 in piecewise graphs: routing, the CPU's input and the resident FFN run inside each graph piece
    (the backend's graph prologue); the host adds copies and CPU compute after it. Same tokens as resident."""
    monkeypatch.setenv("EXPERTYARD_GRAPH_PROLOGUE", "1")
    path, _ = tiny_checkpoint(arch)
    ref_tokens, ref_logp = resident_tokens_and_logprobs(path, "cuda", torch.float32)
    top_k = load_model(path, "cpu", torch.float32, progress=False).config.moe.top_k
    engine = hybrid_engine(path, "cuda", torch.float32, slots=3 * top_k + 1, mode=mode, graphs=True)
    seqs = engine.generate(_prompts()[:1], SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    assert [s.output_token_ids for s in seqs] == ref_tokens[:1]
    torch.testing.assert_close(torch.tensor([x["logprob"] for x in seqs[0].logprobs]), torch.tensor(ref_logp[0]),
                               atol=2e-3, rtol=2e-3)
    segments, _ = engine.runner.graphs.entries[next(iter(engine.runner.graphs.entries))]
    backend = engine.model.experts
    for seg in segments[:-1]:  # routing, predictions, then the CPU's input x [1, D] and weights [1, K]
        staging = backend._graph_io[seg.out["prologue"]["staging"]]
        assert [part[2] for part in staging.layout[-2:]] == [(1, backend.cfg.hidden_size), (1, top_k)]
    assert engine.model.experts.report(tokens=12)["cpu_experts_per_token"] > 0


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cuda_low_precision_cpu_compute_equals_its_dequantized_model(precision, tiny_checkpoint):
    check_low_precision_cpu_compute(tiny_checkpoint("mixtral")[0], "cuda", precision, 2e-3)


def test_cuda_hybrid_bfloat16_within_tolerance(tiny_checkpoint):
    """bf16: logprobs of the tokens before the first disagreement within 0.05 of resident bf16 (at a near-tie the
    chosen tokens differ, and so do their logprobs), and most greedy tokens agree."""
    path, _ = tiny_checkpoint("mixtral")
    tokens, logp = resident_tokens_and_logprobs(path, "cuda", torch.bfloat16)
    engine = hybrid_engine(path, "cuda", torch.bfloat16, slots=5, mode="on")
    seqs = engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    tol = 0.05
    agree = 0
    for seq, ref, ref_logp in zip(seqs, tokens, logp):
        got = seq.output_token_ids
        first_diff = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        agree += first_diff
        torch.testing.assert_close(torch.tensor([x["logprob"] for x in seq.logprobs[:first_diff]]),
                                   torch.tensor(ref_logp[:first_diff]), atol=tol, rtol=tol)
    assert agree >= (len(tokens) * 12) // 2


def test_cost_model_is_measured_on_this_machine(tiny_checkpoint):
    from expertyard.experts.offload.host_loader import HostLoadedExperts

    path, _ = tiny_checkpoint("mixtral")
    loaded = load_model(path, "cuda", torch.bfloat16, progress=False, backend_factory=HostLoadedExperts.factory())
    host = loaded.model.experts
    costs = measure_costs(CpuExpertStore(host.store, host.keys, {"full", "int4"}, progress=False), host.device)
    assert costs.pcie_bytes_per_s > 1e9 and costs.link == "pinned host->device"
    assert 0 < costs.cpu_s("full", 1) <= costs.cpu_s("full", 64)


@pytest.mark.parametrize("graphs,fast", [(False, False), (True, False), (False, True), (True, True)])
def test_cuda_int4_on_both_pipes_equals_the_dequantized_model(graphs, fast, monkeypatch):
    """int4 copies converted on the device from the CPU's own int4 buffers (pinned), misses split between the link
    and the CPU, eagerly and in piecewise CUDA graphs: the tokens of the model whose experts are those copies.
    `fast`: the conversion kernels and the graph prologue."""
    monkeypatch.setenv("EXPERTYARD_GRAPH_PROLOGUE", "1" if fast else "0")
    monkeypatch.setenv("EXPERTYARD_INT4_CONVERT_KERNELS", "1" if fast else "0")
    monkeypatch.setenv("EXPERTYARD_MOE_ALIGN_PAIRS", "1" if fast else "0")
    check_both_pipes("cuda", 5e-3, graphs=graphs)


def test_int4_conversion_kernels_write_the_torch_conversions_bytes():
    from test_shared_int4 import check_kernel_conversion

    assert check_kernel_conversion("cuda") > 0
