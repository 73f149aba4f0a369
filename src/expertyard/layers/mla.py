"""Multi-head latent attention (DeepSeek-V2), in the weight-absorbed form.

The cache holds, per token, only the normalised KV latent c [R] and the rotated shared key k_pe [Dr].
Keys are W_uk c and values W_uv c (kv_b_proj = [W_uk; W_uv] per head). Instead of expanding them for every
cached token, the query is moved into latent space (q_lat = W_uk^T q_nope), attention runs as one-KV-head
attention over [c, k_pe] with values c, and the output is brought back with W_uv: the same function, with
cache reads of R + Dr numbers per token instead of H * (Dn + Dv).
"""

from __future__ import annotations

import torch
from torch import nn

from expertyard.config import AttentionConfig
from expertyard.layers.attention import attend
from expertyard.layers.attention_metadata import AttentionMetadata
from expertyard.layers.norm import RMSNorm
from expertyard.layers.rotary import RotaryEmbedding

# T = tokens, H = heads, R = kv_lora_rank, Dn = qk_nope_head_dim, Dr = qk_rope_head_dim, Dv = v_head_dim


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: AttentionConfig, hidden_size: int, eps: float):
        super().__init__()
        self.cfg = cfg
        h, dq = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, h * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, hidden_size, bias=cfg.o_bias)

    def kv_cache_shapes(self) -> list[tuple[int, ...]]:
        """One latent 'head' holding [c, k_pe]; the value is its first R numbers."""
        return [(1, self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim)]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: list[torch.Tensor],
                rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        t, h, r = x.shape[0], cfg.num_heads, cfg.kv_lora_rank
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, h, dn + dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)  # [T, H, Dn], [T, H, Dr]
        c, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # [T, R], [T, Dr]
        c = self.kv_a_layernorm(c)
        q_pe = rope.apply(q_pe, cos, sin)
        k_pe = rope.apply(k_pe.unsqueeze(1), cos, sin)  # [T, 1, Dr]

        (latent_cache,) = cache  # [S, L, 1, R + Dr]
        latent_cache[meta.token_slots, meta.positions] = torch.cat((c.unsqueeze(1), k_pe), dim=-1)

        w = self.kv_b_proj.weight.view(h, dn + dv, r)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # [H, Dn, R], [H, Dv, R]
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w_uk)  # [T, H, R]
        q_full = torch.cat((q_lat, q_pe), dim=-1)  # [T, H, R + Dr]
        out_lat = attend(q_full, latent_cache, latent_cache[..., :r], meta, cfg.softmax_scale, None)  # [T, H, R]
        out = torch.einsum("thr,hvr->thv", out_lat, w_uv)  # [T, H, Dv]
        return self.o_proj(out.reshape(t, h * dv))
