from expertyard.config import AttentionConfig, ModelConfig, MoEConfig
from expertyard.models.spec import ArchitectureSpec, every_layer, head_dim_of


def config_from_hf(c) -> ModelConfig:
    dh = head_dim_of(c)
    return ModelConfig(
        architecture="MixtralForCausalLM", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers, dense_intermediate_size=c.intermediate_size, moe_layers=every_layer(c),
        attention=AttentionConfig(kind="gqa", num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                                  head_dim=dh, softmax_scale=dh ** -0.5, sliding_window=c.sliding_window),
        moe=MoEConfig(num_experts=c.num_local_experts, top_k=c.num_experts_per_tok,
                      intermediate_size=c.intermediate_size, norm_topk_prob=True),
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, hidden_act=c.hidden_act, hf_config=c,
    )


SPEC = ArchitectureSpec(
    name="MixtralForCausalLM", model_type="mixtral", config_from_hf=config_from_hf,
    renames=(
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
        (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
        (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    ),
)
