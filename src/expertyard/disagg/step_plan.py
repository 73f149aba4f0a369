"""Split an engine step over the attention ranks and into micro-batches (host-side, counts only).

A sequence lives on attention rank `slot % M` in local KV row `slot // M` (the scheduler hands out slots
0, 1, 2, ... so consecutive requests alternate ranks); the engine's scratch row (prompt log-probabilities)
is rank 0's last row. Each rank's spans keep the step's order (prefills, then decodes) and are cut into
`m` contiguous micro-batches of about equal token counts (a span is never split; some may be empty).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from expertyard.disagg.config import DisaggConfig
from expertyard.engine.cuda_graph import buckets
from expertyard.engine.host_ints import long_tensor
from expertyard.engine.scheduler import ScheduledStep
from expertyard.layers.attention_metadata import AttentionMetadata, PrefillSpan


@dataclass
class MicroBatchPlan:
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # local KV row of every token
    prefills: list[tuple[int, int, int, int]] = field(default_factory=list)  # (slot, start, length, offset)
    decode_context: list[int] = field(default_factory=list)  # cached tokens incl. this one, per decode token
    out_rows: list[int] = field(default_factory=list)  # tokens whose final hidden state rank 0 needs

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def metadata(self, device: torch.device) -> AttentionMetadata:
        as_t = lambda v: long_tensor(v, device)  # noqa: E731
        slots, num_prefill = as_t(self.slots), sum(p[2] for p in self.prefills)
        return AttentionMetadata(
            token_slots=slots, positions=as_t(self.positions), prefills=[PrefillSpan(*p) for p in self.prefills],
            num_prefill_tokens=num_prefill, decode_slots=slots[num_prefill:] if self.decode_context else None,
            decode_context_lens=as_t(self.decode_context) if self.decode_context else None,
            decode_max_len=max(self.decode_context, default=0))


@dataclass
class StepHeader:
    """What rank 0 broadcasts to every rank before a step (expert ranks only read command and capacity)."""

    command: str  # "step" | "idle" (heartbeat) | "stop"
    capacity: int = 0
    micro_batches: int = 1
    plans: list[list[MicroBatchPlan]] = field(default_factory=list)  # [attention rank][micro-batch]
    graphs: bool = False  # a decode step the attention ranks replay from CUDA graphs (decode_pieces.py)
    decode_len: int = 0  # with graphs: the longest cached context of the step (picks the length bucket)


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


def plan_step(step: ScheduledStep, cfg: DisaggConfig, max_num_seqs: int, all_logits: bool = False,
              micro_batches: int | None = None, graphs: bool = False) -> tuple[StepHeader, list[tuple[int, int]]]:
    """-> (header, order): order[j] = (attention rank, row in that rank's returned hidden states) of the j-th
    output row (one per sampling span in step order, or one per token with `all_logits`). `micro_batches`
    overrides cfg.micro_batches for this step. With `graphs`, a decode-only step is marked for the attention
    ranks' CUDA graphs and its capacity rounded up to a graph bucket."""
    m, ranks = micro_batches or cfg.micro_batches, cfg.attention_ranks
    per_rank: list[list] = [[] for _ in range(ranks)]
    for span in step.spans:
        per_rank[owner(cfg, span.seq.slot, max_num_seqs)[0]].append(span)
    prefill_ids = {id(s) for s in step.prefills}
    plans, returned = [], [0] * ranks
    where: dict[int, tuple[int, int]] = {}  # id(span) -> (rank, its first returned row)
    for rank, spans in enumerate(per_rank):
        total = sum(s.length for s in spans)
        mbs = [MicroBatchPlan() for _ in range(m)]
        offset = 0
        for span in spans:  # micro-batch index never decreases: rows come back in span order
            mb = mbs[min(m - 1, offset * m // total)]
            offset += span.length
            local = owner(cfg, span.seq.slot, max_num_seqs)[1]
            first = mb.num_tokens
            mb.token_ids += span.seq.token_ids[span.start:span.start + span.length]
            mb.positions += range(span.start, span.start + span.length)
            mb.slots += [local] * span.length
            if id(span) in prefill_ids:
                mb.prefills.append((local, span.start, span.length, first))
            else:
                mb.decode_context.append(span.start + 1)
            rows = list(range(first, first + span.length)) if all_logits else \
                ([first + span.length - 1] if span.samples else [])
            where[id(span)] = (rank, returned[rank])
            returned[rank] += len(rows)
            mb.out_rows += rows
        plans.append(mbs)
    order = []
    for span in step.spans:
        rank, first = where[id(span)]
        n = span.length if all_logits else int(span.samples)
        order += [(rank, first + j) for j in range(n)]
    capacity = cfg.capacity(max((mb.num_tokens for mbs in plans for mb in mbs), default=0))
    if not (graphs and step.spans and not step.prefills and not all_logits):
        return StepHeader("step", capacity, m, plans), order
    capacity = next(c for c in graph_capacities(cfg, max_num_seqs) if c >= capacity)
    decode_len = max(c for mbs in plans for mb in mbs for c in mb.decode_context)
    return StepHeader("step", capacity, m, plans, graphs=True, decode_len=decode_len), order

