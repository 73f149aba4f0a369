"""Random-weight models with the exact shapes of real MoE checkpoints, built in memory (no download, no disk).

The router weights are random too, so routing is near-uniform unless a benchmark forces a recorded trace.
"""

from __future__ import annotations

from typing import Callable

import torch

from expertyard.errors import ConfigError
from expertyard.loader.load import BackendFactory, LoadedModel, build_model, model_config_from_hf
from expertyard.experts.resident import ResidentExperts


def _mixtral_8x7b():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
                         tie_word_embeddings=False, architectures=["MixtralForCausalLM"])


def _qwen3_30b_a3b():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                          rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
                          architectures=["Qwen3MoeForCausalLM"])


def _deepseek_v2_lite():
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, routed_scaling_factor=1.0, topk_method="greedy",
        norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
        architectures=["DeepseekV2ForCausalLM"])


def _olmoe_1b_7b():
    from transformers import OlmoeConfig

    return OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                       norm_topk_prob=False, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, architectures=["OlmoeForCausalLM"])


SYNTHETIC_MODELS: dict[str, Callable] = {
    "mixtral-8x7b": _mixtral_8x7b,
    "qwen3-30b-a3b": _qwen3_30b_a3b,
    "deepseek-v2-lite": _deepseek_v2_lite,
    "olmoe-1b-7b": _olmoe_1b_7b,
}


def synthetic_hf_config(name: str, num_layers: int | None = None):
    if name not in SYNTHETIC_MODELS:
        raise ConfigError(f"unknown synthetic model {name!r}; choose one of {', '.join(SYNTHETIC_MODELS)}")
    return shortened(SYNTHETIC_MODELS[name](), num_layers, name)


def shortened(hf_config, num_layers: int | None, name: str):
    """`hf_config` cut to its first `num_layers` layers (`--num-layers`), validated."""
    if num_layers is not None:
        if not 1 <= num_layers <= hf_config.num_hidden_layers:
            raise ConfigError(f"--num-layers {num_layers} must be in 1..{hf_config.num_hidden_layers} for {name}")
        hf_config.num_hidden_layers = num_layers
    return hf_config


@torch.no_grad()
def init_random_weights(model, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) matrices, unit norms; the same numbers for the same seed on the same device."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, std, generator=gen)
    experts = model.experts
    for tensors in (getattr(experts, "w13", {}), getattr(experts, "w2", {})):
        for t in tensors.values():
            t.normal_(0, std, generator=gen)
    store = getattr(experts, "store", None)  # offloaded: the resident backend's numbers, into the host copies
    if store is not None:
        cfg, e = model.cfg, model.cfg.moe.num_experts
        i, d = cfg.moe.intermediate_size, cfg.hidden_size
        for shape, cols in (((e, 2 * i, d), slice(0, 2 * i * d)), ((e, d, i), slice(2 * i * d, 3 * i * d))):
            buf = torch.empty(shape, dtype=store.dtype, device=gen.device)  # one layer's w13 [E, 2I, D] / w2 [E, D, I]
            for layer in cfg.moe_layers:  # the order ResidentExperts draws its stacks in
                buf.normal_(0, std, generator=gen)
                for x in range(e):
                    store.pool[store.row[(layer, x)], cols].copy_(buf[x].reshape(-1))


def build_synthetic(name: str, num_layers: int | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    backend_factory: BackendFactory = ResidentExperts) -> LoadedModel:
    hf_config = synthetic_hf_config(name, num_layers)
    cfg = model_config_from_hf(hf_config)
    model = build_model(cfg, torch.device(device), dtype, backend_factory)
    if getattr(getattr(model.experts, "store", None), "disk", None):
        raise ConfigError("a --synthetic model has no checkpoint files to keep experts on disk: "
                          "drop --host-memory-budget (or give it room for every expert)")
    init_random_weights(model, seed)
    return LoadedModel(model=model, config=cfg, path=None)
