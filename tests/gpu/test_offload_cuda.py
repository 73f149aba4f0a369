"""Offloading on CUDA: exact against resident execution, copy-stream statistics, timeline, disk tier."""

import json

import pytest
import torch

from expertyard.engine.sampling_params import SamplingParams
from expertyard.loader import load_model

from conftest import ARCH_CASES
from test_offload import _prompts, offloaded_engine, resident_tokens_and_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("arch", ARCH_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_offloaded_equals_resident(arch, batch, tiny_checkpoint):
    """batch 1 decodes on the speculative path (a visit fits the cache); batch 3 needs more experts than the
    cache holds, so it loads first and computes in groups."""
    path, _ = tiny_checkpoint(arch)
    top_k = load_model(path, "cpu", torch.float32, progress=False).config.moe.top_k
    prompts = _prompts()[:batch]
    ref = resident_tokens_and_logprobs(path, "cuda", torch.float32)
    engine = offloaded_engine(path, "cuda", torch.float32, slots=top_k + 1, depth=2)
    seqs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    assert [s.output_token_ids for s in seqs] == ref[0][:batch]
    torch.testing.assert_close(torch.tensor([[x["logprob"] for x in s.logprobs] for s in seqs]),
                               torch.tensor(ref[1][:batch]), atol=2e-4, rtol=1e-4)
    r = engine.model.experts.report(tokens=12 * batch)
    assert r["misses"] > 0 and r["copy_busy_s"] > 0


@pytest.mark.parametrize("arch", ["mixtral_sliding", "qwen2_moe", "deepseek_v2_full"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prologue", [False, True])
def test_cuda_offloaded_piecewise_graph_decode_equals_resident(arch, batch, prologue, tiny_checkpoint, monkeypatch):
    """Decode in CUDA-graph pieces around the eager expert backend (dense layers and shared experts inside), with
    and without the backend's graph prologue (routing read-back and resident FFN inside the pieces)."""
    monkeypatch.setenv("EXPERTYARD_GRAPH_PROLOGUE", "1" if prologue else "0")
    path, _ = tiny_checkpoint(arch)
    top_k = load_model(path, "cpu", torch.float32, progress=False).config.moe.top_k
    ref = resident_tokens_and_logprobs(path, "cuda", torch.float32)
    engine = offloaded_engine(path, "cuda", torch.float32, slots=3 * top_k, depth=1, policy="layer-distance",
                              graphs=True)
    seqs = engine.generate(_prompts()[:batch], SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    assert engine.runner.graphs.entries, "no piecewise graph was captured"
    for (bb, _), (segments, _) in engine.runner.graphs.entries.items():  # the resident FFN runs in the piece
        for seg in segments[:-1]:  # when the bucket's pairs fit the cache, else eagerly
            assert (seg.out["prologue"] is not None) == (prologue and bb * top_k <= 3 * top_k), (bb, seg.moe_layer)
    assert [s.output_token_ids for s in seqs] == ref[0][:batch]
    torch.testing.assert_close(torch.tensor([[x["logprob"] for x in s.logprobs] for s in seqs]),
                               torch.tensor(ref[1][:batch]), atol=2e-4, rtol=1e-4)


def test_cuda_offload_bf16_matches_resident_bf16_up_to_near_ties(tiny_checkpoint):
    """bf16 sums in another order (expert groups, cache slots) may flip a greedy choice between two tokens of
    nearly equal probability, after which the sequences differ. So: equal log-probabilities up to and including
    each sequence's first differing token, where the two choices must be a near tie."""
    path, _ = tiny_checkpoint("qwen3_moe")
    ref_tokens, ref_logp = resident_tokens_and_logprobs(path, "cuda", torch.bfloat16)
    engine = offloaded_engine(path, "cuda", torch.bfloat16, slots=6, depth=1)
    seqs = engine.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, logprobs=1))
    for seq, tokens, logp in zip(seqs, ref_tokens, ref_logp):
        got = seq.output_token_ids
        first_diff = next((j for j, (a, b) in enumerate(zip(got, tokens)) if a != b), len(tokens))
        n = min(first_diff + 1, len(tokens))
        torch.testing.assert_close(torch.tensor([x["logprob"] for x in seq.logprobs[:n]]), torch.tensor(logp[:n]),
                                   atol=0.05, rtol=0.05)


def test_cuda_disk_tier_and_timeline(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("mixtral")
    ref_tokens, _ = resident_tokens_and_logprobs(path, "cuda", torch.float32)
    cfg = load_model(path, "cpu", torch.float32, progress=False).config
    engine = offloaded_engine(path, "cuda", torch.float32, slots=4, host_budget=5 * cfg.expert_bytes(4), timeline=True)
    backend = engine.model.experts
    seqs = engine.generate(_prompts()[:1], SamplingParams(temperature=0, max_tokens=12))
    assert seqs[0].output_token_ids == ref_tokens[0]
    backend.timeline.write(tmp_path / "t.json")
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    tracks = {e["tid"] for e in events}
    assert {"compute", "copy"} <= tracks and all(e["dur"] >= 0 for e in events)


def test_cuda_offload_never_syncs_on_an_all_hit_decode(tiny_checkpoint):
    """With every expert cached, a decode visit's only host wait is the routing event (no copies, no stall)."""
    path, _ = tiny_checkpoint("olmoe")
    cfg = load_model(path, "cpu", torch.float32, progress=False).config
    engine = offloaded_engine(path, "cuda", torch.float32, slots=len(cfg.moe_layers) * cfg.moe.num_experts,
                              predictor="none")
    engine.generate(_prompts()[:1], SamplingParams(temperature=0, max_tokens=4))  # fills the cache
    engine.model.experts.reset_stats()
    engine.generate(_prompts()[:1], SamplingParams(temperature=0, max_tokens=8))
    r = engine.model.experts.report(tokens=8)
    assert r["misses"] == 0 and r["bytes_copied"] == 0 and r["stall_ms_per_token"] == 0


def test_graph_staging_packs_in_a_graph_and_reads_back_a_row_prefix():
    """Parts of several dtypes and shapes written by a captured graph into one device buffer, read back by one copy:
    each part's first rows, bit for bit."""
    from expertyard.experts.offload.graph_staging import GraphStaging

    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 1000, (4, 6), device="cuda", generator=g)  # int64, cast to int32 on the way
    x = torch.randn(4, 5, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.rand(4, 6, device="cuda", generator=g)
    staging = GraphStaging([(ids.shape, torch.int32), (x.shape, x.dtype), (w.shape, torch.float32)], ids.device)
    graph = torch.cuda.CUDAGraph()
    staging.pack([ids, x, w])  # warm-up, as the capture does
    with torch.cuda.graph(graph):
        staging.pack([ids, x, w])
    for seed in (1, 2):
        ids.random_(0, 1000, generator=g), x.normal_(generator=g), w.uniform_(generator=g)
        graph.replay()
        staging.send().synchronize()
        for rows in (1, 3, 4):
            got = staging.host_views(rows)
            assert got[0].dtype == torch.int32 and torch.equal(got[0], ids[:rows].int().cpu())
            assert torch.equal(got[1], x[:rows].cpu()) and torch.equal(got[2], w[:rows].cpu())
