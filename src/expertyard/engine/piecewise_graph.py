"""Decode steps in CUDA-graph pieces around an expert backend that must run eagerly (offloaded experts: the
host reads each MoE layer's routing to decide copies).

Segment k replays, from one graph: the residual add of the previous MoE output, the attention (and any dense
layers) up to MoE layer m_k, its post-attention norm, router, pre-gate predictor, shared expert and the
backend's `graph_prologue` (what the host needs packed for one copy, the FFN over the resident experts). Between
segments only the rest of the backend runs eagerly, on the first B (real) rows. The last segment holds the final norm and
the LM head; the first one the embedding and the rotary tables. So an offloaded decode step pays Python and
launch overhead only for the expert work itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from expertyard.engine.cuda_graph import BucketedDecodeGraphs
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


class PiecewiseDecodeGraphs(BucketedDecodeGraphs):
    def __init__(self, model: CausalLM, kv_cache: list[list[torch.Tensor]], max_batch: int, max_len: int,
                 scratch_slot: int):
        super().__init__(model, kv_cache, max_batch, max_len, scratch_slot)
        self.moe_layers = [i for i, l in enumerate(model.layers) if isinstance(l.mlp, SparseMoeBlock)]

    def _replay(self, segments: list[_Segment], bufs: dict, b: int, bb: int) -> torch.Tensor:
        if self.model.forced_routing is not None:
            self.model.forced_routing.begin_step(b, padded_to=bb)
        backend = self.model.experts
        for k, seg in enumerate(segments):
            o = seg.out
            if o.get("prologue") is not None:
                backend.before_graph_piece(seg.moe_layer)
            seg.graph.replay()
            if seg.moe_layer is not None:
                y = backend.forward_routed(seg.moe_layer, o["x"][:b], o["ids"][:b], o["w"][:b],
                                           [(t, p[:b]) for t, p in o["preds"]], o["prologue"])  # [B, D]
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
                    preds = model.experts.predictor.predict(j, x)
                    out = {"x": x, "ids": ids, "w": w, "preds": preds, "h_res": h if shared is None else h + shared,
                           "prologue": model.experts.graph_prologue(j, x, ids, w, preds)}
                else:
                    h = layer.ffn_step(h)
            if seg.moe_layer is None:
                out = {"logits": model.compute_logits(model.model.norm(h))}
            return out

        return fn

    def _capture(self, bb: int, bufs: dict, meta: AttentionMetadata) -> list[_Segment]:
        model = self.model
        segments = self._plan()
        param = next(model.parameters())
        for k in range(1, len(segments)):
            bufs[f"h_in{k}"] = torch.zeros(bb, model.cfg.hidden_size, dtype=param.dtype, device=param.device)
        if model.forced_routing is not None:
            model.forced_routing.begin_step(0, padded_to=bb)  # allocate this bucket's row buffer
        for k, seg in enumerate(segments):  # in order: a segment reads the static outputs of earlier ones
            seg.graph, seg.out = self._graph(self._segment_fn(k, seg, bufs, meta))
        return segments
