"""The attention side's layer loop over micro-batches (MegaScale-Infer's ping-pong).

For each layer, each micro-batch i: finish its previous MoE exchange, run attention (+ router, shared
expert) and start its exchange. So while the expert ranks compute micro-batch i, this rank computes the
attention of micro-batch i+1; with m = 1 nothing overlaps (the baseline).

  attention  | A0 A1 | A0 A1 | ...        (layer l, then l+1)
  experts    |    E0 E1 | E0 E1 | ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertyard.disagg.step_plan import MicroBatchPlan
from expertyard.engine.host_ints import long_tensor
from expertyard.engine.placeholders import resolve
from expertyard.layers.moe import SparseMoeBlock
from expertyard.models.base import CausalLM

# T_i = tokens of micro-batch i, D = hidden


@dataclass
class _MicroBatch:
    plan: MicroBatchPlan
    h: torch.Tensor  # [T_i, D] residual stream
    meta: object = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # [len(out_rows)] the tokens whose final hidden state is returned
    flight: object = None  # the exchange in progress
    shared: torch.Tensor | None = None  # the shared expert's output for that exchange


def _finish(mb: _MicroBatch, exchange) -> None:
    if mb.flight is None:
        return
    y = exchange.finish(mb.flight)  # [T_i, D]
    mb.h = mb.h + (y if mb.shared is None else y + mb.shared)
    mb.flight = mb.shared = None


@torch.inference_mode()
def run_micro_batches(model: CausalLM, kv_cache: list[list[torch.Tensor]], plans: list[MicroBatchPlan],
                      exchange, device: torch.device, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Every micro-batch through every layer; returns the final normed hidden states of the plans' out_rows,
    concatenated in micro-batch order: [sum of len(out_rows), D]. Empty micro-batches still take part in
    every exchange (with zero rows), so that all ranks step through the layers in lockstep. `prev_tokens`:
    what placeholder token ids resolve to (engine/placeholders.py)."""
    mbs = []
    for plan in plans:
        ids = resolve(long_tensor(plan.token_ids, device), prev_tokens)  # [T_i]
        mb = _MicroBatch(plan, model.model.embed_tokens(ids))  # [T_i, D]
        # every host-to-device copy before the layer loop: a pageable copy waits for the stream's earlier work
        mb.rows = long_tensor(plan.out_rows, device)
        if plan.num_tokens:
            mb.meta = plan.metadata(device)
            mb.cos, mb.sin = model.rope.cos_sin(mb.meta.positions)
        mbs.append(mb)
    for i, layer in enumerate(model.layers):
        moe = isinstance(layer.mlp, SparseMoeBlock)
        for mb in mbs:
            _finish(mb, exchange)
            if mb.plan.num_tokens:
                mb.h = layer.attention_step(mb.h, mb.meta, kv_cache[i], model.rope, mb.cos, mb.sin)
            if not moe:
                if mb.plan.num_tokens:
                    mb.h = layer.ffn_step(mb.h)
                continue
            x = layer.post_attention_layernorm(mb.h)  # [T_i, D]
            topk_ids, topk_w = layer.mlp.route(x)  # [T_i, K], [T_i, K]
            mb.shared = layer.mlp.shared(x)
            mb.flight = exchange.start(layer.mlp.layer, x, topk_ids, topk_w)
    outs = []
    for mb in mbs:
        _finish(mb, exchange)
        outs.append(model.model.norm(mb.h.index_select(0, mb.rows)))
    return torch.cat(outs) if outs else torch.empty(0, model.cfg.hidden_size, device=device)
