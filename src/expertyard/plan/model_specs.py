"""Which model a plan is for: `--model DIR` (its config.json only; no weights are read), `--synthetic NAME`
(expertyard's synthetic shapes, or the paper's models below), or the bundled model.

The paper's models (MegaScale-Infer, section 6) as transformers configs. Only shapes matter to the planner:
- mixtral-8x22b: mistralai/Mixtral-8x22B-v0.1 config.json (141B parameters).
- dbrx: databricks/dbrx-base config.json (d_model 6144, 48 heads, 8 KV heads, ffn_hidden_size 10752,
  16 experts, top-4, 40 layers, vocab 100352; 132B parameters), written as a Mixtral-layout config: the
  planner's bytes and FLOPs are the same (DBRX's clip_qkv and LayerNorm do not change them).
- scaled-moe-317b: the paper's 317B model with 32 experts has no published config. This shape is an
  assumption: DBRX's attention (6144 hidden, 48/8 heads, vocab 100352) with 48 layers of 32 experts, top-4,
  expert intermediate size 11008, which totals 317.3B parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from expertyard.config import ModelConfig
from expertyard.errors import ConfigError
from expertyard.loader.bundled import bundled_model_path
from expertyard.loader.checkpoint import read_hf_config
from expertyard.loader.load import model_config_from_hf
from expertyard.synthetic import SYNTHETIC_MODELS, shortened, synthetic_hf_config


def _mixtral_like(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, experts: int,
                  top_k: int, tie: bool = False):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                         num_experts_per_tok=top_k, max_position_embeddings=65536, rms_norm_eps=1e-5,
                         rope_theta=1e6, tie_word_embeddings=tie, architectures=["MixtralForCausalLM"])


PAPER_MODELS: dict[str, Callable] = {
    "mixtral-8x22b": lambda: _mixtral_like(32768, 6144, 16384, 56, 48, 8, 8, 2),
    "dbrx": lambda: _mixtral_like(100352, 6144, 10752, 40, 48, 8, 16, 4),
    "scaled-moe-317b": lambda: _mixtral_like(100352, 6144, 11008, 48, 48, 8, 32, 4),
}


def plan_model_names() -> list[str]:
    return sorted({*SYNTHETIC_MODELS, *PAPER_MODELS})


def hf_config_for(synthetic: str | None, model: Path | None, num_layers: int | None = None):
    """The transformers config of a --synthetic name (shortened to `num_layers`), a --model directory, or
    (neither) the bundled model."""
    if synthetic and model:
        raise ConfigError("give one of --model DIR and --synthetic NAME, not both")
    if num_layers is not None and not synthetic:
        raise ConfigError("--num-layers shortens a --synthetic model only")
    if synthetic:
        if synthetic in SYNTHETIC_MODELS:
            return synthetic_hf_config(synthetic, num_layers)
        if synthetic not in PAPER_MODELS:
            raise ConfigError(f"unknown --synthetic model {synthetic!r}; choose one of {', '.join(plan_model_names())}")
        return shortened(PAPER_MODELS[synthetic](), num_layers, synthetic)
    path = Path(model) if model else bundled_model_path()
    if not path.is_dir():
        raise ConfigError(f"--model {path}: not a directory; pass a local Hugging Face model directory")
    return read_hf_config(path)


def model_config_for(synthetic: str | None = None, model: Path | None = None,
                     num_layers: int | None = None) -> ModelConfig:
    return model_config_from_hf(hf_config_for(synthetic, model, num_layers))


def model_label(synthetic: str | None, model: Path | None, num_layers: int | None = None) -> str:
    if synthetic:
        return synthetic + (f" ({num_layers} layers)" if num_layers else "")
    return Path(model).name if model else "tiny-moe (bundled)"
