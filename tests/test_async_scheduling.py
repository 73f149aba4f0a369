"""Async scheduling (EngineConfig.async_scheduling) changes when the host reads tokens, never what they are: the
same workload gives the same tokens, finish reasons, texts and log-probabilities with it on as off (the
synchronous engine is checked against transformers in test_parity.py and test_scheduler.py). Placeholders
(engine/placeholders.py) are checked against a plain loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.placeholders import placeholder, resolve
from expertyard.engine.sampling_params import SamplingParams
from expertyard.entrypoints.common import bundled_model_path, load_tokenizer
from expertyard.loader import load_model


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_path()
    return load_model(path, torch.device("cpu"), torch.float32, progress=False), load_tokenizer(path)


def _engine(bundled, async_scheduling: bool, max_num_seqs: int, max_model_len: int = 64) -> LLMEngine:
    loaded, tokenizer = bundled
    return LLMEngine(loaded, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                                     max_num_batched_tokens=32, async_scheduling=async_scheduling))


def _run(engine: LLMEngine, requests, on_step=None) -> list[tuple]:
    seqs = [engine.add_request(p, sp) for p, sp in requests]
    step = 0
    while engine.has_unfinished():
        got = engine.step()
        step += 1
        for s in seqs:  # what a server streams: never a placeholder
            assert all(t >= 0 for t in s.output_token_ids), s.output_token_ids
        assert all(s.output_token_ids for s in got)
        if on_step is not None:
            on_step(engine, seqs, step)
    return [(s.output_token_ids, s.finish_reason, s.text, [round(e["logprob"], 4) for e in s.logprobs])
            for s in seqs]


def test_resolve_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    sampled = torch.randint(0, 1000, (7,), generator=g)
    ids = torch.randint(0, 1000, (20,), generator=g)
    rows = [3, 0, 6, 6, 1]
    at = [0, 4, 5, 11, 19]
    for i, r in zip(at, rows):
        ids[i] = placeholder(r)
    want = ids.clone()
    for i, r in zip(at, rows):
        want[i] = sampled[r]
    assert torch.equal(resolve(ids, sampled), want)
    assert torch.equal(resolve(want, None), want)


@settings(max_examples=12, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), max_num_seqs=st.integers(1, 4), max_model_len=st.integers(12, 40))
def test_async_scheduling_changes_no_output(bundled, data, n, max_num_seqs, max_model_len):
    vocab = bundled[0].config.vocab_size
    requests = []
    for i in range(n):
        prompt = data.draw(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=10), label=f"prompt {i}")
        sampled = data.draw(st.booleans(), label=f"sampled {i}")
        requests.append((prompt, SamplingParams(
            temperature=0.9 if sampled else 0.0, seed=i if sampled else None,
            max_tokens=data.draw(st.integers(1, 14), label=f"max_tokens {i}"),
            logprobs=data.draw(st.sampled_from([None, 2]), label=f"logprobs {i}"))))
    first = _run(_engine(bundled, False, max_num_seqs, max_model_len), requests)
    # stop tokens that do occur mid-output: the async engine has launched a step past them
    for i, (tokens, *_rest) in enumerate(first):
        if len(tokens) >= 3 and data.draw(st.booleans(), label=f"stop {i}"):
            requests[i][1].stop_token_ids = [tokens[data.draw(st.integers(1, len(tokens) - 2), label=f"at {i}")]]
    sync = _run(_engine(bundled, False, max_num_seqs, max_model_len), requests)
    assert _run(_engine(bundled, True, max_num_seqs, max_model_len), requests) == sync


def test_abort_and_scoring_while_a_step_is_in_flight(bundled):
    requests = [([5, 9, 14, 3], SamplingParams(temperature=0, max_tokens=12)) for _ in range(3)]
    ref = _run(_engine(bundled, False, 4), requests)
    prompt = [7, 8, 9, 10, 11]
    score_ref = _engine(bundled, False, 4).score(prompt)
    scored = []

    def on_step(engine, seqs, step):
        if step == 4:
            assert engine._in_flight is not None and seqs[1].pending  # a placeholder is in flight
            engine.abort(seqs[1])
            scored.append(engine.score(prompt))  # the scratch row, between async steps

    got = _run(_engine(bundled, True, 4), requests, on_step)
    assert got[1][1] == "abort"
    tokens = got[1][0]
    assert 0 < len(tokens) < 12 and tokens == ref[1][0][:len(tokens)]
    assert got[0] == ref[0] and got[2] == ref[2]
    torch.testing.assert_close(scored[0], score_ref)


def test_length_capped_sequences_are_not_scheduled_past_their_last_token(bundled):
    """max_tokens and max_model_len end a sequence without reading its token: no step is launched for it."""
    engine = _engine(bundled, True, 2, max_model_len=10)
    seqs = [engine.add_request([4, 5, 6], SamplingParams(temperature=0, max_tokens=3)),
            engine.add_request([4, 5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))]
    computed = []
    while engine.has_unfinished():
        engine.step()
        computed.append({id(s.seq): s.start + s.length for s in engine.last_step.spans})
    assert [len(s.output_token_ids) for s in seqs] == [3, 5]
    assert [s.finish_reason for s in seqs[:2]] == ["length", "length"]
    for s, total in zip(seqs, (3 + 3, 10)):
        # the last token is sampled, never fed back: the sequence's positions end one short of its length
        assert max(c.get(id(s), 0) for c in computed) == total - 1


def test_switching_async_scheduling_between_steps_reports_every_token(bundled):
    """The benchmarks switch the setting on a live engine: every token is still reported once by `step()` (what
    a server streams), and the outputs are the synchronous engine's."""
    requests = [([5, 9, 14, 3], SamplingParams(temperature=0, max_tokens=10)),
                ([8, 2, 7], SamplingParams(temperature=0, max_tokens=7))]
    ref = _run(_engine(bundled, False, 4), requests)
    engine = _engine(bundled, True, 4)
    seqs = [engine.add_request(p, sp) for p, sp in requests]
    reported = {s.seq_id: 0 for s in seqs}
    step = 0
    while engine.has_unfinished():
        step += 1
        engine.config.async_scheduling = step % 3 != 0  # off every third step
        for s in engine.step():
            reported[s.seq_id] += 1
    assert [s.output_token_ids for s in seqs] == [r[0] for r in ref]
    assert [reported[s.seq_id] for s in seqs] == [len(r[0]) for r in ref]
