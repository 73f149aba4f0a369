"""What an architecture file declares: how to read its HF config, and which checkpoint names differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from expertyard.config import ModelConfig


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str  # the `architectures` entry of config.json
    model_type: str  # transformers' model_type, used by synthetic configs
    config_from_hf: Callable[[object], ModelConfig]
    # (regex, replacement) applied in order to checkpoint tensor names to get expertyard parameter names
    renames: tuple[tuple[str, str], ...] = ()


def head_dim_of(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def every_layer(c) -> tuple[int, ...]:
    return tuple(range(c.num_hidden_layers))


def qwen_moe_layers(c) -> tuple[int, ...]:
    """Qwen2/3-MoE: MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
    only_mlp = set(getattr(c, "mlp_only_layers", None) or [])
    step = getattr(c, "decoder_sparse_step", 1) or 1
    return tuple(i for i in range(c.num_hidden_layers)
                 if i not in only_mlp and c.num_experts > 0 and (i + 1) % step == 0)
