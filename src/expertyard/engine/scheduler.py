"""Continuous batching on counts only (no torch): which sequences run this step, and how many tokens each."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from expertyard.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSpan:
    seq: Sequence
    start: int  # first token position computed this step
    length: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """True when the span reaches the end of the sequence, so its last logits pick the next token."""
        return self.start + self.length == len(self.seq.token_ids)


@dataclass
class ScheduledStep:
    prefills: list[ScheduledSpan]  # spans of more than one token, or first spans
    decodes: list[ScheduledSpan]  # exactly one new token each

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.prefills) + len(self.decodes)

    @property
    def spans(self) -> list[ScheduledSpan]:
        return self.prefills + self.decodes


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # True: no decode token while a prompt is part-prefilled or waits with a slot free for it (benchmarks:
        # every sequence then decodes in every timed step); False (serving): decodes go first, streams keep flowing
        self.prefill_first = False

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        """Every running sequence that is decoding gets one token; the rest of the token budget goes to
        prompts (running ones mid-prefill first, then newly admitted ones), chunked when long."""
        budget = self.max_num_batched_tokens
        decodes, prefills = [], []
        # (a prompt waiting without a free slot holds nothing: the running sequences must finish to make room)
        hold = self.prefill_first and ((self.waiting and self.free_slots) or
                                       any(s.num_uncomputed > 1 for s in self.running))
        for seq in self.running:
            if seq.num_uncomputed == 1 and budget > 0 and not hold and not seq.length_capped:
                decodes.append(ScheduledSpan(seq, seq.num_computed, 1))
                budget -= 1
        for seq in self.running:
            if seq.num_uncomputed > 1 and budget > 0:
                n = min(seq.num_uncomputed, budget)
                prefills.append(ScheduledSpan(seq, seq.num_computed, n))
                budget -= n
        while self.waiting and self.free_slots and budget > 0:
            seq = self.waiting.popleft()
            seq.slot, seq.status = self.free_slots.pop(), SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            prefills.append(ScheduledSpan(seq, seq.num_computed, n))
            budget -= n
        return ScheduledStep(prefills=prefills, decodes=decodes)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.slot = SequenceStatus.FINISHED, reason, -1
