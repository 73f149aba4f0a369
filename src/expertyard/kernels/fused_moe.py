"""Grouped expert FFN: y[t] = sum_k w[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t,k].

Three implementations of one function:
- CUDA tensors: Triton kernels (kernels/fused_moe_triton.py), no host sync, CUDA-graph capturable.
- other devices: `fused_moe_torch`, a vectorised per-expert loop (host syncs are fine off the GPU).
- `fused_moe_reference`: a naive loop over (token, k) pairs, for tests only.
Triton is imported only when a CUDA tensor arrives, so CPU-only machines never need it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# T = tokens, K = experts per token (top-k), P = T*K (token, expert) pairs, E = experts,
# D = hidden size, I = expert intermediate size


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_w: torch.Tensor) -> torch.Tensor:
    """x: [T, D]; w13: [E, 2I, D] (rows [:I] = gate_proj, rows [I:] = up_proj, i.e. HF gate/up weights stacked);
    w2: [E, D, I] (down_proj); topk_ids: [T, K] int (int32 or int64); topk_w: [T, K] float (any float dtype).
    Returns y: [T, D] in x.dtype, y[t] = sum_k topk_w[t,k] * (w2[e] @ (silu(w13[e,:I] @ x[t]) * (w13[e,I:] @ x[t]))),
    e = topk_ids[t,k]. Accumulates in float32 (float64 for float64 input off the GPU).

    On CUDA the call never synchronises with the host and may be captured in a CUDA graph, but only after
    one warm-up call with the same shapes and dtypes (Triton compiles on first use; capture cannot compile).
    On CUDA, pairs whose expert id is outside [0, E) are dropped (contribute zero); elsewhere they raise.
    """
    _check_inputs(x, w13, w2, topk_ids, topk_w)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    if x.is_cuda:
        try:
            from expertyard.kernels.fused_moe_triton import fused_moe_triton
        except ImportError as e:
            raise RuntimeError("fused_moe on CUDA tensors needs triton (pip install triton); "
                               "move the tensors to the CPU to use the torch implementation") from e
        return fused_moe_triton(x, w13, w2, topk_ids, topk_w)
    return fused_moe_torch(x, w13, w2, topk_ids, topk_w)


def _check_inputs(x, w13, w2, topk_ids, topk_w) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x.shape)}")
    t, d = x.shape
    if w13.dim() != 3 or w13.shape[2] != d or w13.shape[1] % 2 != 0:
        raise ValueError(f"w13 must be [E, 2I, D={d}], got shape {tuple(w13.shape)}")
    e, i = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (e, d, i):
        raise ValueError(f"w2 must be [E={e}, D={d}, I={i}] to match w13, got shape {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_w.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_w must both be [T={t}, K], "
                         f"got {tuple(topk_ids.shape)} and {tuple(topk_w.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_w.is_floating_point():
        raise TypeError(f"topk_w must be a float tensor, got {topk_w.dtype}")
    if x.dtype != w13.dtype or x.dtype != w2.dtype:
        raise TypeError(f"x, w13 and w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    devices = {str(a.device) for a in (x, w13, w2, topk_ids, topk_w)}
    if len(devices) != 1:
        raise ValueError(f"all fused_moe inputs must be on one device, got {sorted(devices)}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                    topk_w: torch.Tensor) -> torch.Tensor:
    """Same contract as `fused_moe`, in plain torch: sort pairs by expert, one pair of matmuls per used expert.
    Syncs with the host (it reads the per-expert counts); meant for CPUs."""
    t, k = topk_ids.shape
    e_num, i = w13.shape[0], w13.shape[1] // 2
    acc = _acc_dtype(x.dtype)
    flat_ids = topk_ids.reshape(-1).long()  # [P]
    order = torch.argsort(flat_ids, stable=True)  # [P] pair indices grouped by expert
    lo, hi = int(flat_ids.min()), int(flat_ids.max())
    if lo < 0 or hi >= e_num:
        raise IndexError(f"topk_ids must lie in [0, {e_num}), got ids in [{lo}, {hi}]")
    counts = torch.bincount(flat_ids, minlength=e_num).tolist()  # E ints
    tokens = order // k  # [P] token of each sorted pair
    weights = topk_w.reshape(-1)[order].to(acc)  # [P]
    y = torch.zeros(t, x.shape[1], dtype=acc, device=x.device)  # [T, D]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = tokens[start:start + n]  # [n]
        xe = x.index_select(0, tok).to(acc)  # [n, D]
        gate_up = xe @ w13[e].to(acc).T  # [n, 2I]
        h = F.silu(gate_up[:, :i]) * gate_up[:, i:]  # [n, I]
        ye = (h @ w2[e].to(acc).T) * weights[start:start + n, None]  # [n, D]
        y.index_put_((tok,), ye, accumulate=True)  # index_add_ is ~400x slower on CPU for small rows
        start += n
    return y.to(x.dtype)


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                        topk_w: torch.Tensor, acc_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Naive per-(token, k) loop for tests. Computes and returns in acc_dtype (default float32, float64 for
    float64 input), without rounding back to x.dtype."""
    acc = acc_dtype or _acc_dtype(x.dtype)
    t, k = topk_ids.shape
    i = w13.shape[1] // 2
    y = torch.zeros(t, x.shape[1], dtype=acc, device=x.device)  # [T, D]
    ids = topk_ids.tolist()
    for ti in range(t):
        xt = x[ti].to(acc)  # [D]
        for ki in range(k):
            e = ids[ti][ki]
            gate = w13[e, :i].to(acc) @ xt  # [I]
            up = w13[e, i:].to(acc) @ xt  # [I]
            y[ti] += topk_w[ti, ki].to(acc) * (w2[e].to(acc) @ (F.silu(gate) * up))  # [D]
    return y
