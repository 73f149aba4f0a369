"""What an expert rank does with one received dispatch buffer: unpack it and compute the local experts.

In decode steps (capacity from a few graph buckets) the work of each (MoE layer, micro-batch) is replayed from a
CUDA graph over static buffers: receive buffer R [S * (C + 1), W] in, answers Y [S * C, D] out, one pair per
(micro-batch index, capacity). Eager, the ~25 kernels of an unpack and a fused-MoE call cost an H200 host
~0.6-1.2 ms per exchange against ~0.2 ms of GPU work (torch.profiler trace, 2026-11-21), and every attention
rank waited for it. Other steps (prefill: capacities of any size) run eagerly over fresh buffers.

Static buffers are reused from layer to layer; that is safe because each use is ordered after the last:
- R(i) of layer l+1 is received on the dispatch stream, which waits for the compute stream's work enqueued so
  far (transport.Exchanger), the replay that read R(i) for layer l included;
- Y(i) of layer l+1 is written by a replay that the caller orders after the send of Y(i) for layer l
  (`Pending.wait` of that send: a stream wait, no host block).
Graphs share one memory pool: they replay one after another on the compute stream.
Off CUDA the static path runs the same functions eagerly (tests of the buffer plumbing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from expertyard.disagg.expert_shard import ExpertShard
from expertyard.disagg.m2n import RowLayout, unpack_dispatch
from expertyard.engine.cuda_graph import capture

# S = sources (attention ranks, or every rank when colocated), C = capacity, W = dispatch row width, D = hidden


@dataclass
class _Static:
    recv: torch.Tensor  # [S * (C + 1), W]
    out: torch.Tensor  # [S * C, D]
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)  # MoE layer -> its replay


class ExpertCompute:
    def __init__(self, shard: ExpertShard, layout: RowLayout, num_sources: int, device: torch.device):
        self.shard, self.layout, self.num_sources, self.device = shard, layout, num_sources, device
        self.statics: dict[tuple[int, int], _Static] = {}  # (micro-batch index, capacity) -> buffers, graphs
        self._pool = None
        self._side_stream = None

    def receive_buffer(self, capacity: int, slot: int | None) -> torch.Tensor:
        """Where the dispatch of micro-batch `slot` lands: [S * (C + 1), W]; slot None: a fresh buffer (eager)."""
        if slot is None:
            return self._empty_receive(capacity)
        return self._static(slot, capacity).recv

    def compute(self, layer: int, recv: torch.Tensor, capacity: int, slot: int | None) -> torch.Tensor:
        """The answers [S * C, D] for `recv` (returned by `receive_buffer` with the same capacity and slot)."""
        if slot is None:
            return self._compute(layer, recv, capacity)
        st = self._static(slot, capacity)
        if self.device.type != "cuda":
            st.out.copy_(self._compute(layer, st.recv, capacity))
            return st.out
        graph = st.graphs.get(layer)
        if graph is None:
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)

            def fn():
                st.out.copy_(self._compute(layer, st.recv, capacity))

            # thread_local: NCCL's watchdog thread polls its work events while this rank captures
            graph, _ = capture(fn, self._pool, self._side_stream, "thread_local")
            self._pool = graph.pool()
            st.graphs[layer] = graph
        graph.replay()  # also after a capture, which records kernels without running them
        return st.out

    def _compute(self, layer: int, recv: torch.Tensor, capacity: int) -> torch.Tensor:
        got = unpack_dispatch(self.layout, recv, self.num_sources, capacity)
        return self.shard.compute(layer, got.x, got.local_ids, got.weights)  # [S * C, D]

    def _empty_receive(self, capacity: int) -> torch.Tensor:
        return torch.empty(self.num_sources * (capacity + 1), self.layout.width, dtype=self.layout.dtype,
                           device=self.device)

    def _static(self, slot: int, capacity: int) -> _Static:
        key = (slot, capacity)
        if key not in self.statics:
            # zeros: a capture's warm-up may read a buffer before anything was received (row counts 0)
            recv = self._empty_receive(capacity).zero_()
            out = torch.zeros(self.num_sources * capacity, self.layout.hidden, dtype=self.layout.dtype,
                              device=self.device)
            self.statics[key] = _Static(recv, out)
        return self.statics[key]
