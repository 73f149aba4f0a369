"""Colocated (wide) expert parallelism: every rank runs attention for its own requests and holds a share of
the experts; dispatch and combine are `all_to_all_single` with equal splits over the same fixed-capacity
buffers as the disaggregated path (m2n.py), on two communicators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertyard.disagg.expert_compute import ExpertCompute
from expertyard.disagg.expert_shard import ExpertShard
from expertyard.disagg.m2n import DispatchRoute, RowLayout, combine, pack_dispatch
from expertyard.disagg.placement import ExpertPlacement
from expertyard.disagg.transport import Exchanger, Pending
from expertyard.experts.backend import ExpertBackend

# T = tokens, D = hidden, W = world size (= expert ranks), C = capacity


@dataclass
class InFlight:
    route: DispatchRoute
    answers: torch.Tensor  # [W * C, D]
    pending: list[Pending]


class ColocatedExperts(ExpertBackend):
    graph_safe = False

    def __init__(self, shard: ExpertShard, placement: ExpertPlacement, layout: RowLayout, world: int,
                 dispatch: Exchanger, combine_ex: Exchanger, device: torch.device):
        self.shard, self.layout, self.world = shard, layout, world
        self.experts = ExpertCompute(shard, layout, world, device)
        self._last_combine: dict[int, Pending] = {}  # micro-batch -> its combine in flight (static answers)
        self.dispatch, self.combine_ex = dispatch, combine_ex
        self.tables = {layer: placement.tables(layer, device) for layer in placement.holders}
        self.capacity = 0  # set per step by the driver

    @property
    def destinations(self) -> int:
        return self.world

    def start(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> InFlight:
        w, c, d = self.world, self.capacity, self.layout.hidden
        send, route = pack_dispatch(self.layout, x, topk_ids, topk_w, *self.tables[layer], w, c)  # [W * (C+1), Wd]
        answers = torch.empty(w * c, d, dtype=x.dtype, device=x.device)
        return InFlight(route, answers, self.communicate(layer, send, answers))

    def communicate(self, layer: int, send: torch.Tensor, answers: torch.Tensor, slot: int | None = None) -> list[Pending]:
        """Dispatch send [W * (C+1), Wd] to all, compute the local experts on what arrived, and combine their
        answers into `answers` [W * C, D] (the last transfer is left in flight). `slot`: the micro-batch of a
        decode step, whose expert work is replayed from CUDA graphs over static buffers (expert_compute.py)."""
        c = self.capacity
        recv = self.experts.receive_buffer(c, slot)  # [W * (C+1), Wd]
        self.dispatch.all_to_all(recv, send).wait()
        if slot is not None and slot in self._last_combine:
            self._last_combine[slot].wait()  # the static answers of the previous layer are still being sent
        y = self.experts.compute(layer, recv, c, slot)  # [W * C, D]
        sent = self.combine_ex.all_to_all(answers, y)
        if slot is not None:
            self._last_combine[slot] = sent
        return [sent]

    def finish(self, flight: InFlight) -> torch.Tensor:
        for p in flight.pending:
            p.wait()
        return combine(flight.route, flight.answers, flight.answers.dtype)

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(layer, x, topk_ids, topk_w))

    def load_expert_weight(self, layer, expert, proj, tensor) -> None:
        self.shard.load_expert_weight(layer, expert, proj, tensor)
