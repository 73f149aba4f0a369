"""The loop of an expert rank: for each step, for each MoE layer, for each micro-batch: receive the tokens of
every attention rank, compute the local experts, send the answers back.

Every rank must enqueue its NCCL operations in one order consistent with its peers': the attention ranks
enqueue dispatch(i) then combine(i), so an expert rank enqueues receive(i), send(i), receive(i+1), ... A
receive of micro-batch i+1 posted *before* send(i) deadlocks on a GPU whenever the two communicators' streams
share a hardware queue (CUDA maps streams onto a few connections, CUDA_DEVICE_MAX_CONNECTIONS): receive(i+1)
waits for the attention rank, which waits for send(i), queued behind it. Overlap comes from the ping-pong
itself (the attention ranks compute micro-batch i+1 while this rank computes i). On CUDA nothing in the loop
blocks the host; decode steps replay each exchange's computation from a CUDA graph (expert_compute.py).
"""

from __future__ import annotations

import torch

from expertyard.disagg.expert_compute import ExpertCompute
from expertyard.disagg.expert_shard import ExpertShard
from expertyard.disagg.m2n import RowLayout
from expertyard.disagg.transport import Exchanger, Pending

# S = attention ranks (sources), C = capacity, W = dispatch row width, D = hidden


class ExpertWorker:
    def __init__(self, shard: ExpertShard, moe_layers: list[int], attention_ranks: list[int],
                 layout: RowLayout, dispatch: Exchanger, combine_ex: Exchanger, device: torch.device):
        self.moe_layers, self.sources = moe_layers, attention_ranks
        self.dispatch, self.combine_ex = dispatch, combine_ex
        self.experts = ExpertCompute(shard, layout, len(attention_ranks), device)

    @torch.inference_mode()
    def run_step(self, capacity: int, micro_batches: int, graphs: bool = False) -> None:
        """One step's exchanges; `graphs`: a decode step (graph-bucket capacity), computed from CUDA graphs over
        static buffers (expert_compute.py)."""
        s, c = len(self.sources), capacity
        sends: list[Pending] = []
        last_send: dict[int, Pending] = {}  # micro-batch -> the send of its answers in flight
        for layer in self.moe_layers:
            for i in range(micro_batches):
                slot = i if graphs else None
                recv = self.experts.receive_buffer(c, slot)  # [S * (C+1), W]
                chunks = recv.view(s, c + 1, -1)
                # posted after the previous send: see the module docstring
                self.dispatch.p2p([], [(r, chunks[j]) for j, r in enumerate(self.sources)]).wait()
                if slot is not None and i in last_send:
                    last_send[i].wait()  # the static answers of the previous layer are still being sent
                y = self.experts.compute(layer, recv, c, slot)  # [S * C, D]
                chunks = y.view(s, c, -1)
                last_send[i] = self.combine_ex.p2p([(r, chunks[k]) for k, r in enumerate(self.sources)], [])
                sends.append(last_send[i])
        for p in sends:
            p.wait()
