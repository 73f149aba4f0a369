"""Structured outputs on CUDA: the grammar bitmask goes to the device without a host sync and masks the same
tokens as on the CPU; constrained and free requests in one batch on a CUDA engine (CUDA graphs, async scheduling
too) give the model's best allowed token at every position, and the answers validate."""

import json

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from expertyard.engine.grammar_masks import apply_grammars  # noqa: E402
from expertyard.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from expertyard.engine.sampling_params import SamplingParams  # noqa: E402
from expertyard.entrypoints.common import bundled_model_path, load_tokenizer  # noqa: E402
from expertyard.loader import load_model  # noqa: E402
from expertyard.structured import GrammarConstraint, Grammars  # noqa: E402

from test_structured import PERSON, allowed_tokens, validate  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def engine():
    path = bundled_model_path()
    return LLMEngine(load_model(path, "cuda", torch.float32, progress=False), load_tokenizer(path),
                     EngineConfig(max_num_seqs=8, max_model_len=256, cuda_graphs=True))


@pytest.fixture(scope="module")
def grammars(engine):
    return Grammars(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)


class _Span:  # what apply_grammars reads of a sampling span
    def __init__(self, seq):
        self.seq = seq


class _Seq:
    def __init__(self, seq_id, grammar, out):
        self.seq_id, self.params, self.pending = seq_id, SamplingParams(grammar=grammar), False
        self.token_ids, self.num_prompt_tokens = list(out), 0


def test_cuda_mask_equals_cpu_mask(grammars, engine):
    """The same rows masked to -inf on the GPU as on the CPU, free rows untouched."""
    compiled = grammars.json_schema(PERSON)
    vocab = engine.model_config.vocab_size
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))  # [N, V]
    results = []
    for device in ("cpu", "cuda"):
        seqs = [_Seq(0, GrammarConstraint(compiled), []), _Seq(1, None, []), _Seq(2, GrammarConstraint(compiled), [])]
        x = logits.to(device)
        apply_grammars(x, [_Span(s) for s in seqs])
        results.append(x.cpu())
    cpu, cuda = results
    assert torch.equal(cpu.isinf(), cuda.isinf())
    assert torch.equal(cuda[1], logits[1])
    allowed = next(allowed_tokens(compiled, [0], vocab))  # the first position's mask from an independent matcher
    assert torch.equal(~cuda[0].isinf(), allowed)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_cuda_constrained_and_free_in_one_batch(engine, grammars, async_scheduling):
    engine.config.async_scheduling = async_scheduling
    try:
        schema = grammars.json_schema(PERSON)
        prompts = ["Once upon a time", "The king said"]
        params = [SamplingParams(temperature=0, max_tokens=100, grammar=GrammarConstraint(schema)),
                  SamplingParams(temperature=0, max_tokens=20)]
        person, free = engine.generate(prompts, params)
        alone = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=20))[0]
    finally:
        engine.config.async_scheduling = False
    assert free.output_token_ids == alone.output_token_ids
    assert person.finish_reason == "stop", person.text
    ids, out = person.prompt_token_ids, person.output_token_ids[:-1]
    vocab = engine.model_config.vocab_size
    _, top_v, top_i = engine.prompt_logprobs(ids + out, top=vocab)
    for j, (token, allowed) in enumerate(zip(out, allowed_tokens(schema, out, vocab))):
        logp = torch.full((vocab,), float("-inf"))
        logp[top_i[len(ids) - 1 + j]] = top_v[len(ids) - 1 + j]
        assert token == int(logp.masked_fill(~allowed, float("-inf")).argmax()), f"position {j}"
    validate(json.loads(person.text), PERSON)
