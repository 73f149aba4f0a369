"""Decode steps replayed from CUDA graphs, so that Python and kernel-launch overhead vanish at small batch.

One graph per (batch bucket, context-length bucket), captured lazily on first use over static buffers.
Rows past the real batch point at a scratch KV slot that no sequence owns.
"""

from __future__ import annotations

import bisect

import torch

from expertyard.layers.attention_metadata import AttentionMetadata
from expertyard.models.base import CausalLM

# B = sequences in the decode step, V = vocabulary


def capture(fn, pool, side_stream: torch.cuda.Stream, error_mode: str = "global"):
    """Warm `fn` up on `side_stream` (lazy init and compilation must not happen during capture), then capture
    it into a graph in memory pool `pool` (None: a new one): (graph, fn's static output). `error_mode`
    "thread_local" lets other threads (NCCL's watchdog polling its events) go on during the capture."""
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=error_mode):
        out = fn()
    return graph, out


def buckets(limit: int, first: list[int]) -> list[int]:
    """`first` below `limit`, then doubling up to `limit` (which is always the last)."""
    out = [b for b in first if b < limit]
    while not out or out[-1] < limit:
        out.append(min(limit, (out[-1] * 2) if out else 1))
    return out


class BucketedDecodeGraphs:
    """Static decode inputs per (batch bucket, context-length bucket), captured lazily; subclasses say what is
    captured (`_capture`) and how it is replayed (`_replay`)."""

    def __init__(self, model: CausalLM, kv_cache: list[list[torch.Tensor]], max_batch: int, max_len: int,
                 scratch_slot: int):
        self.model, self.kv_cache, self.scratch_slot = model, kv_cache, scratch_slot
        self.batch_buckets = buckets(max_batch, [1, 2, 4, 8, 16, 24, 32, 48, 64])
        self.len_buckets = buckets(max_len, [256])
        self.pool = None
        self._side_stream = None
        self.entries: dict[tuple[int, int], tuple[object, dict[str, torch.Tensor]]] = {}

    def capture_all(self) -> int:
        """Capture every (batch bucket, length bucket) now, as a server does at start-up, so that no decode step
        under load pays a capture (and the first-use kernel compiles inside it); returns the graphs captured."""
        for bb in self.batch_buckets:
            for lb in self.len_buckets:
                self._entry(bb, lb)
        return len(self.entries)

    def _entry(self, bb: int, lb: int):
        if (bb, lb) not in self.entries:
            bufs, meta = self._static_inputs(bb, lb)
            self.entries[(bb, lb)] = (self._capture(bb, bufs, meta), bufs)
        return self.entries[(bb, lb)]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            context_lens: torch.Tensor, max_context: int) -> torch.Tensor:
        """Inputs [B] on the device -> logits [B, V] (a view of static graph output)."""
        b = input_ids.shape[0]
        bb = self.batch_buckets[bisect.bisect_left(self.batch_buckets, b)]
        lb = self.len_buckets[bisect.bisect_left(self.len_buckets, max_context)]
        captured, bufs = self._entry(bb, lb)
        bufs["input_ids"][:b].copy_(input_ids)
        bufs["positions"][:b].copy_(positions)
        bufs["slots"][:b].copy_(slots)
        bufs["context_lens"][:b].copy_(context_lens)
        if b < bb:
            bufs["slots"][b:].fill_(self.scratch_slot)
            bufs["positions"][b:].zero_()
            bufs["context_lens"][b:].fill_(1)
        return self._replay(captured, bufs, b, bb)

    def _static_inputs(self, bb: int, lb: int) -> tuple[dict[str, torch.Tensor], AttentionMetadata]:
        device = self.kv_cache[0][0].device
        bufs = {
            "input_ids": torch.zeros(bb, dtype=torch.long, device=device),
            "positions": torch.zeros(bb, dtype=torch.long, device=device),
            "slots": torch.full((bb,), self.scratch_slot, dtype=torch.long, device=device),
            "context_lens": torch.ones(bb, dtype=torch.long, device=device),
        }
        meta = AttentionMetadata(token_slots=bufs["slots"], positions=bufs["positions"], prefills=[],
                                 num_prefill_tokens=0, decode_slots=bufs["slots"],
                                 decode_context_lens=bufs["context_lens"], decode_max_len=lb)
        return bufs, meta

    def _graph(self, fn):
        """`capture` into this object's memory pool: (graph, its static output)."""
        if self._side_stream is None:  # one stream for every warm-up: the allocator reuses blocks per stream
            self._side_stream = torch.cuda.Stream()
        graph, out = capture(fn, self.pool, self._side_stream)
        self.pool = graph.pool()
        return graph, out

    def _capture(self, bb: int, bufs: dict, meta: AttentionMetadata):
        raise NotImplementedError

    def _replay(self, captured, bufs: dict, b: int, bb: int) -> torch.Tensor:
        raise NotImplementedError


class DecodeGraphs(BucketedDecodeGraphs):
    """A whole decode step in one graph (backends that never sync with the host)."""

    def _capture(self, bb: int, bufs: dict, meta: AttentionMetadata):
        return self._graph(lambda: self.model.compute_logits(self.model(bufs["input_ids"], meta, self.kv_cache)))

    def _replay(self, captured, bufs: dict, b: int, bb: int) -> torch.Tensor:
        graph, logits = captured
        graph.replay()
        return logits[:b]
