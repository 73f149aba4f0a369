"""Grouped-query attention with a slot-indexed KV cache (Mixtral, Qwen2/3-MoE, OLMoE)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from expertyard.config import AttentionConfig
from expertyard.kernels.decode_attention import decode_attention, kernel_supports
from expertyard.layers.attention_metadata import AttentionMetadata, PrefillSpan, sliding_mask
from expertyard.layers.norm import RMSNorm
from expertyard.layers.rotary import RotaryEmbedding

# T = tokens in the step, H = query heads, G = KV heads, Dh = head dim, S = cache slots, L = cache length

# On Hopper torch prefers the cuDNN attention backend, which builds an execution plan on the host for every
# new shape: a first call took 1.0-1.1 s on an H200 (2026-11-21, benchmarks/probe_step_stalls.py), and a loaded
# server stalled 0.7-1.8 s on its first many-prompt steps. An engine's shapes change every step (context length,
# prompts per step), so attention runs on the backends without per-shape set-up.
_SHAPE_FREE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    def __init__(self, cfg: AttentionConfig, hidden_size: int, eps: float):
        super().__init__()
        self.cfg = cfg
        h, g, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(hidden_size, h * dh, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, g * dh, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, g * dh, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * dh, hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm == "per_head":
            self.q_norm, self.k_norm = RMSNorm(dh, eps), RMSNorm(dh, eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(h * dh, eps), RMSNorm(g * dh, eps)

    def kv_cache_shapes(self) -> list[tuple[int, ...]]:
        """Per-token feature shapes of this layer's cache tensors (K and V)."""
        return [(self.cfg.num_kv_heads, self.cfg.head_dim)] * 2

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: list[torch.Tensor],
                rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, H*Dh], [T, G*Dh], [T, G*Dh]
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        q = q.view(t, cfg.num_heads, cfg.head_dim)  # [T, H, Dh]
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)  # [T, G, Dh]
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)

        k_cache, v_cache = cache  # [S, L, G, Dh] each
        k_cache[meta.token_slots, meta.positions] = k
        v_cache[meta.token_slots, meta.positions] = v
        out = attend(q, k_cache, v_cache, meta, cfg.softmax_scale, cfg.sliding_window)  # [T, H, Dv]
        return self.o_proj(out.reshape(t, -1))


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
           scale: float, window: int | None) -> torch.Tensor:
    """Attention of the step's queries q [T, H, Dk] over the cache; k_cache [S, L, G, Dk],
    v_cache [S, L, G, Dv]. Shared by GQA and (absorbed) MLA. Returns [T, H, Dv]."""
    with sdpa_kernel(_SHAPE_FREE_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        return _attend(q, k_cache, v_cache, meta, scale, window)


def _attend(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    if len(meta.prefills) == 1:
        _prefill_one(q, k_cache, v_cache, meta.prefills[0], scale, window, out)
    elif meta.prefills:
        _prefill_padded(q, k_cache, v_cache, meta.prefills, scale, window, out)
    if meta.num_decode_tokens:
        n0 = meta.num_prefill_tokens
        if kernel_supports(q, k_cache, v_cache):  # CUDA: the Triton kernel reads the cache in place
            decode_attention(q[n0:], k_cache, v_cache, meta.decode_slots, meta.decode_context_lens, scale, window,
                             out=out[n0:])
        else:
            _decode_sdpa(q[n0:], k_cache, v_cache, meta, scale, window, out[n0:])
    return out


def _decode_sdpa(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None,
                 out: torch.Tensor) -> None:
    """Decode tokens q [B, H, Dk] by SDPA over a gathered copy of the first decode_max_len cache positions."""
    lmax = meta.decode_max_len
    qd = q.unsqueeze(2)  # [B, H, 1, Dk]
    kd = k_cache[meta.decode_slots, :lmax].transpose(1, 2)  # [B, G, Lmax, Dk]
    vd = v_cache[meta.decode_slots, :lmax].transpose(1, 2)  # [B, G, Lmax, Dv]
    k_pos = torch.arange(lmax, device=q.device)
    lens = meta.decode_context_lens[:, None]  # [B, 1]
    mask = k_pos[None, :] < lens  # [B, Lmax]
    if window is not None:
        mask &= k_pos[None, :] >= lens - window
    o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=True)  # [B, H, 1, Dv]
    out.copy_(o.squeeze(2))


def _prefill_one(q, k_cache, v_cache, span: PrefillSpan, scale: float, window: int | None, out: torch.Tensor) -> None:
    """One sequence's span: exact, no padding; the causal fast path when it starts at position 0."""
    end = span.start + span.length
    qs = q[span.offset:span.offset + span.length].transpose(0, 1)  # [H, n, Dk]
    ks = k_cache[span.slot, :end].transpose(0, 1)  # [G, end, Dk]
    vs = v_cache[span.slot, :end].transpose(0, 1)
    if span.start == 0 and window is None:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(span.start, end, device=q.device)
        mask = sliding_mask(q_pos, torch.arange(end, device=q.device), window)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
    out[span.offset:span.offset + span.length] = o.transpose(0, 1)


def _prefill_padded(q, k_cache, v_cache, spans: list[PrefillSpan], scale: float, window: int | None,
                    out: torch.Tensor) -> None:
    """Several spans in one attention call, padded to the longest (B = spans, Lq/Lk = longest query/key)."""
    dev = q.device
    offsets, starts, lengths, slots = (torch.tensor(v, device=dev) for v in zip(
        *[(s.offset, s.start, s.length, s.slot) for s in spans]))
    lq, lk = max(s.length for s in spans), max(s.start + s.length for s in spans)
    j = torch.arange(lq, device=dev)
    valid = j[None, :] < lengths[:, None]  # [B, Lq]
    rows = offsets[:, None] + torch.minimum(j[None, :], lengths[:, None] - 1)  # [B, Lq] token of each query row
    qb = q[rows].transpose(1, 2)  # [B, H, Lq, Dk]
    k_pos = torch.arange(lk, device=dev)
    kb = k_cache[slots[:, None], k_pos[None, :]].transpose(1, 2)  # [B, G, Lk, Dk]
    vb = v_cache[slots[:, None], k_pos[None, :]].transpose(1, 2)  # [B, G, Lk, Dv]
    q_pos = starts[:, None] + j[None, :]  # [B, Lq]
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Lq, Lk]: causal (also hides other spans' keys)
    if window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    out[rows[valid]] = o.transpose(1, 2)[valid]  # [n_valid, H, Dv]
