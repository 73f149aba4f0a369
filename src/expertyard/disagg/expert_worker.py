"""The loop of an expert rank: for each step, for each MoE layer, for each micro-batch: receive the tokens of
every attention rank, compute the local experts, send the answers back.

Every rank must enqueue its NCCL operations in one order consistent with its peers': the attention ranks
enqueue dispatch(i) then combine(i), so an expert rank enqueues receive(i), send(i), receive(i+1), ... A
receive of micro-batch i+1 posted *before* send(i) deadlocks on a GPU whenever the two communicators' streams
share a hardware queue (CUDA maps streams onto a few connections, CUDA_DEVICE_MAX_CONNECTIONS): receive(i+1)
waits for the attention rank, which waits for send(i), queued behind it. Overlap comes from the ping-pong
itself (the attention ranks compute micro-batch i+1 while this rank computes i). On CUDA nothing in the loop
blocks the host.
"""

from __future__ import annotations

import torch

from expertyard.disagg.expert_shard import ExpertShard
from expertyard.disagg.m2n import RowLayout, unpack_dispatch
from expertyard.disagg.transport import Exchanger, Pending

# S = attention ranks (sources), C = capacity, W = dispatch row width, D = hidden


class ExpertWorker:
    def __init__(self, shard: ExpertShard, moe_layers: list[int], attention_ranks: list[int],
                 layout: RowLayout, dispatch: Exchanger, combine_ex: Exchanger, device: torch.device):
        self.shard, self.moe_layers = shard, moe_layers
        self.sources, self.layout = attention_ranks, layout
        self.dispatch, self.combine_ex, self.device = dispatch, combine_ex, device

    def _post_receive(self, capacity: int) -> tuple[torch.Tensor, Pending]:
        s, c = len(self.sources), capacity
        recv = torch.empty(s * (c + 1), self.layout.width, dtype=self.layout.dtype, device=self.device)
        chunks = recv.view(s, c + 1, -1)
        return recv, self.dispatch.p2p([], [(r, chunks[j]) for j, r in enumerate(self.sources)])

    @torch.inference_mode()
    def run_step(self, capacity: int, micro_batches: int) -> None:
        s, c = len(self.sources), capacity
        work = [(layer, i) for layer in self.moe_layers for i in range(micro_batches)]
        sends: list[Pending] = []
        for layer, _ in work:
            recv, pending = self._post_receive(c)  # after the previous send: see the module docstring
            pending.wait()
            got = unpack_dispatch(self.layout, recv, s, c)
            y = self.shard.compute(layer, got.x, got.local_ids, got.weights)  # [S * C, D]
            chunks = y.view(s, c, -1)
            sends.append(self.combine_ex.p2p([(r, chunks[k]) for k, r in enumerate(self.sources)], []))
        for p in sends:
            p.wait()
