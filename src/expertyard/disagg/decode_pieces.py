"""Decode micro-batches of an attention rank replayed from CUDA graphs, in pieces around the exchanges.

The eager layer loop (pingpong.py) launches ~130 kernels per layer and micro-batch; on an H200 that host work
(~2 ms) was the whole decode step, so the expert ranks idled and more micro-batches only added launches. Here
piece k of micro-batch i replays, from one graph: the combine of MoE layer m_{k-1}'s answers and the residual
add, the attention (and dense layers) up to MoE layer m_k, its norm, router and shared expert, and the packing
of its dispatch buffer. Between pieces only the exchange's communication runs eagerly (`communicate`: P2P or
all-to-all launches), so a layer costs the host one replay and the exchange's launches (with the expert ranks'
graphs, a 2+2 Qwen3-shape step took 8.4 ms on H200s against 33.5 ms eager in the same run; docs/disaggregation.md).

Graphs are keyed by (micro-batch index, capacity bucket, context-length bucket). A micro-batch's rows are padded
to the capacity C: padded rows attend over the scratch KV row and are never dispatched (`valid` in
`pack_dispatch`). Each micro-batch index has its own memory pool: micro-batches interleave their replays, and
the intermediates of one must not land on the static outputs of another still in flight.

Off CUDA (tests), the pieces run as plain functions over the same static buffers: the split, the padding and
the buffer plumbing are checked on CPU, the capture on the GPU.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from expertyard.disagg.m2n import combine, pack_dispatch
from expertyard.disagg.step_plan import MicroBatchPlan
from expertyard.engine.cuda_graph import buckets, capture
from expertyard.engine.host_ints import long_tensor
from expertyard.engine.placeholders import resolve
from expertyard.layers.attention_metadata import AttentionMetadata
from expertyard.layers.moe import SparseMoeBlock
from expertyard.models.base import CausalLM

# C = capacity (rows of every micro-batch), D = hidden, K = experts per token, N = destinations, W = row width


@dataclass
class _Piece:
    layers: list[int]  # decoder layers computed in this piece
    moe_layer: int | None  # the MoE layer whose dispatch the piece packs (None: the last piece)
    fn: object = None
    graph: torch.cuda.CUDAGraph | None = None
    out: dict = field(default_factory=dict)

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out = self.fn()


@dataclass
class _Entry:
    bufs: dict[str, torch.Tensor]  # static inputs
    pieces: list[_Piece]
    answers: list[torch.Tensor]  # per MoE piece: [N * C, D], written by the exchange


class DecodePieces:
    def __init__(self, model: CausalLM, kv_cache: list[list[torch.Tensor]], exchange, scratch_row: int,
                 max_len: int, use_graphs: bool):
        self.model, self.kv_cache, self.exchange = model, kv_cache, exchange
        self.scratch_row, self.use_graphs = scratch_row, use_graphs
        self.len_buckets = buckets(max_len, [256])
        self.moe_layers = [i for i, l in enumerate(model.layers) if isinstance(l.mlp, SparseMoeBlock)]
        self.entries: dict[tuple[int, int, int], _Entry] = {}
        self.pools: dict[int, object] = {}  # micro-batch index -> graph memory pool
        self._side_stream = None

    @torch.inference_mode()
    def run(self, plans: list[MicroBatchPlan], capacity: int, decode_len: int,
            prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Every micro-batch (decode only) through every layer; the final normed hidden states of the plans'
        out_rows in micro-batch order: [sum of len(out_rows), D]. `prev_tokens`: what placeholder token ids
        resolve to (engine/placeholders.py)."""
        lb = self.len_buckets[bisect.bisect_left(self.len_buckets, decode_len)]
        entries = [self._entry(i, capacity, lb) for i in range(len(plans))]
        rows = [self._load(entry, plan, prev_tokens) for plan, entry in zip(plans, entries)]  # [len(out_rows)] each
        flights: list[list | None] = [None] * len(entries)
        for k in range(len(entries[0].pieces)):
            for i, entry in enumerate(entries):
                for p in flights[i] or ():
                    p.wait()
                piece = entry.pieces[k]
                piece.replay()
                if piece.moe_layer is not None:
                    flights[i] = self.exchange.communicate(piece.moe_layer, piece.out["buf"], entry.answers[k], slot=i)
        return torch.cat([e.pieces[-1].out["hidden"].index_select(0, r) for e, r in zip(entries, rows)])

    def _load(self, entry: _Entry, plan: MicroBatchPlan, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Copy the plan into the static inputs (padding rows point at the scratch row); returns its out_rows."""
        b, bufs = plan.num_tokens, entry.bufs
        device = bufs["ids"].device
        rows = np.stack([plan.token_ids, plan.positions, plan.slots, plan.decode_context])  # [4, b]
        host = long_tensor(rows, device)
        bufs["ids"][:b].copy_(resolve(host[0], prev_tokens))
        for j, name in enumerate(("positions", "slots", "context_lens"), start=1):
            bufs[name][:b].copy_(host[j])
        self._pad(bufs, b)
        bufs["num_valid"].fill_(b)
        return long_tensor(plan.out_rows, device)

    def _pad(self, bufs: dict, b: int) -> None:
        bufs["ids"][b:].zero_()
        bufs["positions"][b:].zero_()
        bufs["slots"][b:].fill_(self.scratch_row)
        bufs["context_lens"][b:].fill_(1)

    def _entry(self, i: int, c: int, lb: int) -> _Entry:
        key = (i, c, lb)
        if key not in self.entries:
            self.entries[key] = self._build(i, c, lb)
        return self.entries[key]

    def _build(self, i: int, c: int, lb: int) -> _Entry:
        device = self.kv_cache[0][0].device
        bufs = {name: torch.zeros(c, dtype=torch.long, device=device) for name in ("ids", "positions", "slots",
                                                                                 "context_lens")}
        bufs["num_valid"] = torch.zeros((), dtype=torch.long, device=device)
        self._pad(bufs, 0)  # captured over the scratch row only: no sequence's cache is touched
        meta = AttentionMetadata(token_slots=bufs["slots"], positions=bufs["positions"], prefills=[],
                                 num_prefill_tokens=0, decode_slots=bufs["slots"],
                                 decode_context_lens=bufs["context_lens"], decode_max_len=lb)
        param = next(self.model.parameters())
        n, d = self.exchange.destinations, self.model.cfg.hidden_size
        pieces, start = [], 0
        for m in self.moe_layers:
            pieces.append(_Piece(list(range(start, m + 1)), m))
            start = m + 1
        pieces.append(_Piece(list(range(start, len(self.model.layers))), None))
        answers = [torch.zeros(n * c, d, dtype=param.dtype, device=device) for _ in pieces[:-1]]
        entry = _Entry(bufs, pieces, answers)
        for k, piece in enumerate(pieces):  # in order: a piece reads the static outputs of the one before
            piece.fn = self._piece_fn(entry, k, meta, c)
            if self.use_graphs:
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(device)
                # thread_local: NCCL's watchdog thread polls its work events while this rank captures
                piece.graph, piece.out = capture(piece.fn, self.pools.get(i), self._side_stream, "thread_local")
                self.pools[i] = piece.graph.pool()
                # a capture records kernels without running them: give the static outputs real values (over
                # the scratch row) before the next piece's warm-up reads them as indices
                piece.graph.replay()
            else:
                piece.out = piece.fn()
        return entry

    def _piece_fn(self, entry: _Entry, k: int, meta: AttentionMetadata, c: int):
        model, exchange, bufs, piece = self.model, self.exchange, entry.bufs, entry.pieces[k]

        def fn() -> dict:
            if k == 0:
                h = model.model.embed_tokens(bufs["ids"])  # [C, D]
                cos, sin = model.rope.cos_sin(bufs["positions"])
                out = {"cos": cos, "sin": sin}
            else:
                prev = entry.pieces[k - 1].out
                y = combine(prev["route"], entry.answers[k - 1], prev["h_res"].dtype)  # [C, D]
                h = prev["h_res"] + y
                first = entry.pieces[0].out
                cos, sin = first["cos"], first["sin"]
                out = {}
            for j in piece.layers:
                layer = model.layers[j]
                h = layer.attention_step(h, meta, self.kv_cache[j], model.rope, cos, sin)
                if j != piece.moe_layer:
                    h = layer.ffn_step(h)
                    continue
                x = layer.post_attention_layernorm(h)  # [C, D]
                ids, w = layer.mlp.route(x)  # [C, K], [C, K]
                shared = layer.mlp.shared(x)
                valid = torch.arange(c, device=x.device) < bufs["num_valid"]  # [C]
                buf, route = pack_dispatch(exchange.layout, x, ids, w, *exchange.tables[j], exchange.destinations,
                                           c, valid)  # [N * (C+1), W]
                out.update(buf=buf, route=route, h_res=h if shared is None else h + shared)
            if piece.moe_layer is None:
                out["hidden"] = model.model.norm(h)  # [C, D]
            return out

        return fn
