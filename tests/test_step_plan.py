"""plan_step (array code) against the straightforward loop over spans it replaced, on random steps."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.step_plan import owner, plan_step
from expertyard.engine.sampling_params import SamplingParams
from expertyard.engine.scheduler import ScheduledSpan, ScheduledStep
from expertyard.engine.sequence import Sequence


def loop_plan(step: ScheduledStep, cfg: DisaggConfig, max_num_seqs: int, all_logits: bool, m: int):
    """The reference: one span at a time. -> (plans as plain lists, [(rank, returned row)] per output row)."""
    ranks = cfg.attention_ranks
    per_rank = [[] for _ in range(ranks)]
    for span in step.spans:
        per_rank[owner(cfg, span.seq.slot, max_num_seqs)[0]].append(span)
    prefill_ids = {id(s) for s in step.prefills}
    plans, returned, where = [], [0] * ranks, {}
    for rank, spans in enumerate(per_rank):
        total = sum(s.length for s in spans)
        mbs = [{"token_ids": [], "positions": [], "slots": [], "prefills": [], "decode_context": [], "out_rows": []}
               for _ in range(m)]
        offset = 0
        for span in spans:
            mb = mbs[min(m - 1, offset * m // total)]
            offset += span.length
            local = owner(cfg, span.seq.slot, max_num_seqs)[1]
            first = len(mb["token_ids"])
            mb["token_ids"] += span.seq.token_ids[span.start:span.start + span.length]
            mb["positions"] += range(span.start, span.start + span.length)
            mb["slots"] += [local] * span.length
            if id(span) in prefill_ids:
                mb["prefills"].append((local, span.start, span.length, first))
            else:
                mb["decode_context"].append(span.start + 1)
            rows = list(range(first, first + span.length)) if all_logits else \
                ([first + span.length - 1] if span.samples else [])
            where[id(span)] = (rank, returned[rank])
            returned[rank] += len(rows)
            mb["out_rows"] += rows
        plans.append(mbs)
    order = []
    for span in step.spans:
        rank, first = where[id(span)]
        order += [(rank, first + j) for j in range(span.length if all_logits else int(span.samples))]
    return plans, order


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
def test_plan_step_equals_the_loop_over_spans(case):
    step, cfg, max_num_seqs, all_logits, m = case
    header, gather = plan_step(step, cfg, max_num_seqs, all_logits, m)
    plans, order = loop_plan(step, cfg, max_num_seqs, all_logits, m)
    assert len(header.plans) == cfg.attention_ranks
    for got_mbs, want_mbs in zip(header.plans, plans):
        assert len(got_mbs) == m
        for got, want in zip(got_mbs, want_mbs):
            for name in ("token_ids", "positions", "slots", "decode_context", "out_rows"):
                assert getattr(got, name).tolist() == want[name], name
            assert got.prefills == want["prefills"]
    counts = [sum(len(mb["out_rows"]) for mb in mbs) for mbs in plans]
    offsets = np.cumsum([0] + counts)
    assert gather.tolist() == [int(offsets[r]) + j for r, j in order]
    assert header.capacity == cfg.capacity(max(len(mb["token_ids"]) for mbs in plans for mb in mbs))


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
