"""Expert FFN over packed low-precision experts: y[t] = sum_k w[t,k] * down_s(silu(gate_s(x[t])) * up_s(x[t])),
s = slot_ids[t, k], the weights of slot s of a low-precision pool [S, layout.nbytes] uint8.

- `fused_moe_quantized`: the contract of kernels/fused_moe.py `fused_moe` over a slot pool. CUDA tensors go
  to the Triton kernels (quant/triton_ffn.py: dequantize in registers, no host sync, CUDA-graph capturable
  after a warm-up); other devices to `fused_moe_quantized_torch` (dequantize each used slot, then matmul).
- `expert_ffn_quantized_reference`: one expert, dequantize then SwiGLU; the tests' reference.
Slot id -1 means "not resident": the pair is skipped (contributes zero) on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertyard.quant.packed_expert import ExpertLayout, dequantize_expert

# T = tokens, K = experts per token, P = T*K pairs, S = pool slots, D = hidden, I = expert intermediate


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expert_ffn_quantized_reference(x: torch.Tensor, packed: torch.Tensor, layout: ExpertLayout,
                                   acc_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, D], packed [nbytes] uint8 -> down(silu(gate x) * up x) [T, D], computed and returned in acc_dtype
    (default float32; float64 for float64 x), without rounding back to x.dtype."""
    acc = acc_dtype or _acc_dtype(x.dtype)
    w13, w2 = dequantize_expert(packed, layout, acc)  # [2I, D], [D, I]
    gate_up = x.to(acc) @ w13.T  # [T, 2I]
    h = F.silu(gate_up[:, :layout.inter]) * gate_up[:, layout.inter:]  # [T, I]
    return h @ w2.T  # [T, D]


def check_inputs(x: torch.Tensor, pool: torch.Tensor, layout: ExpertLayout, slot_ids: torch.Tensor,
                 topk_w: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != layout.hidden:
        raise ValueError(f"x must be [T, D={layout.hidden}], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if pool.dtype != torch.uint8 or pool.dim() != 2 or pool.shape[1] != layout.nbytes:
        raise ValueError(f"pool must be [S, {layout.nbytes}] uint8 for this layout, got {pool.dtype} "
                         f"of shape {tuple(pool.shape)}")
    if pool.stride(1) != 1 or pool.stride(0) % 2:
        raise ValueError(f"pool rows must be contiguous with an even row stride, got strides {pool.stride()}")
    t = x.shape[0]
    if slot_ids.dim() != 2 or slot_ids.shape[0] != t or topk_w.shape != slot_ids.shape:
        raise ValueError(f"slot_ids and topk_w must both be [T={t}, K], "
                         f"got {tuple(slot_ids.shape)} and {tuple(topk_w.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    if not topk_w.is_floating_point():
        raise TypeError(f"topk_w must be a float tensor, got {topk_w.dtype}")
    devices = {str(a.device) for a in (x, pool, slot_ids, topk_w)}
    if len(devices) != 1:
        raise ValueError(f"all fused_moe_quantized inputs must be on one device, got {sorted(devices)}")


def fused_moe_quantized(x: torch.Tensor, pool: torch.Tensor, layout: ExpertLayout, slot_ids: torch.Tensor,
                        topk_w: torch.Tensor) -> torch.Tensor:
    """x [T, D]; pool [S, layout.nbytes] uint8 (a packed expert per slot); slot_ids [T, K] int (-1: skip);
    topk_w [T, K] float. Returns y [T, D] in x.dtype, accumulated in float32 (float64 off the GPU for float64 x).

    On CUDA: never syncs with the host; CUDA-graph capturable after one warm-up call with the same shapes,
    dtypes, bits and group size (Triton compiles on first use). Ids outside [0, S) contribute zero there; on
    other devices ids >= S raise."""
    check_inputs(x, pool, layout, slot_ids, topk_w)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    if x.is_cuda:
        try:
            from expertyard.quant.triton_ffn import fused_moe_quantized_triton
        except ImportError as e:
            raise RuntimeError("fused_moe_quantized on CUDA tensors needs triton (pip install triton); "
                               "move the tensors to the CPU to use the torch implementation") from e
        return fused_moe_quantized_triton(x, pool, layout, slot_ids, topk_w)
    return fused_moe_quantized_torch(x, pool, layout, slot_ids, topk_w)


def fused_moe_quantized_torch(x: torch.Tensor, pool: torch.Tensor, layout: ExpertLayout, slot_ids: torch.Tensor,
                              topk_w: torch.Tensor) -> torch.Tensor:
    """Same contract in plain torch: each used slot is dequantized, then one pair of matmuls. Syncs with the
    host (reads which slots are used); meant for CPUs."""
    t, k = slot_ids.shape
    acc = _acc_dtype(x.dtype)
    flat = slot_ids.reshape(-1).long()  # [P]
    hi = int(flat.max())
    if hi >= pool.shape[0]:
        raise IndexError(f"slot_ids must lie in [-1, {pool.shape[0]}), got {hi}")
    y = torch.zeros(t, x.shape[1], dtype=acc, device=x.device)  # [T, D]
    weights = topk_w.reshape(-1).to(acc)  # [P]
    for s in torch.unique(flat[flat >= 0]).tolist():
        pair = (flat == s).nonzero().squeeze(1)  # [n]
        tok = pair // k
        ys = expert_ffn_quantized_reference(x.index_select(0, tok), pool[s], layout, acc)  # [n, D]
        y.index_put_((tok,), ys * weights[pair, None], accumulate=True)
    return y.to(x.dtype)
