"""The attention side of a disaggregated deployment: routed experts live on the expert ranks.

`start` packs one micro-batch (m2n.pack_dispatch), sends each expert rank its buffer over the dispatch
communicator and posts the receives of the answers on the combine communicator; `finish` waits (a stream
wait on CUDA) and sums the answers. As an `ExpertBackend`, `forward` is start + finish.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertyard.disagg.m2n import DispatchRoute, RowLayout, combine, pack_dispatch
from expertyard.disagg.placement import ExpertPlacement
from expertyard.disagg.transport import Exchanger, Pending
from expertyard.experts.backend import ExpertBackend

# T = tokens, K = experts per token, D = hidden, N = expert ranks, C = capacity


@dataclass
class InFlight:
    route: DispatchRoute
    answers: torch.Tensor  # [N * C, D], filled by the combine receives
    pending: list[Pending]


class RemoteExperts(ExpertBackend):
    graph_safe = False  # the exchange is not captured in CUDA graphs

    def __init__(self, placement: ExpertPlacement, expert_ranks: list[int], layout: RowLayout,
                 dispatch: Exchanger, combine_ex: Exchanger, device: torch.device):
        self.placement, self.expert_ranks, self.layout = placement, expert_ranks, layout
        self.dispatch, self.combine_ex, self.device = dispatch, combine_ex, device
        self.tables = {layer: placement.tables(layer, device) for layer in placement.holders}
        self.capacity = 0  # set per step by the driver (from the step header)

    @property
    def destinations(self) -> int:
        return len(self.expert_ranks)

    def start(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> InFlight:
        n, c = self.destinations, self.capacity
        buf, route = pack_dispatch(self.layout, x, topk_ids, topk_w, *self.tables[layer], n, c)  # [N * (C+1), W]
        answers = torch.empty(n * c, self.layout.hidden, dtype=x.dtype, device=x.device)  # [N * C, D]
        return InFlight(route, answers, self.communicate(layer, buf, answers))

    def communicate(self, layer: int, buf: torch.Tensor, answers: torch.Tensor, slot: int | None = None) -> list[Pending]:
        """The exchange of one packed micro-batch: buf [N * (C+1), W] out, the answers [N * C, D] back (`slot`,
        the micro-batch of a graph-replayed decode step, matters to the expert ranks only)."""
        n, c = self.destinations, self.capacity
        chunks = buf.view(n, c + 1, -1)
        sent = self.dispatch.p2p([(r, chunks[j]) for j, r in enumerate(self.expert_ranks)], [])
        back = self.combine_ex.p2p([], [(r, answers[j * c:(j + 1) * c]) for j, r in enumerate(self.expert_ranks)])
        return [sent, back]

    def finish(self, flight: InFlight) -> torch.Tensor:
        for p in flight.pending:
            p.wait()
        return combine(flight.route, flight.answers, flight.answers.dtype)  # [T, D]

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(layer, x, topk_ids, topk_w))

    def load_expert_weight(self, layer, expert, proj, tensor) -> None:
        pass  # attention ranks hold no routed experts
