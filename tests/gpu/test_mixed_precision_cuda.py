"""Mixed-precision offloading on CUDA: the speculative two-kernel pass (bf16/fp32 kernel over full copies, Triton
dequantizing kernel over low copies) against the naive float64 reference, batch 1 and batched; decode in
CUDA-graph pieces equals eager decode; all-FULL thresholds give the full-precision tokens."""

import pytest
import torch

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.entrypoints.common import bundled_model_path
from expertyard.experts.precision import PrecisionThresholds
from expertyard.loader import load_model

from test_mixed_precision_offload import _offloaded, check_pairs_against_naive_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("arch,bits,group", [("qwen3_moe", 4, 32), ("mixtral", 8, 16)])
@pytest.mark.parametrize("tokens", [1, 2])
def test_cuda_each_pair_uses_the_copy_the_rule_gives_it(arch, bits, group, tokens, tiny_checkpoint):
    """(int2 needs groups of >= 64 columns in the Triton kernel: the bundled model covers it below.)"""
    path, _ = tiny_checkpoint(arch)
    # pools that hold a visit's tokens x top-k (<= 3 here) experts: larger visits run at full precision by design
    loaded = _offloaded(path, high_slots=3 * tokens + 1, low_slots=3 * tokens + 3, bits=bits, device="cuda",
                        group_size=group)
    check_pairs_against_naive_reference(loaded, device="cuda", tokens=tokens, atol=2e-4)


def _bundled_engine(graphs, thresholds=None, mode="mixed", bits=4):
    loaded = _offloaded(bundled_model_path(), high_slots=12, low_slots=16, bits=bits, mode=mode,
                        thresholds=thresholds, depth=1, device="cuda", group_size=64, dtype=torch.bfloat16)
    return LLMEngine(loaded, None, EngineConfig(max_num_seqs=2, max_model_len=128, cuda_graphs=graphs),
                     eos_token_ids=set())


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 2000, (n,), generator=g).tolist() for n in (7, 12)]


@pytest.mark.parametrize("mode,bits", [("mixed", 4), ("low", 2), ("mixed", 8)])
def test_cuda_mixed_piecewise_graph_decode_equals_eager(mode, bits):
    params = SamplingParams(temperature=0, max_tokens=24)
    eager = _bundled_engine(False, mode=mode, bits=bits)
    graphed = _bundled_engine(True, mode=mode, bits=bits)
    a = eager.generate(_prompts(), params)
    b = graphed.generate(_prompts(), params)
    assert graphed.runner.graphs.entries
    assert [s.output_token_ids for s in a] == [s.output_token_ids for s in b]
    r = graphed.model.experts.report(tokens=48)
    assert r["expert_low_misses"] > 0 and r["pairs_low_fraction"] > 0


def test_cuda_all_full_thresholds_give_full_precision_tokens():
    params = SamplingParams(temperature=0, max_tokens=24)
    ref = LLMEngine(load_model(bundled_model_path(), "cuda", torch.bfloat16, progress=False), None,
                    EngineConfig(max_num_seqs=2, max_model_len=128, cuda_graphs=True), eos_token_ids=set())
    ours = _bundled_engine(True, thresholds=PrecisionThresholds(1.0, 1.0))
    assert ([s.output_token_ids for s in ours.generate(_prompts(), params)]
            == [s.output_token_ids for s in ref.generate(_prompts(), params)])
    assert ours.model.experts.pairs_served["low"] == 0
