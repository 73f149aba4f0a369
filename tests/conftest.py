"""Tiny random models of every supported architecture, built and saved by transformers (the reference); the
bundled model's engines and servers, shared by the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings


def _shared_dir() -> Path:
    """The developers' `shared/` folder beside the checkout (`../shared`); a git worktree one level further down
    (`worktrees/NAME/`) finds it one level further up. Tests that need it skip when it is absent (a user's clone)."""
    repo = Path(__file__).resolve().parents[1]
    for candidate in (repo.parent / "shared", repo.parent.parent / "shared"):
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared"


SHARED = _shared_dir()

# CI (and a default run) explores the same hypothesis examples every time, so a red run is reproducible and a
# green one stays green; HYPOTHESIS_PROFILE=explore draws new examples (run it when changing a tested module)
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True)
def _unfreeze_collector():
    """Entry points freeze the garbage collector's view of start-up objects (engine/collector.py), which is right
    for one server process; a test process builds hundreds of engines, so each test gives them back."""
    yield
    import gc

    gc.unfreeze()


@pytest.fixture(scope="session")
def bundled_engine():
    """Engines of the bundled model, one per configuration, shared by the whole session (callers leave them
    idle and as configured): bundled_engine(max_num_seqs=8, max_model_len=256, ...)."""
    from servers import make_engine

    cache: dict = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = make_engine(**kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def bundled_server():
    """One server on its own bundled-model engine (synchronous scheduling, 8 sequences, 256 tokens), shared by
    the tests that only send requests."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from servers import RunningServer, make_engine

    s = RunningServer(make_engine())
    yield s
    s.stop()


@pytest.fixture(scope="session")
def tool_template_server(tmp_path_factory):
    """A server on the bundled model with a chat template that shows the model its tools."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from servers import RunningServer, make_engine, tool_template_model

    path = tool_template_model(tmp_path_factory.mktemp("tools"))
    s = RunningServer(make_engine(max_num_seqs=2, max_model_len=512, path=path))
    yield s
    s.stop()


def tiny_hf_config(name: str):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=3, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    if name == "mixtral_sliding":
        return tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=5)
    if name == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                 num_experts_per_tok=2, shared_expert_intermediate_size=48, mlp_only_layers=[1])
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
                                 num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)
    if name == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=32, num_experts=8, num_experts_per_tok=2, clip_qkv=4.0)
    if name == "deepseek_v2":  # V2-Lite style: no q LoRA, greedy routing, dense first layer
        return tf.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, intermediate_size=96,
                                   moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                   n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=1.0)
    if name == "deepseek_v2_full":  # V2 style: q LoRA, group-limited routing, scaled weights, YaRN rope
        return tf.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, intermediate_size=96,
                                   moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                   n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=24,
                                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=2.0,
                                   topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 64, "beta_fast": 32,
                                                    "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    raise KeyError(name)


def disagg_tiny_hf_config():
    """The distributed tests' model: a shared expert with a sigmoid gate, a dense layer between MoE layers,
    top-3 of 8 experts."""
    import transformers as tf

    return tf.Qwen2MoeConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=3, max_position_embeddings=256, rms_norm_eps=1e-6,
                             tie_word_embeddings=False, intermediate_size=96, moe_intermediate_size=32,
                             num_experts=8, num_experts_per_tok=3, shared_expert_intermediate_size=48,
                             mlp_only_layers=[1], architectures=["Qwen2MoeForCausalLM"])


ARCH_CASES = ["mixtral", "mixtral_sliding", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v2_full"]


def build_hf_model(name: str):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tiny_hf_config(name)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger than init_std so that routing and attention are far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """name -> (directory saved by transformers, the transformers model)."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            model = build_hf_model(name)
            model.save_pretrained(path)
            cache[name] = (path, model)
        return cache[name]

    return get
