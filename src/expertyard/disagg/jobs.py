"""What rank 0 does with the distributed engine in tests and benchmarks (module-level, so they can be pickled
into launched processes)."""

from __future__ import annotations

import time

import numpy as np
import torch

from expertyard.engine.llm_engine import LLMEngine
from expertyard.engine.sampling_params import SamplingParams


def greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Greedy tokens, the chosen tokens' log-probabilities, and the prompt log-probabilities of prompts[0]."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    seqs = engine.generate(prompts, params)
    return {"tokens": [s.output_token_ids for s in seqs],
            "logprobs": [[e["logprob"] for e in s.logprobs] for s in seqs],
            "prompt_logprobs": engine.score(prompts[0]).tolist()}


def greedy_each_m(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, ms: list[int],
                  schedulings: tuple[bool, ...] = (False, True)) -> dict[tuple[int, bool], dict]:
    """`greedy` once per number of micro-batches and per async-scheduling setting, on one running deployment:
    {(m, async_scheduling): result}."""
    out = {}
    for m in ms:
        engine.runner.micro_batches = m
        for a in schedulings:
            engine.config.async_scheduling = a
            out[m, a] = greedy(engine, prompts, max_tokens)
    return out


def decode_throughput(engine: LLMEngine, batch: int, prompt_len: int, decode_tokens: int, ms: list[int],
                      seed: int = 0, schedulings: tuple[bool, ...] = (False,)) -> list[dict]:
    """Per m and async-scheduling setting: decode tokens/s and time per output token at a fixed batch (greedy,
    EOS ignored), after one warm-up pass. Every prompt is prefilled first (in as many steps as the token budget
    needs, no decode token in between: `Scheduler.prefill_first`), then timing covers decode steps of the whole
    batch only. (Before, sequences prefilled early decoded while later prompts were still prefilling, so at 2,048
    prompts of 256+ tokens most of the batch had finished before the timed steps: those TPOTs were not at the
    stated batch.) Prefill runs synchronously; with async scheduling on, the timed loop starts with the last
    prefill step's tokens read, so it times the decode steps alone."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, engine.model_config.vocab_size, (batch, prompt_len), generator=gen).tolist()
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    out = []
    held = engine.scheduler.prefill_first, engine.config.async_scheduling
    engine.scheduler.prefill_first = True
    try:
        for m in ms:
            engine.runner.micro_batches = m
            for a in schedulings:
                for timed in (False, True):
                    engine.config.async_scheduling = False
                    seqs = [engine.add_request(p, params) for p in prompts]
                    while any(not s.output_token_ids for s in seqs):
                        engine.step()  # prefill
                    _sync(engine)
                    before = sum(len(s.output_token_ids) for s in seqs)
                    engine.config.async_scheduling = a
                    t0 = time.perf_counter()
                    ends = []  # host time after each step: intervals show hiccups the mean hides
                    while engine.has_unfinished():
                        engine.step()
                        ends.append(time.perf_counter())
                    _sync(engine)
                    dt = time.perf_counter() - t0
                    steps = len(ends)
                    assert all(len(s.output_token_ids) == decode_tokens for s in seqs)
                assert before == batch, \
                    f"{before} tokens were generated before the timed decode steps, not one per prompt"
                generated = batch * decode_tokens - before
                out.append({"micro_batches": m, "async_scheduling": a, "decode_tokens_per_s": generated / dt,
                            # decode_tokens - 1 decode steps ran (with async scheduling `steps` counts one more
                            # call, which only reads the last step's tokens)
                            "tpot_ms": 1e3 * dt / (decode_tokens - 1), "steps": steps,
                            **_interval_stats(t0, ends)})
    finally:
        engine.scheduler.prefill_first, engine.config.async_scheduling = held
    return out


def _interval_stats(t0: float, ends: list[float]) -> dict:
    """Median and longest host interval between consecutive step() returns, ms. Under async scheduling a step()
    returns the previous step's tokens, so its interval is the pipeline's pace; a median well under the mean
    (TPOT) means a few slow steps (a graph capture, a garbage-collector pause) carry the difference."""
    gaps = np.diff([t0, *ends]) * 1e3
    return {"step_ms_median": float(np.median(gaps)), "step_ms_max": float(gaps.max())} if len(gaps) else {}


PREFILL_TOKENS_PER_STEP = 16384  # the benchmark's prefill runs in chunks: buffers and activations stay bounded


def bench_job(engine: LLMEngine, batch_sizes: list[int], prompt_len: int, decode_tokens: int, ms: list[int],
              seed: int, schedulings: tuple[bool, ...] = (False,)) -> dict[int, list[dict]]:
    """`decode_throughput` at each batch size: {batch: rows} (`expertyard bench --disaggregate`, plan calibration)."""
    return {b: decode_throughput(engine, b, prompt_len, decode_tokens, ms, seed, schedulings) for b in batch_sizes}

def _sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
