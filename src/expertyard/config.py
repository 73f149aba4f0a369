"""Architecture-independent model configuration.

Every supported Hugging Face architecture is translated into one `ModelConfig` by its file in
`expertyard.models`; the layers only ever read this normalised form. The original transformers config is
kept in `hf_config` for what only transformers knows how to compute (RoPE variants, tokenizer ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from expertyard.errors import ConfigError


@dataclass(frozen=True)
class AttentionConfig:
    kind: Literal["gqa", "mla"]
    num_heads: int
    num_kv_heads: int
    head_dim: int  # for MLA: qk_nope_head_dim + qk_rope_head_dim
    softmax_scale: float
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "per_head", "full"] = "none"  # Qwen3: per head; OLMoE: over the whole projection
    clip_qkv: float | None = None
    sliding_window: int | None = None
    rope_style: Literal["half", "interleaved"] = "half"  # rotate_half (Llama) or complex pairs (DeepSeek)
    # Multi-head latent attention (DeepSeek-V2); unused for "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a positive multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.kind == "mla" and (self.kv_lora_rank <= 0 or self.qk_rope_head_dim <= 0):
            raise ConfigError(f"MLA needs kv_lora_rank > 0 and qk_rope_head_dim > 0, got {self.kv_lora_rank=}, "
                              f"{self.qk_rope_head_dim=}")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # of one routed expert
    norm_topk_prob: bool
    routed_scaling_factor: float = 1.0
    topk_method: Literal["greedy", "group_limited_greedy"] = "greedy"
    n_group: int = 1
    topk_group: int = 1
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(gate(x)) * shared_expert(x)

    def __post_init__(self):
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.topk_method == "group_limited_greedy" and self.num_experts % self.n_group:
            raise ConfigError(f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    dense_intermediate_size: int  # of the dense MLP in non-MoE layers
    moe_layers: tuple[int, ...]  # indices of the decoder layers whose FFN is a MoE block
    attention: AttentionConfig
    moe: MoEConfig
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    hf_config: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; expertyard runs SwiGLU (silu) FFNs")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"moe_layers {bad} outside 0..num_layers-1={self.num_layers - 1}")

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def expert_bytes(self, bytes_per_param: int) -> int:
        """Bytes of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe.intermediate_size * bytes_per_param
