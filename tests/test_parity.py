"""expertyard's model code against transformers on tiny random checkpoints of every architecture."""

import pytest
import torch

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.loader import load_model

from conftest import ARCH_CASES

DECODE_STEPS = 10


def _engine(path, max_num_seqs=4):
    loaded = load_model(path, "cpu", torch.float32, progress=False)
    return LLMEngine(loaded, tokenizer=None, config=EngineConfig(max_num_seqs=max_num_seqs, max_model_len=128,
                                                                 cuda_graphs=False), eos_token_ids=set())


def _prompt(length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (length,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_prefill_and_decode_logits_match_transformers(arch, tiny_checkpoint):
    path, hf = tiny_checkpoint(arch)
    engine = _engine(path)
    prompt = _prompt(11, seed=1)
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=DECODE_STEPS))
    ours = []  # logits of every sampling step: prefill's last position, then each decode step
    while not seq.finished:
        step = engine.scheduler.schedule()
        logits = engine.runner.run(step)
        ours.append(logits[0])
        engine.scheduler.running[0].num_computed += step.spans[0].length
        seq.token_ids.append(int(logits[0].argmax()))
        if len(seq.output_token_ids) >= DECODE_STEPS:
            engine.scheduler.finish(seq, "length")
    with torch.no_grad():
        ref = hf(torch.tensor([seq.token_ids])).logits[0]  # [L, V]: one full forward of the same tokens
    ref = ref[len(prompt) - 1:len(seq.token_ids) - 1]
    ours = torch.stack(ours)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_greedy_tokens_match_transformers_generate(arch, tiny_checkpoint):
    path, hf = tiny_checkpoint(arch)
    prompt = _prompt(7, seed=2)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0, min_new_tokens=12)[0, len(prompt):].tolist()
    (seq,) = _engine(path).generate([prompt], SamplingParams(temperature=0, max_tokens=12))
    assert seq.output_token_ids == ref


@pytest.mark.parametrize("arch", ["mixtral_sliding", "qwen2_moe", "deepseek_v2_full"])
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(arch, tiny_checkpoint):
    path, _ = tiny_checkpoint(arch)
    prompts = [_prompt(n, seed=n) for n in (3, 17, 9, 1)]
    params = SamplingParams(temperature=0, max_tokens=8)
    alone = [_engine(path).generate([p], params)[0].output_token_ids for p in prompts]
    batched = [s.output_token_ids for s in _engine(path, max_num_seqs=4).generate(prompts, params)]
    assert batched == alone


def test_chunked_prefill_matches_whole_prefill(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen3_moe")
    prompt = _prompt(40, seed=5)
    params = SamplingParams(temperature=0, max_tokens=6)
    whole = _engine(path).generate([prompt], params)[0].output_token_ids
    loaded = load_model(path, "cpu", torch.float32, progress=False)
    chunked = LLMEngine(loaded, None, EngineConfig(max_num_seqs=2, max_model_len=128, max_num_batched_tokens=7,
                                                   cuda_graphs=False), eos_token_ids=set())
    assert chunked.generate([prompt], params)[0].output_token_ids == whole
