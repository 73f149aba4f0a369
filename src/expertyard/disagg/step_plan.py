"""Split an engine step over the attention ranks and into micro-batches (host-side, counts only).

A sequence lives on attention rank `slot % M` in local KV row `slot // M` (the scheduler hands out slots
0, 1, 2, ... so consecutive requests alternate ranks); the engine's scratch row (prompt log-probabilities)
is rank 0's last row. Each rank's spans keep the step's order (prefills, then decodes) and are cut into
`m` contiguous micro-batches of about equal token counts (a span is never split; some may be empty).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from expertyard.disagg.config import DisaggConfig
from expertyard.engine.cuda_graph import buckets
from expertyard.engine.host_ints import long_tensor
from expertyard.engine.scheduler import ScheduledStep
from expertyard.layers.attention_metadata import AttentionMetadata, PrefillSpan


def _no_ints() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class MicroBatchPlan:
    """One micro-batch of one attention rank; token arrays in the step's order (prefill tokens first)."""

    token_ids: np.ndarray = field(default_factory=_no_ints)  # [T] int64
    positions: np.ndarray = field(default_factory=_no_ints)  # [T]
    slots: np.ndarray = field(default_factory=_no_ints)  # [T] local KV row of every token
    prefills: list[tuple[int, int, int, int]] = field(default_factory=list)  # (slot, start, length, offset)
    decode_context: np.ndarray = field(default_factory=_no_ints)  # [B] cached tokens incl. this one, per decode
    out_rows: np.ndarray = field(default_factory=_no_ints)  # tokens whose final hidden state rank 0 needs

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def metadata(self, device: torch.device) -> AttentionMetadata:
        slots, num_prefill = long_tensor(self.slots, device), sum(p[2] for p in self.prefills)
        decodes = len(self.decode_context) > 0
        return AttentionMetadata(
            token_slots=slots, positions=long_tensor(self.positions, device),
            prefills=[PrefillSpan(*p) for p in self.prefills], num_prefill_tokens=num_prefill,
            decode_slots=slots[num_prefill:] if decodes else None,
            decode_context_lens=long_tensor(self.decode_context, device) if decodes else None,
            decode_max_len=int(self.decode_context.max()) if decodes else 0)


@dataclass
class StepHeader:
    """What rank 0 broadcasts to every rank before a step (expert ranks only read command and capacity)."""

    command: str  # "step" | "idle" (heartbeat) | "stop"
    capacity: int = 0
    micro_batches: int = 1
    plans: list[list[MicroBatchPlan]] = field(default_factory=list)  # [attention rank][micro-batch]
    graphs: bool = False  # a decode step the attention ranks replay from CUDA graphs (decode_pieces.py)
    decode_len: int = 0  # with graphs: the longest cached context of the step (picks the length bucket)
    # async scheduling: the step's token ids hold placeholders for the tokens of the step in flight, whose
    # `prev_tokens` sampled ids rank 0 sends every other attention rank on the device (engine/placeholders.py)
    prev_tokens: int = 0


