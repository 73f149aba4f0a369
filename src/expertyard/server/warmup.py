"""Run the step sizes a server meets before its first client does.

Triton compiles the fused-MoE and routing-alignment kernels once per block configuration, and the
configuration follows the number of tokens in a step (decode-sized to prefill-sized tiles, split-K, integer
arguments specialised on divisibility). Under load, steps mix a few prompt chunks with the running decodes, so
their sizes wander over 1..max_num_batched_tokens, and each first compile stalls every running stream for
1-2 s: on an H200 with OLMoE shapes, 30 of 1675 steps of a benchmark took 0.01-2.5 s (12 s in all) while the
other 1645 took under 10 ms. Warming up on a geometric grid of sizes moves those compiles to start-up.
"""

from __future__ import annotations

import time

import torch

from expertyard.engine.llm_engine import LLMEngine
from expertyard.engine.sampling_params import SamplingParams


def warmup_sizes(limit: int, ratio: float = 1.25) -> list[int]:
    """1, 2, 3, ... growing by `ratio`, up to `limit` (the most tokens one step holds)."""
    limit = max(1, limit)
    sizes, n = {limit}, 1.0
    while n < limit:
        sizes.add(int(n))
        n = max(n * ratio, n + 1)
    return sorted(sizes)


def warm_up(engine: LLMEngine) -> float:
    """Prefill each grid size alone, decode a full batch, run the step compositions of a loaded server, then
    capture every decode graph bucket; returns the seconds it took."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    longest = max(1, engine.max_model_len - 2)  # a prompt must leave room for its tokens
    for n in warmup_sizes(engine.config.max_num_batched_tokens):
        # steps past one prompt's length hold several prompts: warm those sizes up as several prompts at once
        lengths = [longest] * (n // longest) + ([n % longest] if n % longest else [])
        if len(lengths) > engine.config.max_num_seqs:
            break
        engine.generate([torch.randint(vocab, (m,), generator=g).tolist() for m in lengths], params)
    batch = [torch.randint(vocab, (4,), generator=g).tolist() for _ in range(engine.config.max_num_seqs)]
    engine.generate(batch, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    _warm_compositions(engine, g)
    if engine.runner.graphs is not None:  # batch sizes and context lengths vary under load: every bucket now
        engine.runner.graphs.capture_all()
    return time.perf_counter() - t0


def _warm_compositions(engine: LLMEngine, g: torch.Generator) -> None:
    """Steps a loaded server meets and the size grid does not: every slot's prompt in one step (the padded
    multi-prompt attention), and a prompt joining running decodes (an eager step mixing both)."""
    vocab, seqs = engine.model_config.vocab_size, engine.config.max_num_seqs
    budget = engine.config.max_num_batched_tokens
    short = max(1, min(engine.max_model_len - 4, budget // seqs))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for _ in range(seqs):
        engine.add_request(torch.randint(vocab, (short,), generator=g).tolist(), params)
    engine.step()  # one step holding many prompts (or as many as the token budget lets in)
    while engine.has_unfinished():
        engine.step()
    for _ in range(max(1, seqs - 1)):
        engine.add_request(torch.randint(vocab, (4,), generator=g).tolist(), params)
    engine.step()  # their prefill; the next step decodes them beside a new prompt
    engine.add_request(torch.randint(vocab, (short,), generator=g).tolist(), params)
    while engine.has_unfinished():
        engine.step()
