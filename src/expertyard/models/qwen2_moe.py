from expertyard.config import AttentionConfig, ModelConfig, MoEConfig
from expertyard.errors import ConfigError
from expertyard.models.spec import ArchitectureSpec, head_dim_of, qwen_moe_layers


def config_from_hf(c) -> ModelConfig:
    if getattr(c, "use_sliding_window", False):
        raise ConfigError("Qwen2-MoE with use_sliding_window=true is not supported (per-layer windows)")
    dh = head_dim_of(c)
    return ModelConfig(
        architecture="Qwen2MoeForCausalLM", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers, dense_intermediate_size=c.intermediate_size, moe_layers=qwen_moe_layers(c),
        attention=AttentionConfig(kind="gqa", num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                  head_dim=dh, softmax_scale=dh ** -0.5, qkv_bias=getattr(c, "qkv_bias", True)),
        moe=MoEConfig(num_experts=c.num_experts, top_k=c.num_experts_per_tok,
                      intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                      shared_intermediate_size=c.shared_expert_intermediate_size, shared_expert_gate=True),
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, hidden_act=c.hidden_act, hf_config=c,
    )


SPEC = ArchitectureSpec(name="Qwen2MoeForCausalLM", model_type="qwen2_moe", config_from_hf=config_from_hf)