def kv_rows_per_rank(cfg: DisaggConfig, max_num_seqs: int) -> int:
    """Local KV rows of each attention rank, the scratch row included."""
    return -(-max_num_seqs // cfg.attention_ranks) + 1


def owner(cfg: DisaggConfig, slot: int, max_num_seqs: int) -> tuple[int, int]:
    """Global KV slot -> (attention rank, local row)."""
    if slot >= max_num_seqs:  # the engine's scratch row
        return 0, kv_rows_per_rank(cfg, max_num_seqs) - 1
    return slot % cfg.attention_ranks, slot // cfg.attention_ranks


def graph_capacities(cfg: DisaggConfig, max_num_seqs: int) -> list[int]:
    """The capacities a graph-replayed decode step may have: a few buckets up to the most sequences one
    attention rank holds (its micro-batches hold at most that many tokens), so that few graphs are captured."""
    limit = cfg.capacity(-(-max_num_seqs // cfg.attention_ranks))
    return sorted({cfg.capacity(b) for b in buckets(limit, [1, 2, 4, 8, 16, 24, 32, 48, 64])})


SMALL_STEP_SPANS = 96  # up to this many spans the plain loop is faster than the array code's fixed ~0.2 ms


def plan_step(step: ScheduledStep, cfg: DisaggConfig, max_num_seqs: int, all_logits: bool = False,
              micro_batches: int | None = None, graphs: bool = False) -> tuple[StepHeader, np.ndarray]:
    """-> (header, gather): output row j of the step (one per sampling span in step order, or one per token with
    `all_logits`) is row gather[j] of the attention ranks' returned hidden states concatenated in rank order.
    `micro_batches` overrides cfg.micro_batches for this step. With `graphs`, a decode-only step is marked for
    the attention ranks' CUDA graphs and its capacity rounded up to a graph bucket.

    Two implementations of one split (tests/test_step_plan.py checks them against each other and against what the
    split must mean): a loop over spans for small steps, array code for large ones, because the loop grows with
    the sequences and the array code has a fixed cost (`python benchmarks/bench_host_step.py`)."""
    m = micro_batches or cfg.micro_batches
    split = _split_loop if len(step.spans) <= SMALL_STEP_SPANS else _split_arrays
    plans, gather = split(step, cfg, max_num_seqs, all_logits, m)
    capacity = cfg.capacity(max(mb.num_tokens for mbs in plans for mb in mbs))
    if not (graphs and step.spans and not step.prefills and not all_logits):
        return StepHeader("step", capacity, m, plans), gather
    capacity = next(c for c in graph_capacities(cfg, max_num_seqs) if c >= capacity)
    decode_len = max(s.start for s in step.spans) + 1
    return StepHeader("step", capacity, m, plans, graphs=True, decode_len=decode_len), gather


def _split_loop(step: ScheduledStep, cfg: DisaggConfig, max_num_seqs: int, all_logits: bool,
                m: int) -> tuple[list[list[MicroBatchPlan]], np.ndarray]:
    """The split one span at a time (small steps)."""
    ranks = cfg.attention_ranks
    per_rank: list[list] = [[] for _ in range(ranks)]
    for span in step.spans:
        per_rank[owner(cfg, span.seq.slot, max_num_seqs)[0]].append(span)
    is_prefill = {id(s) for s in step.prefills}
    plans, returned, first_row = [], 0, {}  # id(span) -> its first row among all ranks' returned rows
    for spans in per_rank:
        lists = [([], [], [], [], [], []) for _ in range(m)]  # ids, positions, slots, prefills, contexts, rows
        total, offset = sum(s.length for s in spans), 0
        for span in spans:  # micro-batch index never decreases: rows come back in span order
            ids, positions, slots, prefills, contexts, rows = lists[min(m - 1, offset * m // total)]
            offset += span.length
            local = owner(cfg, span.seq.slot, max_num_seqs)[1]
            first = len(ids)
            ids += span.seq.token_ids[span.start:span.start + span.length]
            positions += range(span.start, span.start + span.length)
            slots += [local] * span.length
            if id(span) in is_prefill:
                prefills.append((local, span.start, span.length, first))
            else:
                contexts.append(span.start + 1)
            out = range(first, first + span.length) if all_logits else \
                ([first + span.length - 1] if span.samples else [])
            first_row[id(span)] = returned
            returned += len(out)
            rows += out
        as_ints = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
        plans.append([MicroBatchPlan(as_ints(i), as_ints(p), as_ints(sl), pre, as_ints(c), as_ints(r))
                      for i, p, sl, pre, c, r in lists])
    gather = [first_row[id(s)] + j for s in step.spans for j in range(s.length if all_logits else int(s.samples))]
    return plans, np.array(gather, dtype=np.int64)


def _split_arrays(step: ScheduledStep, cfg: DisaggConfig, max_num_seqs: int, all_logits: bool,
                  m: int) -> tuple[list[list[MicroBatchPlan]], np.ndarray]:
    """The split as array code over spans (large steps)."""
    ranks = cfg.attention_ranks
    spans = step.spans
    n = len(spans)
    ints = lambda values: np.fromiter(values, dtype=np.int64, count=n)  # noqa: E731  [n]
    slot, start, length = ints(s.seq.slot for s in spans), ints(s.start for s in spans), ints(s.length for s in spans)
    samples = ints(s.start + s.length == len(s.seq.token_ids) for s in spans)  # ScheduledSpan.samples
    prefill = np.arange(n) < len(step.prefills)  # spans = prefills + decodes
    scratch = slot >= max_num_seqs
    rank = np.where(scratch, 0, slot % ranks)  # owner(), as arrays
    local = np.where(scratch, kv_rows_per_rank(cfg, max_num_seqs) - 1, slot // ranks)

    # spans grouped by rank, step order kept inside each rank; micro-batch from the token offset in the rank
    by_rank = np.argsort(rank, kind="stable")
    rank_s, len_s = rank[by_rank], length[by_rank]
    rank_tokens = np.bincount(rank_s, weights=len_s, minlength=ranks).astype(np.int64)  # [ranks]
    span_first_token = _exclusive_cumsum(len_s)  # [n] in by_rank order
    offset = span_first_token - _exclusive_cumsum(rank_tokens)[rank_s]  # tokens of the rank before the span
    mb = np.minimum(m - 1, offset * m // np.maximum(rank_tokens[rank_s], 1))  # never decreases inside a rank
    group = rank_s * m + mb  # [n] sorted: spans in by_rank order are grouped by (rank, micro-batch)
    group_tokens = np.bincount(group, weights=len_s, minlength=ranks * m).astype(np.int64)  # [ranks * m]
    first = span_first_token - _exclusive_cumsum(group_tokens)[group]  # span's first row in its micro-batch

    # tokens, in by_rank span order
    span_of_token = np.repeat(np.arange(n), len_s)  # [T] index into by_rank order
    within = np.arange(len(span_of_token)) - span_first_token[span_of_token]  # token index in its span
    src = by_rank[span_of_token]  # [T] span (step order) of each token
    token_ids = np.fromiter(chain.from_iterable(spans[i].seq.token_ids[spans[i].start:spans[i].start + spans[i].length]
                                                for i in by_rank), dtype=np.int64, count=len(src))
    positions = start[src] + within
    slots = local[src]
    row_in_mb = first[span_of_token] + within  # [T]

    # rows returned to rank 0: every token (all_logits) or the last token of each sampling span
    returned = np.ones(len(src), dtype=bool) if all_logits else \
        (samples[src].astype(bool) & (within == len_s[span_of_token] - 1))  # [T]
    cut = np.cumsum(group_tokens)[:-1]
    token_groups = zip(*(np.split(a, cut) for a in (token_ids, positions, slots, row_in_mb, returned)))
    span_cut = np.cumsum(np.bincount(group, minlength=ranks * m))[:-1]
    dec_at, pre_at = np.flatnonzero(~prefill[by_rank]), np.flatnonzero(prefill[by_rank])  # by_rank positions
    span_groups = zip(np.split(dec_at, np.searchsorted(dec_at, span_cut)),
                      np.split(pre_at, np.searchsorted(pre_at, span_cut)))
    plans: list[list[MicroBatchPlan]] = [[] for _ in range(ranks)]
    for g, ((ids, pos, sl, rows, ret), (dec, pre)) in enumerate(zip(token_groups, span_groups)):
        plans[g // m].append(MicroBatchPlan(
            token_ids=ids, positions=pos, slots=sl, out_rows=rows[ret],
            prefills=[(int(local[by_rank[i]]), int(start[by_rank[i]]), int(len_s[i]), int(first[i])) for i in pre],
            decode_context=start[by_rank[dec]] + 1))

    # gather[j]: where output row j sits among the returned rows, concatenated in rank order
    rows_of_span = len_s if all_logits else samples[by_rank]  # [n] returned rows per span, by_rank order
    row_first = _exclusive_cumsum(rows_of_span)  # first returned row of each span (rank order = by_rank order)
    span_first = np.empty(n, dtype=np.int64)
    span_first[by_rank] = row_first  # step order
    per_span = length if all_logits else samples  # [n] step order
    owner_span = np.repeat(np.arange(n), per_span)
    gather = span_first[owner_span] + np.arange(len(owner_span)) - _exclusive_cumsum(per_span)[owner_span]

    return plans, gather


def _exclusive_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=np.int64)
    np.cumsum(a[:-1], out=out[1:])
    return out
