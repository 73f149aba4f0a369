"""Bytes and FLOPs of one decode step of a model, per layer, as the performance model needs them.

Counted from the project's own layer code: each `DecoderLayer` is built on the meta device (no memory) and
its parameters and KV-cache shapes are read, so every supported attention kind (GQA, MLA) and extra
(q/k norms, shared experts, dense first layers) is counted as the runtime lays it out.

Split assumed by the planner (MegaScale-Infer): attention nodes hold everything but the routed experts --
attention, norms, router, shared experts, dense FFN layers, embedding and LM head; expert nodes hold the
routed experts. Per-layer figures are averages over the L decoder layers (exact when every layer is MoE).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from expertyard.config import ModelConfig
from expertyard.models.base import DecoderLayer


@dataclass(frozen=True)
class ModelCosts:
    num_layers: int  # L
    num_moe_layers: int
    hidden_size: int  # D
    num_experts: int  # E (routed)
    top_k: int  # K
    num_heads: int  # query heads: tensor parallelism of attention splits these
    kv_shards: int  # KV heads the cache splits over under tensor parallelism (1: MLA's latent is replicated)
    expert_intermediate: int  # I
    vocab_size: int  # V
    attn_params_per_layer: float  # attention-side parameters, layer average (attention, norms, router, shared, dense)
    kv_elems_per_token: float  # KV-cache elements one token adds to one layer (layer average)
    expert_params: int  # one routed expert: 3 * D * I
    head_params: int  # embedding + LM head (once if tied)
    bytes_per_param: int  # weights, activations and KV cache (2 for bf16)
    sliding_window: int | None

    # --- weights
    @property
    def attn_bytes_per_layer(self) -> float:
        return self.attn_params_per_layer * self.bytes_per_param

    @property
    def expert_bytes(self) -> float:
        return self.expert_params * self.bytes_per_param

    @property
    def head_bytes(self) -> float:
        return self.head_params * self.bytes_per_param

    @property
    def lm_head_bytes(self) -> float:
        """Bytes the LM head reads per decode step (the embedding lookup is a row gather, not counted)."""
        return self.vocab_size * self.hidden_size * self.bytes_per_param

    def attention_weight_bytes(self) -> float:
        """All weights an attention node holds (before tensor parallelism)."""
        return self.num_layers * self.attn_bytes_per_layer + self.head_bytes

    def expert_weight_bytes(self) -> float:
        """All routed-expert weights of the model."""
        return self.num_moe_layers * self.num_experts * self.expert_bytes

    # --- KV cache
    def context(self, context_len: int) -> int:
        """Cached tokens a decode step reads (a sliding window caps it)."""
        return min(context_len, self.sliding_window) if self.sliding_window else context_len

    def kv_bytes_per_token_layer(self) -> float:
        return self.kv_elems_per_token * self.bytes_per_param

    def kv_bytes_per_sequence(self, max_len: int) -> float:
        """KV cache one sequence reserves in all layers."""
        return self.num_layers * self.kv_bytes_per_token_layer() * self.context(max_len)

    # --- FLOPs (multiply-add = 2)
    @property
    def attn_flops_per_token(self) -> float:
        """Matmul FLOPs of one token's attention side in one layer (projections, router, shared/dense FFN); the
        score and value products are memory-bound in decode and are timed with the KV read instead."""
        return 2.0 * self.attn_params_per_layer

    @property
    def expert_flops_per_pair(self) -> float:
        """FLOPs of one (token, expert) pair: gate, up and down projections."""
        return 2.0 * self.expert_params

    @property
    def lm_head_flops_per_token(self) -> float:
        return 2.0 * self.vocab_size * self.hidden_size

    @property
    def activation_bytes(self) -> float:
        """One token's hidden state, the unit of dispatch and combine messages."""
        return self.hidden_size * self.bytes_per_param

    def total_params(self) -> float:
        return self.num_layers * self.attn_params_per_layer + self.head_params + \
            self.num_moe_layers * self.num_experts * self.expert_params


@lru_cache(maxsize=32)
def model_costs(cfg: ModelConfig, bytes_per_param: int = 2) -> ModelCosts:
    import torch

    attn_params, kv_elems = 0, 0
    with torch.device("meta"):
        for i in range(cfg.num_layers):
            layer = DecoderLayer(cfg, i)
            attn_params += sum(p.numel() for p in layer.parameters())  # routed experts live in the backend
            kv_elems += sum(torch.Size(s).numel() for s in layer.self_attn.kv_cache_shapes())
    vocab_matrix = cfg.vocab_size * cfg.hidden_size
    a = cfg.attention
    return ModelCosts(
        num_layers=cfg.num_layers, num_moe_layers=len(cfg.moe_layers), hidden_size=cfg.hidden_size,
        num_experts=cfg.moe.num_experts, top_k=cfg.moe.top_k, num_heads=a.num_heads,
        kv_shards=1 if a.kind == "mla" else a.num_kv_heads, expert_intermediate=cfg.moe.intermediate_size,
        vocab_size=cfg.vocab_size, attn_params_per_layer=attn_params / cfg.num_layers,
        kv_elems_per_token=kv_elems / cfg.num_layers,
        expert_params=3 * cfg.hidden_size * cfg.moe.intermediate_size,
        head_params=vocab_matrix * (1 if cfg.tie_word_embeddings else 2), bytes_per_param=bytes_per_param,
        sliding_window=a.sliding_window)
