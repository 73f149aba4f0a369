from expertyard.config import AttentionConfig, ModelConfig, MoEConfig
from expertyard.models.spec import ArchitectureSpec, every_layer, head_dim_of


def config_from_hf(c) -> ModelConfig:
    dh = head_dim_of(c)
    bias = bool(getattr(c, "attention_bias", False))
    return ModelConfig(
        architecture="OlmoeForCausalLM", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers, dense_intermediate_size=c.intermediate_size, moe_layers=every_layer(c),
        attention=AttentionConfig(kind="gqa", num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                  head_dim=dh, softmax_scale=dh ** -0.5, qkv_bias=bias, o_bias=bias,
                                  qk_norm="full", clip_qkv=c.clip_qkv),
        moe=MoEConfig(num_experts=c.num_experts, top_k=c.num_experts_per_tok,
                      intermediate_size=c.intermediate_size, norm_topk_prob=c.norm_topk_prob),
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, hidden_act=c.hidden_act, hf_config=c,
    )


SPEC = ArchitectureSpec(name="OlmoeForCausalLM", model_type="olmoe", config_from_hf=config_from_hf)
