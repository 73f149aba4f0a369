"""Turns a scheduled step into tensors, runs the model, returns the logits of the sampling positions."""

from __future__ import annotations

import torch

from expertyard.engine.cuda_graph import DecodeGraphs
from expertyard.engine.host_ints import long_tensor
from expertyard.engine.kv_cache import allocate_kv_cache
from expertyard.engine.piecewise_graph import PiecewiseDecodeGraphs
from expertyard.engine.placeholders import resolve
from expertyard.engine.scheduler import ScheduledStep
from expertyard.layers.attention_metadata import AttentionMetadata, PrefillSpan
from expertyard.models.base import CausalLM

# T = tokens in the step, N = sampling positions, V = vocabulary


class ModelRunner:
    def __init__(self, model: CausalLM, max_num_seqs: int, max_model_len: int, device: torch.device,
                 dtype: torch.dtype, cuda_graphs: bool):
        self.model, self.device = model, device
        self.max_model_len = max_model_len
        scratch = max_num_seqs  # one extra row that padded graph rows write into
        self.kv_cache = allocate_kv_cache(model, max_num_seqs + 1, max_model_len, device, dtype)
        self.graphs = None
        if cuda_graphs:  # whole-step graphs, or per-layer pieces around a backend that must run eagerly
            graphs_cls = DecodeGraphs if getattr(model.experts, "graph_safe", True) else PiecewiseDecodeGraphs
            self.graphs = graphs_cls(model, self.kv_cache, max_num_seqs, max_model_len, scratch)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return long_tensor(values, self.device)

    @torch.inference_mode()
    def run(self, step: ScheduledStep, all_logits: bool = False,
            prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] float32, one row per span that samples (in `step.spans` order); with `all_logits`,
        one row per token of the step instead. `prev_tokens` [N_prev]: the sampled tokens of the step in flight,
        which the placeholders among the token ids stand for (async scheduling, engine/placeholders.py)."""
        ids, positions, slots, spans = [], [], [], []
        for span in step.spans:
            seq = span.seq
            ids += seq.token_ids[span.start:span.start + span.length]
            positions += range(span.start, span.start + span.length)
            slots += [seq.slot] * span.length
        offset = 0
        for span in step.prefills:
            spans.append(PrefillSpan(slot=span.seq.slot, start=span.start, length=span.length, offset=offset))
            offset += span.length
        decode_ctx = [s.start + 1 for s in step.decodes]
        input_ids = resolve(self._tensor(ids), prev_tokens)  # placeholders -> the in-flight step's tokens
        pos_t, slots_t = self._tensor(positions), self._tensor(slots)

        if self.graphs is not None and not step.prefills and not all_logits:
            return self.graphs.run(input_ids, pos_t, slots_t, self._tensor(decode_ctx), max(decode_ctx))

        meta = AttentionMetadata(
            token_slots=slots_t, positions=pos_t, prefills=spans, num_prefill_tokens=offset,
            decode_slots=slots_t[offset:] if step.decodes else None,
            decode_context_lens=self._tensor(decode_ctx) if step.decodes else None,
            decode_max_len=max(decode_ctx, default=0))
        hidden = self.model(input_ids, meta, self.kv_cache)  # [T, D]
        if not all_logits:
            last, end = [], 0
            for span in step.spans:
                end += span.length
                if span.samples:
                    last.append(end - 1)
            hidden = hidden[self._tensor(last)]
        return self.model.compute_logits(hidden)
