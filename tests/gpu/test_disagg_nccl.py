"""Disaggregated and colocated expert parallelism on GPUs with NCCL: the CPU matrix (tests/test_disagg_cpu.py)
against a single-GPU resident run. float32: greedy tokens equal, log-probabilities within 1e-3; bfloat16:
teacher-forced prompt log-probabilities within bf16 tolerance and the first greedy token of every prompt equal
(later tokens may legitimately diverge after a near-tie flips under a different summation order)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import disagg_tiny_hf_config

from expertyard.disagg import jobs
from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.launch import launch_local
from expertyard.disagg.worker import ModelSource
from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.loader.bundled import bundled_model_path
from expertyard.experts.resident import ResidentExperts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA devices")]

MAX_TOKENS = 8


SOURCES = {"tiny": ModelSource(hf_config=disagg_tiny_hf_config(), std=0.15, name="tiny"),
           "bundled": ModelSource(model_dir=bundled_model_path(), name="tiny-moe")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.cache
def _reference(source_name: str, dtype_name: str):
    source = SOURCES[source_name]
    loaded = source.load(torch.device("cuda", 0), DTYPES[dtype_name], ResidentExperts)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, loaded.config.vocab_size, (n,), generator=g).tolist() for n in (5, 13, 2, 9, 1, 30)]
    engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=4, max_model_len=64, cuda_graphs=False),
                       eos_token_ids=set())
    out = jobs.greedy(engine, prompts, MAX_TOKENS)
    del engine, loaded
    torch.cuda.empty_cache()
    return prompts, out


CASES = [  # each launch costs ~15-25 s: the whole file must stay well inside benchmarks/gpu_disagg.sh's budget
    ("tiny", DisaggConfig(attention_ranks=1, expert_ranks=1), [1, 2, 3, 4]),
    ("tiny", DisaggConfig(attention_ranks=2, expert_ranks=2), [1, 2, 3, 4]),
    ("tiny", DisaggConfig(attention_ranks=1, expert_ranks=3), [1, 2, 3, 4]),
    ("tiny", DisaggConfig.colocated(4), [1, 2]),
    ("bundled", DisaggConfig(attention_ranks=2, expert_ranks=2), [1, 2, 3, 4]),
]
BF16_CASES = [CASES[1], CASES[4]]
MATRIX = [(*case, "float32") for case in CASES] + [(*case, "bfloat16") for case in BF16_CASES]


@pytest.mark.parametrize("source_name,cfg,ms,dtype_name", MATRIX,
                         ids=[f"{s}-{c.mode}-{c.attention_ranks}x{c.expert_ranks}-{d}" for s, c, _, d in MATRIX])
def test_nccl_deployment_matches_single_gpu(source_name, cfg, ms, dtype_name):
    if torch.cuda.device_count() < cfg.world_size:
        pytest.skip(f"needs {cfg.world_size} CUDA devices")
    prompts, ref = _reference(source_name, dtype_name)
    job = functools.partial(jobs.greedy_each_m, prompts=prompts, max_tokens=MAX_TOKENS, ms=ms)
    results = launch_local(cfg, SOURCES[source_name], EngineConfig(max_num_seqs=4, max_model_len=64), "cuda",
                           DTYPES[dtype_name], job)
    assert sorted(results) == [(m, a) for m in ms for a in (False, True)]  # async scheduling off and on
    for (m, a), got in results.items():
        if dtype_name == "float32":
            assert got["tokens"] == ref["tokens"], f"m={m}, async scheduling {a}"
            for a, b in zip(got["logprobs"], ref["logprobs"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-3, rtol=1e-3)
            tol = dict(atol=1e-3, rtol=1e-3)
        else:
            assert [t[0] for t in got["tokens"]] == [t[0] for t in ref["tokens"]], f"m={m}, async scheduling {a}"
            tol = dict(atol=0.15, rtol=0.05)
        torch.testing.assert_close(torch.tensor(got["prompt_logprobs"]), torch.tensor(ref["prompt_logprobs"]), **tol)
