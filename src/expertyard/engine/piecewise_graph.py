"""Decode steps in CUDA-graph pieces around an expert backend that must run eagerly (offloaded experts: the
host reads each MoE layer's routing to decide copies).

Segment k replays, from one graph: the residual add of the previous MoE output, the attention (and any dense
layers) up to MoE layer m_k, its post-attention norm, router, pre-gate predictor and shared expert. Between
segments only the backend runs eagerly, on the first B (real) rows. The last segment holds the final norm and
the LM head; the first one the embedding and the rotary tables. So an offloaded decode step pays Python and
launch overhead only for the expert work itself.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from expertyard.engine.cuda_graph import _buckets
from expertyard.layers.attention_metadata import AttentionMetadata
from expertyard.layers.moe import SparseMoeBlock
from expertyard.models.base import CausalLM

# B = sequences, Bb = batch bucket, D = hidden, K = experts per token, V = vocabulary


@dataclass
class _Segment:
    layers: list[int]  # decoder layers computed in this segment
    moe_layer: int | None  # the MoE layer whose routing the segment ends with (None: the last segment)
    graph: torch.cuda.CUDAGraph | None = None
    out: dict = field(default_factory=dict)  # static outputs: h_res, x, ids, w, preds | logits


class PiecewiseDecodeGraphs:
    def __init__(self, model: CausalLM, kv_cache: list[list[torch.Tensor]], max_batch: int, max_len: int,
                 scratch_slot: int):
        self.model, self.kv_cache, self.scratch_slot = model, kv_cache, scratch_slot
        self.batch_buckets = _buckets(max_batch, [1, 2, 4, 8, 16, 24, 32, 48, 64])
        self.len_buckets = _buckets(max_len, [256])
        self.pool = None
        self.entries: dict[tuple[int, int], tuple[list[_Segment], dict]] = {}
        self.moe_layers = [i for i, l in enumerate(model.layers) if isinstance(l.mlp, SparseMoeBlock)]

    def run(self, input_ids, positions, slots, context_lens, max_context) -> torch.Tensor:
        b = input_ids.shape[0]
        bb = self.batch_buckets[bisect.bisect_left(self.batch_buckets, b)]
        lb = self.len_buckets[bisect.bisect_left(self.len_buckets, max_context)]
        if (bb, lb) not in self.entries:
            self.entries[(bb, lb)] = self._capture(bb, lb)
        segments, bufs = self.entries[(bb, lb)]
        bufs["input_ids"][:b].copy_(input_ids)
        bufs["positions"][:b].copy_(positions)
        bufs["slots"][:b].copy_(slots)
        bufs["context_lens"][:b].copy_(context_lens)
        if b < bb:
            bufs["slots"][b:].fill_(self.scratch_slot)
            bufs["positions"][b:].zero_()
            bufs["context_lens"][b:].fill_(1)
        if self.model.forced_routing is not None:
            self.model.forced_routing.begin_step(b, padded_to=bb)
        backend = self.model.experts
        for k, seg in enumerate(segments):
            seg.graph.replay()
            if seg.moe_layer is not None:
                o = seg.out
                y = backend.forward_routed(seg.moe_layer, o["x"][:b], o["ids"][:b], o["w"][:b],
                                           [(t, p[:b]) for t, p in o["preds"]])  # [B, D]
                torch.add(o["h_res"][:b], y, out=bufs[f"h_in{k + 1}"][:b])
        return segments[-1].out["logits"][:b]

    def _plan(self) -> list[_Segment]:
        segments, start = [], 0
        for m in self.moe_layers:
            segments.append(_Segment(list(range(start, m + 1)), m))
            start = m + 1
        segments.append(_Segment(list(range(start, len(self.model.layers))), None))
        return segments

    def _segment_fn(self, k: int, seg: _Segment, bufs: dict, meta: AttentionMetadata):
        model = self.model

        def fn() -> dict:
            if k == 0:
                h = model.model.embed_tokens(bufs["input_ids"])  # [Bb, D]
                bufs["cos"], bufs["sin"] = model.rope.cos_sin(meta.positions)
            else:
                h = bufs[f"h_in{k}"]
            out = {}
            for j in seg.layers:
                layer = model.layers[j]
                h = layer.attention_step(h, meta, self.kv_cache[j], model.rope, bufs["cos"], bufs["sin"])
                if j == seg.moe_layer:
                    x = layer.post_attention_layernorm(h)
                    ids, w = layer.mlp.route(x)
                    shared = layer.mlp.shared(x)
                    out = {"x": x, "ids": ids, "w": w, "preds": model.experts.predictor.predict(j, x),
                           "h_res": h if shared is None else h + shared}
                else:
                    h = layer.ffn_step(h)
            if seg.moe_layer is None:
                out = {"logits": model.compute_logits(model.model.norm(h))}
            return out

        return fn

    def _capture(self, bb: int, lb: int):
        device = self.kv_cache[0][0].device
        model = self.model
        bufs = {name: torch.zeros(bb, dtype=torch.long, device=device)
                for name in ("input_ids", "positions", "slots", "context_lens")}
        bufs["slots"].fill_(self.scratch_slot)
        bufs["context_lens"].fill_(1)
        segments = self._plan()
        param = next(model.parameters())
        for k in range(1, len(segments)):
            bufs[f"h_in{k}"] = torch.zeros(bb, model.cfg.hidden_size, dtype=param.dtype, device=device)
        meta = AttentionMetadata(token_slots=bufs["slots"], positions=bufs["positions"], prefills=[],
                                 num_prefill_tokens=0, decode_slots=bufs["slots"],
                                 decode_context_lens=bufs["context_lens"], decode_max_len=lb)
        if model.forced_routing is not None:
            model.forced_routing.begin_step(0, padded_to=bb)  # allocate this bucket's row buffer
        fns = [self._segment_fn(k, seg, bufs, meta) for k, seg in enumerate(segments)]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside capture (cuBLAS handles, lazy init); the backend is not run
                for fn in fns:
                    fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        for seg, fn in zip(segments, fns):
            seg.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(seg.graph, pool=self.pool):
                seg.out = fn()
            self.pool = seg.graph.pool()
        return segments, bufs
