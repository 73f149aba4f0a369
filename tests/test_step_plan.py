"""plan_step's two implementations of the split (a loop for small steps, array code for large ones) against each
other and against what the split must mean, on random steps."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.step_plan import SMALL_STEP_SPANS, _split_arrays, _split_loop, plan_step
from expertyard.engine.sampling_params import SamplingParams
from expertyard.engine.scheduler import ScheduledSpan, ScheduledStep
from expertyard.engine.sequence import Sequence


@st.composite
def steps(draw):
    ranks = draw(st.integers(1, 3))
    max_num_seqs = draw(st.integers(1, 12))
    n_seqs = draw(st.integers(0, max_num_seqs))
    slots = draw(st.permutations(range(max_num_seqs)))[:n_seqs]
    prefills, decodes = [], []
    for slot in slots:
        prompt = draw(st.lists(st.integers(0, 999), min_size=1, max_size=9))
        seq = Sequence(prompt, SamplingParams())
        seq.slot = slot
        if draw(st.booleans()):  # decoding: one new token at the end
            seq.token_ids.append(draw(st.integers(0, 999)))
            decodes.append(ScheduledSpan(seq, len(seq.token_ids) - 1, 1))
        else:  # a prefill chunk, which may or may not reach the end of the prompt
            start = draw(st.integers(0, len(prompt) - 1))
            prefills.append(ScheduledSpan(seq, start, draw(st.integers(1, len(prompt) - start))))
    if draw(st.booleans()):  # the engine's scratch row (prompt log-probabilities)
        seq = Sequence(draw(st.lists(st.integers(0, 999), min_size=1, max_size=9)), SamplingParams())
        seq.slot = max_num_seqs
        prefills.insert(0, ScheduledSpan(seq, 0, len(seq.token_ids)))
    cfg = DisaggConfig(attention_ranks=ranks, expert_ranks=1, micro_batches=1)
    return ScheduledStep(prefills, decodes), cfg, max_num_seqs, draw(st.booleans()), draw(st.integers(1, 4))


@settings(max_examples=300, deadline=None)
@given(steps())
def test_the_loop_and_the_array_code_split_every_step_alike(case):
    """Two independent implementations of one split (the loop serves small steps, the arrays large ones)."""
    step, cfg, max_num_seqs, all_logits, m = case
    loop_plans, loop_gather = _split_loop(step, cfg, max_num_seqs, all_logits, m)
    array_plans, array_gather = _split_arrays(step, cfg, max_num_seqs, all_logits, m)
    assert len(loop_plans) == len(array_plans) == cfg.attention_ranks
    for a_mbs, b_mbs in zip(loop_plans, array_plans):
        assert len(a_mbs) == len(b_mbs) == m
        for a, b in zip(a_mbs, b_mbs):
            for name in ("token_ids", "positions", "slots", "decode_context", "out_rows"):
                assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
            assert a.prefills == b.prefills
    assert loop_gather.tolist() == array_gather.tolist()
    # what the split means: every span's tokens, once, on its owner rank, and output row j is span j's
    returned = [np.concatenate([mb.token_ids[mb.out_rows] for mb in mbs]) for mbs in array_plans]
    by_row = np.concatenate(returned)[array_gather] if array_gather.size else np.zeros(0, dtype=np.int64)
    want = [t for s in step.spans
            for t in (s.seq.token_ids[s.start:s.start + s.length] if all_logits else
                      s.seq.token_ids[s.start + s.length - 1:s.start + s.length] if s.samples else [])]
    assert by_row.tolist() == want
    tokens = sorted(t for mbs in array_plans for mb in mbs for t in mb.token_ids.tolist())
    assert tokens == sorted(t for s in step.spans for t in s.seq.token_ids[s.start:s.start + s.length])


def test_plan_step_takes_the_array_code_past_the_small_step_size():
    cfg = DisaggConfig(attention_ranks=2, expert_ranks=1, micro_batches=3)
    n = SMALL_STEP_SPANS + 5
    decodes = []
    for slot in range(n):
        seq = Sequence(list(range(slot % 7 + 2)), SamplingParams())
        seq.slot = slot
        decodes.append(ScheduledSpan(seq, len(seq.token_ids) - 1, 1))
    step = ScheduledStep([], decodes)
    header, gather = plan_step(step, cfg, n)
    plans, want = _split_arrays(step, cfg, n, False, 3)
    assert gather.tolist() == want.tolist() and len(gather) == n
    assert header.capacity == cfg.capacity(max(mb.num_tokens for mbs in plans for mb in mbs))


def test_a_decode_step_for_graphs_names_its_longest_context():
    cfg = DisaggConfig(attention_ranks=2, expert_ranks=1, micro_batches=2)
    decodes = []
    for slot, n in enumerate([5, 9, 3]):
        seq = Sequence(list(range(n)), SamplingParams())
        seq.slot = slot
        decodes.append(ScheduledSpan(seq, n - 1, 1))
    header, gather = plan_step(ScheduledStep([], decodes), cfg, 4, graphs=True)
    assert header.graphs and header.decode_len == 9
    assert gather.tolist() == [0, 2, 1]  # rank 0 returns slots 0 and 2, then rank 1 slot 1
