"""The engine on CUDA: parity with transformers (on CPU, float32), CUDA-graph decode against eager decode."""

import pytest
import torch

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.loader import load_model

from conftest import ARCH_CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _engine(path, dtype, graphs, max_num_seqs=4):
    loaded = load_model(path, "cuda", dtype, progress=False)
    return LLMEngine(loaded, None, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=128, cuda_graphs=graphs),
                     eos_token_ids=set())


def _prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 13, 2)]


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_cuda_greedy_tokens_match_transformers(arch, tiny_checkpoint):
    path, hf = tiny_checkpoint(arch)
    prompts = _prompts()
    refs = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            refs.append(out[0, len(p):].tolist())
    seqs = _engine(path, torch.float32, graphs=True).generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    assert [s.output_token_ids for s in seqs] == refs


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_cuda_prefill_logits_match_transformers(arch, tiny_checkpoint):
    path, hf = tiny_checkpoint(arch)
    ids = _prompts()[1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    ref = ref.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 0.15)):
        ours = _engine(path, dtype, graphs=False).score(ids)
        torch.testing.assert_close(ours, ref, atol=tol, rtol=0.05 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("arch", ["mixtral_sliding", "qwen3_moe", "deepseek_v2_full"])
def test_cuda_graph_decode_equals_eager_decode(arch, tiny_checkpoint):
    path, _ = tiny_checkpoint(arch)
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=1)
    eager = _engine(path, torch.float32, graphs=False).generate(_prompts(), params)
    graphed_engine = _engine(path, torch.float32, graphs=True)
    graphed = graphed_engine.generate(_prompts(), params)
    assert graphed_engine.runner.graphs.entries, "no CUDA graph was captured"
    assert [s.output_token_ids for s in graphed] == [s.output_token_ids for s in eager]
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(torch.tensor([x["logprob"] for x in a.logprobs]),
                                   torch.tensor([x["logprob"] for x in b.logprobs]), atol=1e-4, rtol=1e-4)


def test_cuda_seeded_sampling_is_reproducible(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    a = _engine(path, torch.bfloat16, graphs=True).generate(_prompts(), params)
    b = _engine(path, torch.bfloat16, graphs=True).generate(_prompts(), params)
    assert [s.output_token_ids for s in a] == [s.output_token_ids for s in b]


def test_cuda_server_warm_up_captures_every_bucket_and_decodes_the_same(tiny_checkpoint):
    """warm_up captures every (batch, length) graph bucket at start-up; decoding afterwards replays them and gives
    the eager tokens."""
    pytest.importorskip("fastapi")  # expertyard.server needs the serve extra
    from expertyard.server.warmup import warm_up

    path, _ = tiny_checkpoint("qwen3_moe")
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=1)
    eager = _engine(path, torch.float32, graphs=False).generate(_prompts(), params)
    engine = _engine(path, torch.float32, graphs=True)
    warm_up(engine)
    graphs = engine.runner.graphs
    assert set(graphs.entries) == {(b, n) for b in graphs.batch_buckets for n in graphs.len_buckets}
    captured = len(graphs.entries)
    warmed = engine.generate(_prompts(), params)
    assert len(graphs.entries) == captured  # nothing new captured under "load"
    assert [s.output_token_ids for s in warmed] == [s.output_token_ids for s in eager]


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_cuda_async_scheduling_changes_no_output(arch, tiny_checkpoint):
    """Step t+1 launched (CUDA-graph decode, placeholders resolved on the device) before step t's tokens are
    read: the same tokens and log-probabilities as the synchronous engine, with queueing (5 prompts, 4 slots),
    seeded sampling and a stop token hit while the next step is in flight."""
    path, _ = tiny_checkpoint(arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 13, 2, 9, 1)]
    params = [SamplingParams(temperature=0, max_tokens=12, logprobs=1),
              SamplingParams(temperature=0.8, seed=5, max_tokens=9, logprobs=1),
              SamplingParams(temperature=0, max_tokens=16, logprobs=1),
              SamplingParams(temperature=0.8, seed=6, max_tokens=7, logprobs=1),
              SamplingParams(temperature=0, max_tokens=11, logprobs=1)]
    loaded = load_model(path, "cuda", torch.float32, progress=False)
    first = LLMEngine(loaded, None, EngineConfig(max_num_seqs=4, max_model_len=128), eos_token_ids=set())
    stop_at = first.generate(prompts, params)[2].output_token_ids[5]
    params[2].stop_token_ids = [stop_at]
    outs = []
    for a in (False, True):
        engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=4, max_model_len=128, async_scheduling=a),
                           eos_token_ids=set())
        seqs = engine.generate(prompts, params)
        outs.append([(s.output_token_ids, s.finish_reason, [e["logprob"] for e in s.logprobs]) for s in seqs])
    assert outs[1][2][1] == "stop"
    for got, ref in zip(outs[1], outs[0]):
        assert got[:2] == ref[:2]
        torch.testing.assert_close(torch.tensor(got[2]), torch.tensor(ref[2]), atol=1e-5, rtol=1e-5)
