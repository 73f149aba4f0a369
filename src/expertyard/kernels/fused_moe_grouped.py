"""The expert FFN as two grouped GEMMs of torch (`torch.nn.functional.grouped_mm`, CUTLASS on Hopper).

For many (token, expert) rows per expert the FFN is compute-bound, and a vendor grouped GEMM over rows sorted by
expert beats the Triton kernels (which gather rows inside the GEMM): see docs/benchmarks/fused_moe.md. Steps:

  sort      pairs by expert id (ids outside [0, E) last: dropped), offs[e] = end of expert e's rows   [P], [E]
  gather    xs = x[token of each sorted pair]                                                           [P, D]
  gate_up   h13 = grouped_mm(xs, w13^T, offs); h = silu(h13[:, :I]) * h13[:, I:]                       [P, I]
  down      y = grouped_mm(h, w2^T, offs)                                                                [P, D]
  combine   out[token] += topk_w * y over the kept rows                                                [T, D]

Every buffer is sized from shapes and nothing reads device values on the host, so the call can be captured in
a CUDA graph. Rows past offs[-1] (dropped pairs) come out of grouped_mm undefined and are masked, not computed on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# T = tokens, K = top-k, P = T*K pairs, E = experts, D = hidden, I = expert intermediate


def fused_moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                      topk_w: torch.Tensor) -> torch.Tensor:
    """`fused_moe`'s contract (inputs already checked), pairs with ids outside [0, E) dropped."""
    t, k = topk_ids.shape
    e, i = w13.shape[0], w13.shape[1] // 2
    p = t * k
    ids = topk_ids.reshape(-1).long()  # [P]
    key = torch.where((ids >= 0) & (ids < e), ids, e)  # [P] dropped pairs sort after every expert
    order = torch.argsort(key, stable=True)  # [P]
    counts = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, key, torch.ones(p, dtype=torch.int32, device=x.device))  # [E + 1] (no bincount: it syncs)
    offs = counts[:e].cumsum(0, dtype=torch.int32)  # [E] end row of each expert's group
    token = order // k  # [P]
    xs = x.index_select(0, token)  # [P, D]
    h13 = F.grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [P, 2I]
    h = F.silu(h13[:, :i]) * h13[:, i:]  # [P, I]
    y = F.grouped_mm(h, w2.transpose(1, 2), offs=offs).float()  # [P, D] (float32 output: not supported)
    kept = torch.arange(p, device=x.device) < offs[-1]  # [P]
    weight = torch.where(kept, topk_w.reshape(-1)[order].float(), 0.0)  # [P]
    y = torch.where(kept[:, None], y * weight[:, None], 0.0)  # [P, D]; undefined rows never reach the sum
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)  # [T, D]
    out.index_add_(0, token, y)
    return out.to(x.dtype)
