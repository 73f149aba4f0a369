"""The scheduler on counts only (fake sequences, invariants checked every step), then the engine's finish
reasons and continuous batching on a tiny model against transformers' greedy generate."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.engine.scheduler import ScheduledStep, Scheduler
from expertyard.engine.sequence import Sequence, SequenceStatus
from expertyard.errors import RequestError
from expertyard.loader import load_model


# ---- scheduler alone ----------------------------------------------------------------------------------
def _seq(prompt_len: int, max_tokens: int = 4) -> Sequence:
    return Sequence(prompt_token_ids=list(range(prompt_len)), params=SamplingParams(max_tokens=max_tokens))


class Harness:
    """Drives a Scheduler the way the engine does (count updates, one fake token per sampling span) and
    checks the scheduling rules on every step."""

    def __init__(self, max_num_seqs: int, budget: int, prefill_first: bool = False):
        self.max_num_seqs, self.budget = max_num_seqs, budget
        self.s = Scheduler(max_num_seqs, budget)
        self.s.prefill_first = prefill_first
        self.computed: dict[int, list[tuple[int, int]]] = {}  # seq_id -> spans (start, length) in order

    def add(self, seq: Sequence) -> Sequence:
        self.s.add(seq)
        return seq

    def step(self) -> ScheduledStep:
        s = self.s
        decoding = [q for q in s.running if q.num_uncomputed == 1]
        prefilling = [q for q in s.running if q.num_uncomputed > 1]
        waiting = list(s.waiting)
        free_before = len(s.free_slots)
        step = s.schedule()

        assert step.num_tokens <= self.budget
        assert step.spans or not (waiting or decoding or prefilling)  # progress whenever there is work
        for span in step.spans:
            assert span.start == span.seq.num_computed and 1 <= span.length <= span.seq.num_uncomputed
        assert all(span.length == 1 for span in step.decodes)
        # decodes first: every decoding sequence gets its token while the budget lasts, in running order
        # (prefill_first: none while a prompt is part-prefilled or waits with a slot free)
        held = s.prefill_first and ((waiting and free_before) or prefilling)
        assert [span.seq for span in step.decodes] == ([] if held else decoding[:self.budget])
        if step.prefills and not held:
            assert len(decoding) < self.budget
        # then running prompts, then new ones, FIFO, only into free slots and only if the rest fully fit
        admitted = [span.seq for span in step.prefills if span.seq in waiting]
        assert admitted == waiting[:len(admitted)] and len(admitted) <= free_before
        assert [span.seq for span in step.prefills][:len(step.prefills) - len(admitted)] == \
            [q for q in prefilling if any(sp.seq is q for sp in step.prefills)]
        if admitted:
            full = {sp.seq.seq_id: sp.length for sp in step.prefills}
            assert all(full.get(q.seq_id) == q.num_uncomputed for q in prefilling)
        # slots: at most max_num_seqs running, each in its own slot
        slots = [q.slot for q in s.running]
        assert len(slots) <= self.max_num_seqs and len(set(slots)) == len(slots)
        assert all(0 <= x < self.max_num_seqs for x in slots) and not set(slots) & set(s.free_slots)
        assert len(slots) + len(s.free_slots) == self.max_num_seqs
        assert all(q.slot == -1 and q.status is SequenceStatus.WAITING for q in s.waiting)

        # what the engine does with the results
        sampling = [span for span in step.spans if span.samples]
        self.sampled = [span.seq for span in sampling]
        for span in step.spans:
            self.computed.setdefault(span.seq.seq_id, []).append((span.start, span.length))
            span.seq.num_computed += span.length
        for span in sampling:
            seq = span.seq
            seq.token_ids.append(7)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                s.finish(seq, "length")
        return step


workloads = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 6), st.integers(0, 15)), min_size=1, max_size=10)


@settings(max_examples=300, deadline=None)
@given(workloads, st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**32 - 1), st.booleans())
def test_scheduling_rules_hold_on_random_workloads(work, max_num_seqs, budget, seed, prefill_first):
    """Random prompt lengths, output lengths, arrival steps and aborts, decodes first or prefills first; every
    step is checked by Harness (among others: a step makes progress whenever there is work)."""
    rng = random.Random(seed)
    h = Harness(max_num_seqs, budget, prefill_first)
    pending = sorted(((arrive, _seq(n, m)) for n, m, arrive in work), key=lambda x: x[0])
    seqs = [q for _, q in pending]
    aborted = set()
    t = 0
    while pending or h.s.has_work():
        while pending and pending[0][0] <= t:
            h.add(pending.pop(0)[1])
        if rng.random() < 0.05 and (h.s.waiting or h.s.running):  # abort a waiting or running sequence
            victim = rng.choice(list(h.s.waiting) + h.s.running)
            slot, was_running = victim.slot, victim.status is SequenceStatus.RUNNING
            h.s.finish(victim, "abort")
            aborted.add(victim.seq_id)
            assert victim.finished and victim.finish_reason == "abort" and victim.slot == -1
            assert victim not in h.s.running and victim not in h.s.waiting
            assert (slot in h.s.free_slots) == was_running
        h.step()
        t += 1
        assert t < 2000
    for q in seqs:
        assert q.finished
        spans = h.computed.get(q.seq_id, [])
        assert [start for start, _ in spans] == [sum(n for _, n in spans[:i]) for i in range(len(spans))]
        if q.seq_id not in aborted:
            assert q.finish_reason == "length" and len(q.output_token_ids) == q.params.max_tokens
            # every token but the last generated one went through the model exactly once
            assert sum(n for _, n in spans) == len(q.token_ids) - 1


def test_long_prompt_is_prefilled_in_chunks_then_decoded():
    h = Harness(max_num_seqs=2, budget=16)
    seq = h.add(_seq(50, max_tokens=3))
    chunks = []
    for _ in range(4):
        step = h.step()
        assert not step.decodes
        (span,) = step.prefills
        chunks.append((span.start, span.length, seq in h.sampled))
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    assert len(seq.output_token_ids) == 1
    step = h.step()
    assert not step.prefills and [(s.start, s.length) for s in step.decodes] == [(50, 1)]


def test_decodes_are_scheduled_before_new_prefills():
    h = Harness(max_num_seqs=4, budget=4)
    olds = [h.add(_seq(1, max_tokens=10)) for _ in range(3)]
    h.step()  # three one-token prompts
    new = h.add(_seq(10))
    step = h.step()
    assert [s.seq for s in step.decodes] == olds
    assert [(s.seq, s.start, s.length) for s in step.prefills] == [(new, 0, 1)]
    step = h.step()  # decodes again first; the new prompt's next chunk gets the one token left
    assert [s.seq for s in step.decodes] == olds and [(s.seq, s.start, s.length) for s in step.prefills] == \
        [(new, 1, 1)]


def test_prefill_first_holds_decodes_until_every_prompt_is_in_the_cache():
    h = Harness(max_num_seqs=4, budget=6, prefill_first=True)
    seqs = [h.add(_seq(4, max_tokens=5)) for _ in range(3)]
    shapes = []
    while not all(len(s.output_token_ids) == 5 for s in seqs):
        step = h.step()
        shapes.append((sum(s.length for s in step.prefills), len(step.decodes)))
    # 12 prompt tokens in budgets of 6 (no decode meanwhile, although the first prompt is done after step 1),
    # then the three sequences decode together in every step
    assert shapes == [(6, 0), (6, 0), (0, 3), (0, 3), (0, 3), (0, 3)]


def test_new_prompt_waits_while_decodes_use_the_whole_budget():
    h = Harness(max_num_seqs=4, budget=2)
    olds = [h.add(_seq(1, max_tokens=10)) for _ in range(2)]
    h.step()
    olds.append(h.add(_seq(1, max_tokens=10)))
    h.step()  # two decodes fill the budget: the third prompt waits
    assert olds[2].status is SequenceStatus.WAITING
    step = h.step()
    assert [s.seq for s in step.decodes] == olds[:2] and not step.prefills


def test_max_num_seqs_and_slot_reuse():
    h = Harness(max_num_seqs=2, budget=100)
    a, b, c = h.add(_seq(3, max_tokens=1)), h.add(_seq(3, max_tokens=3)), h.add(_seq(3, max_tokens=2))
    h.step()
    assert a.finished and b.status is SequenceStatus.RUNNING and c.status is SequenceStatus.WAITING
    slot_b = b.slot
    step = h.step()  # a's slot is free again: c takes it while b decodes
    assert [s.seq for s in step.decodes] == [b] and [s.seq for s in step.prefills] == [c]
    assert c.slot != slot_b and sorted([c.slot, slot_b]) == [0, 1]


def test_abort_of_waiting_and_of_running_sequence_frees_its_place():
    h = Harness(max_num_seqs=1, budget=100)
    a, b, c = h.add(_seq(4, max_tokens=50)), h.add(_seq(4)), h.add(_seq(4))
    h.step()
    assert a.status is SequenceStatus.RUNNING and list(h.s.waiting) == [b, c]
    h.s.finish(b, "abort")  # waiting: leaves the queue, never runs
    assert b.finish_reason == "abort" and b.finished and list(h.s.waiting) == [c]
    slot = a.slot
    h.s.finish(a, "abort")  # running: its slot is free for the next one
    assert h.s.free_slots == [slot] and not h.s.running
    step = h.step()
    assert [s.seq for s in step.prefills] == [c] and c.slot == slot
    assert b.seq_id not in h.computed


# ---- the engine on a tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path, hf = tiny_checkpoint("qwen3_moe")
    return path, hf, load_model(path, "cpu", torch.float32, progress=False)


def _engine(loaded, **kw) -> LLMEngine:
    kw = {"max_num_seqs": 2, "max_model_len": 64, "cuda_graphs": False, **kw}
    return LLMEngine(loaded, None, EngineConfig(**kw), eos_token_ids=set())


def _prompt(length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (length,), generator=g).tolist()


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_finish_reasons_stop_token_length_and_max_model_len(tiny):
    path, hf, loaded = tiny
    prompt = _prompt(9, seed=11)
    ref = _hf_greedy(hf, prompt, 12)
    k = next(i for i in range(2, 12) if ref[i] not in ref[:i])  # a token first generated at step k
    # stop_token_ids: generation ends at (and includes) the stop token
    (seq,) = _engine(loaded).generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                                stop_token_ids=[ref[k]]))
    assert seq.output_token_ids == ref[:k + 1] and seq.finish_reason == "stop"
    # eos of the model, unless ignore_eos
    eng = LLMEngine(loaded, None, EngineConfig(max_num_seqs=2, max_model_len=64, cuda_graphs=False),
                    eos_token_ids={ref[k]})
    a, b = eng.generate([prompt, prompt], [GREEDY, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)])
    assert (a.output_token_ids, a.finish_reason) == (ref[:k + 1], "stop")
    assert (b.output_token_ids, b.finish_reason) == (ref, "length")
    # max_tokens
    (seq,) = _engine(loaded).generate([prompt], SamplingParams(temperature=0, max_tokens=5))
    assert (seq.output_token_ids, seq.finish_reason) == (ref[:5], "length")
    # max_model_len: prompt + output never exceed it
    eng = _engine(loaded, max_model_len=len(prompt) + 4)
    (seq,) = eng.generate([prompt], GREEDY)
    assert (seq.output_token_ids, seq.finish_reason) == (ref[:4], "length")
    assert len(seq.token_ids) == eng.max_model_len
    with pytest.raises(RequestError, match="max_model_len"):
        eng.add_request(_prompt(len(prompt) + 4, seed=1), GREEDY)


def test_request_added_while_another_runs_gives_the_same_tokens(tiny):
    path, hf, loaded = tiny
    pa, pb = _prompt(7, seed=21), _prompt(13, seed=22)
    ref_a, ref_b = _hf_greedy(hf, pa, 12), _hf_greedy(hf, pb, 12)
    eng = _engine(loaded, max_num_batched_tokens=5)  # both prompts are chunked, B's beside A's decodes
    a = eng.add_request(pa, GREEDY)
    for _ in range(3):
        eng.step()
    assert len(a.output_token_ids) == 2 and not a.finished
    b = eng.add_request(pb, GREEDY)
    mixed = False
    while eng.has_unfinished():
        ran = eng.step()
        mixed |= a in ran and b in eng.scheduler.running and b.num_computed < len(pb)  # B prefills beside A
    assert mixed
    assert a.output_token_ids == ref_a and b.output_token_ids == ref_b


def test_slot_of_an_aborted_sequence_is_reused_cleanly(tiny):
    path, hf, loaded = tiny
    pa, pb = _prompt(20, seed=31), _prompt(6, seed=32)
    eng = _engine(loaded, max_num_seqs=1)
    a = eng.add_request(pa, GREEDY)
    b = eng.add_request(pb, SamplingParams(temperature=0, max_tokens=8))
    eng.step()
    eng.step()
    assert b.status is SequenceStatus.WAITING and len(a.output_token_ids) == 2
    eng.abort(a)  # b gets a's slot, whose KV cache still holds a's longer context
    while eng.has_unfinished():
        eng.step()
    assert a.finish_reason == "abort" and len(a.output_token_ids) == 2
    assert b.output_token_ids == _hf_greedy(hf, pb, 8)


def test_seeded_sampling_is_reproducible_alone_and_batched(tiny):
    _, _, loaded = tiny
    prompt = _prompt(8, seed=41)
    params = SamplingParams(temperature=1.5, max_tokens=10, seed=123)
    (alone,) = _engine(loaded).generate([prompt], params)
    others = [_prompt(5, seed=42), _prompt(11, seed=43)]
    batch = _engine(loaded, max_num_seqs=3).generate(
        [others[0], prompt, others[1]], [SamplingParams(temperature=1.0, max_tokens=6), params,
                                         SamplingParams(temperature=0.7, max_tokens=10, seed=5)])
    assert batch[1].output_token_ids == alone.output_token_ids
    (other_seed,) = _engine(loaded).generate([prompt], SamplingParams(temperature=1.5, max_tokens=10, seed=124))
    assert other_seed.output_token_ids != alone.output_token_ids


def test_prefill_first_decodes_when_waiting_prompts_have_no_slot():
    """More prompts than slots: the running sequences must decode to the end to free a slot (holding them
    for the waiting prompts would stall forever)."""
    h = Harness(max_num_seqs=2, budget=8, prefill_first=True)
    first = [h.add(_seq(3, max_tokens=2)) for _ in range(2)]
    late = h.add(_seq(3, max_tokens=2))
    h.step()  # both slots' prompts
    step = h.step()
    assert [s.seq for s in step.decodes] == first and not step.prefills  # late waits: no slot, no hold
    step = h.step()  # first two finished: late is admitted
    assert [s.seq for s in step.prefills] == [late]
