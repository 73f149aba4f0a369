"""Decode attention: each decoding sequence's query token over its own row ("slot") of the KV cache.

On CUDA tensors a Triton kernel (kernels/decode_attention_triton.py) reads the cache in place: no gather of
[B, G, Lmax, Dk] copies, no mask, float32 online softmax, no host sync, and the same compiled kernel for
every step (lengths are read on the device), so it may be captured in a CUDA graph after one warm-up call per
shape (Triton compiles on first use; capture cannot compile). Other devices, and shapes the kernel does not
take (`kernel_supports`), keep the SDPA path in layers/attention.py.
Triton is imported only when a CUDA tensor arrives, so CPU-only machines never need it.
"""

from __future__ import annotations

import torch

# B = decoding sequences, H = query heads, G = KV heads, Dk/Dv = key/value head dims, S = slots, L = cache length

MAX_HEAD_DIM = 1024  # Dk and Dv: one tile of key dims (plus a tail tile) and one of value dims per program
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` takes these tensors (CUDA, fp16/bf16/fp32, head dims <= MAX_HEAD_DIM, each
    cache row's head dim contiguous); otherwise use the SDPA path."""
    return q.is_cuda and _unsupported(q, k_cache, v_cache) is None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, Dk]; k_cache: [S, L, G, Dk]; v_cache: [S, L, G, Dv] (may be a view, as MLA's latent[..., :R]);
    slots, context_lens: [B] int on q's device: sequence b's keys are k_cache[slots[b], :context_lens[b]],
    1 <= context_lens[b] <= L (not checked: that would read the device). Query head h uses KV head
    h // (H // G). With `window`, key position p is visible iff len - window <= p < len.
    Returns softmax(scale * q k^T) v: [B, H, Dv] in q.dtype (written into `out` when given), float32 inside."""
    if not q.is_cuda:
        raise ValueError(f"decode_attention runs on CUDA tensors, got {q.device}; elsewhere use "
                         "layers.attention.attend (SDPA)")
    reason = _unsupported(q, k_cache, v_cache)
    if reason:
        raise ValueError(reason)
    b, h = q.shape[:2]
    dv = v_cache.shape[3]
    if slots.shape != (b,) or context_lens.shape != (b,):
        raise ValueError(f"slots and context_lens must be [B={b}], got {tuple(slots.shape)} and "
                         f"{tuple(context_lens.shape)}")
    if slots.dtype not in (torch.int32, torch.int64) or context_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slots and context_lens must be int32 or int64, got {slots.dtype} and {context_lens.dtype}")
    if {slots.device, context_lens.device, k_cache.device, v_cache.device} != {q.device}:
        raise ValueError(f"all inputs must be on q's device {q.device}, got slots on {slots.device}, context_lens "
                         f"on {context_lens.device}, caches on {k_cache.device} and {v_cache.device}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    if out is None:
        out = q.new_empty(b, h, dv)
    elif out.shape != (b, h, dv) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be [B={b}, H={h}, Dv={dv}] {q.dtype} with a contiguous last dim, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    if b == 0:
        return out
    try:
        from expertyard.kernels.decode_attention_triton import decode_attention_triton
    except ImportError as e:
        raise RuntimeError("decode_attention on CUDA tensors needs triton (pip install triton)") from e
    return decode_attention_triton(q.contiguous(), k_cache, v_cache, slots.contiguous(), context_lens.contiguous(),
                                   scale, window, out)


def _unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why the kernel does not take these tensors, or None."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        return (f"q must be [B, H, Dk] and the caches [S, L, G, D], got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                f"{tuple(v_cache.shape)}")
    h, dk = q.shape[1:]
    g, dv = k_cache.shape[2], v_cache.shape[3]
    if v_cache.shape[:3] != k_cache.shape[:3] or k_cache.shape[3] != dk:
        return (f"k_cache must be [S, L, G, Dk={dk}] and v_cache [S, L, G, Dv] with the same S, L, G, got "
                f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if h % g:
        return f"query heads H={h} must be a multiple of KV heads G={g}"
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return f"q and the caches must share a dtype among {_DTYPES}, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
    if max(dk, dv) > MAX_HEAD_DIM:
        return f"head dims Dk={dk}, Dv={dv} above the kernel's {MAX_HEAD_DIM}"
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return f"the caches' head dims must be contiguous, got strides {k_cache.stride()} and {v_cache.stride()}"
    return None
