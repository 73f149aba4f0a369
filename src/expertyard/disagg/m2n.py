"""M2N buffers: dispatch tokens to the expert ranks of their top-k experts, and combine the answers.

Every (source, destination) pair exchanges one fixed-capacity buffer per micro-batch, so split sizes never
have to reach the host: the capacity C comes from the step's schedule (host-known token counts), and the
number of rows actually used travels inside the buffer, in a header row, computed on the device.

Dispatch buffer of one destination: [C + 1, W] in the activation dtype, W = D + meta columns
  row 0        header: the row count (float32, in the meta columns)
  rows 1..C    one row per token sent there: x [D] | meta = (local expert ids [K], gate weights [K]) as float32,
               bit-cast into the activation dtype; ids are -1 for the token's experts held by other ranks.
A token goes to a destination at most once (with every one of its experts held there), so with C >= tokens
of the micro-batch no buffer can overflow. All destinations' buffers are one flat tensor [N * (C + 1), W]
(plus one trailing scratch row that absorbs the writes of tokens not sent to a destination), so it serves
both per-pair P2P sends and `all_to_all_single` with equal splits.
Combine buffer of one source: [C, D], row j = the weighted sum of the destination's experts for row j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertyard.errors import ConfigError

# T = tokens, K = experts per token, D = hidden, N = destinations, S = sources, C = capacity (rows per pair),
# W = dispatch row width (D + meta columns)


@dataclass(frozen=True)
class RowLayout:
    hidden: int
    top_k: int
    dtype: torch.dtype

    def __post_init__(self):
        if (self.hidden * self.elt) % 4:
            raise ConfigError(f"hidden size {self.hidden} in {self.dtype}: the token rows must end on a 4-byte "
                              "boundary to carry float32 routing metadata")

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def meta_cols(self) -> int:
        """Columns (of the activation dtype) holding 2K float32 values."""
        return 2 * self.top_k * 4 // self.elt

    @property
    def width(self) -> int:
        return self.hidden + self.meta_cols

    def meta(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 view [..., 2K] of the meta columns of dispatch rows [..., W]."""
        return rows[..., self.hidden:].view(torch.float32)


@dataclass
class DispatchRoute:
    """Where the tokens of one micro-batch went: what the combine needs to put the answers back."""

    sent: torch.Tensor  # [T, N] bool: token t went to destination n
    pos: torch.Tensor  # [T, N] long: its row there (valid where sent)
    capacity: int


def pack_dispatch(layout: RowLayout, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                  rank_of: torch.Tensor, local_of: torch.Tensor, replicas: torch.Tensor, num_dest: int,
                  capacity: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, DispatchRoute]:
    """x [T, D], topk_ids [T, K], topk_w [T, K] -> (buffer [N * (C + 1), W], route). No host sync.
    `valid` [T] bool, if given, keeps the other rows (a CUDA graph's padding) from being sent anywhere."""
    t, k = topk_ids.shape
    d, n, c = layout.hidden, num_dest, capacity
    assert t <= c, f"{t} tokens exceed the capacity {c}"
    dev = x.device
    ids = topk_ids.long()
    replica = torch.arange(t, device=dev)[:, None] % replicas[ids]  # [T, K]
    dest = rank_of[ids, replica]  # [T, K] placement index of the chosen copy
    local = local_of[ids, replica]  # [T, K] its row in that rank's stacks
    hit = dest[:, :, None] == torch.arange(n, device=dev)  # [T, K, N]
    sent = hit.any(dim=1)  # [T, N]
    if valid is not None:
        sent &= valid[:, None]
    pos = sent.long().cumsum(dim=0) - 1  # [T, N]
    counts = sent.sum(dim=0)  # [N]
    scratch = n * (c + 1)
    row = torch.where(sent, torch.arange(n, device=dev) * (c + 1) + 1 + pos, scratch)  # [T, N]
    buf = torch.empty(scratch + 1, layout.width, dtype=x.dtype, device=dev)  # [N * (C + 1) + 1, W]
    hit_nk = hit.permute(0, 2, 1)  # [T, N, K]
    meta = torch.cat([torch.where(hit_nk, local[:, None, :], -1).float(),
                      torch.where(hit_nk, topk_w[:, None, :].float(), 0.0)], dim=-1)  # [T, N, 2K]
    flat = row.reshape(-1)  # [T * N]
    buf[flat, :d] = x[:, None, :].expand(t, n, d).reshape(-1, d)
    buf[flat, d:] = meta.reshape(t * n, 2 * k).view(x.dtype)
    header = layout.meta(buf[:scratch].view(n, c + 1, -1)[:, 0])  # [N, 2K] float32 view
    header[:, 0] = counts.float()
    return buf[:scratch], DispatchRoute(sent, pos, c)


@dataclass
class ReceivedTokens:
    x: torch.Tensor  # [S * C, D], zero in unused rows
    local_ids: torch.Tensor  # [S * C, K] long, -1 for experts elsewhere and for unused rows
    weights: torch.Tensor  # [S * C, K] float32, 0 where local_ids is -1
    counts: torch.Tensor  # [S] long: rows used per source (from the header rows)


def unpack_dispatch(layout: RowLayout, recv: torch.Tensor, num_src: int, capacity: int) -> ReceivedTokens:
    """recv [S * (C + 1), W] -> the tokens to compute; rows past each source's count are masked out."""
    s, c, d, k = num_src, capacity, layout.hidden, layout.top_k
    view = recv.view(s, c + 1, layout.width)
    counts = layout.meta(view[:, 0])[:, 0].long()  # [S]
    valid = torch.arange(c, device=recv.device)[None, :] < counts[:, None]  # [S, C]
    rows = view[:, 1:]  # [S, C, W]
    meta = layout.meta(rows)  # [S, C, 2K]
    ids = torch.where(valid[..., None], meta[..., :k], -1.0).long()  # [S, C, K]
    w = torch.where(ids >= 0, meta[..., k:], 0.0)  # [S, C, K]
    x = torch.where(valid[..., None], rows[..., :d], 0)  # [S, C, D]; unused rows may hold anything
    return ReceivedTokens(x.reshape(s * c, d), ids.reshape(s * c, k), w.reshape(s * c, k), counts)


def combine(route: DispatchRoute, recv_y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """recv_y [N * C, D] (destination n's answer for its row j at n * C + j) -> y [T, D], summed in float32."""
    n = route.sent.shape[1]
    base = torch.arange(n, device=recv_y.device) * route.capacity  # [N]
    idx = torch.where(route.sent, base + route.pos, 0)  # [T, N]
    parts = torch.where(route.sent[..., None], recv_y[idx].float(), 0.0)  # [T, N, D]
    return parts.sum(dim=1).to(dtype)
