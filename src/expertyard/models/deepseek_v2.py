"""DeepSeek-V2 / V2-Lite: multi-head latent attention, shared experts, dense first layers."""

import math

from expertyard.config import AttentionConfig, ModelConfig, MoEConfig
from expertyard.models.spec import ArchitectureSpec


def _softmax_scale(c) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN (as the DeepSeek reference code does)."""
    scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = rope["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def config_from_hf(c) -> ModelConfig:
    freq = getattr(c, "moe_layer_freq", 1) or 1
    moe_layers = tuple(i for i in range(c.num_hidden_layers) if i >= c.first_k_dense_replace and i % freq == 0)
    norm = bool(c.norm_topk_prob) and c.num_experts_per_tok > 1
    return ModelConfig(
        architecture="DeepseekV2ForCausalLM", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers, dense_intermediate_size=c.intermediate_size, moe_layers=moe_layers,
        attention=AttentionConfig(
            kind="mla", num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads,
            head_dim=c.qk_nope_head_dim + c.qk_rope_head_dim, softmax_scale=_softmax_scale(c),
            qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias), rope_style="interleaved",
            q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
            qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim),
        moe=MoEConfig(
            num_experts=c.n_routed_experts, top_k=c.num_experts_per_tok, intermediate_size=c.moe_intermediate_size,
            # the reference either renormalises the top-k weights or scales them, never both
            norm_topk_prob=norm, routed_scaling_factor=1.0 if norm else c.routed_scaling_factor,
            topk_method=c.topk_method or "greedy", n_group=c.n_group or 1, topk_group=c.topk_group or 1,
            shared_intermediate_size=(c.n_shared_experts or 0) * c.moe_intermediate_size),
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, hidden_act=c.hidden_act, hf_config=c,
    )


SPEC = ArchitectureSpec(
    name="DeepseekV2ForCausalLM", model_type="deepseek_v2", config_from_hf=config_from_hf,
    renames=((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),),
)
