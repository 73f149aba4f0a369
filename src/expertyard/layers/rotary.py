"""Rotary position embeddings. Inverse frequencies come from transformers' own RoPE functions, so every
rope_type a checkpoint declares (default, linear, dynamic, yarn, llama3, longrope) is computed as the
reference computes it."""

from __future__ import annotations

from typing import Literal

import torch

from expertyard.errors import ConfigError

# T = tokens, H = heads, R = rotary dim


def rope_parameters(hf_config) -> tuple[torch.Tensor, float]:
    """(inv_freq [R/2] float32, attention_scaling) for a transformers config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(f"rope_type={rope_type!r} is not known to this transformers version")
    if rope_type in ("dynamic", "longrope"):
        raise ConfigError(f"rope_type={rope_type!r} changes with sequence length and is not supported yet")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, inv_freq: torch.Tensor, scaling: float, style: Literal["half", "interleaved"]):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling
        self.style = style

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, R/2]
        return freqs.cos() * self.scaling, freqs.sin() * self.scaling

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, H, R] -> rotated [T, H, R] in x.dtype; cos/sin: [T, R/2] float32."""
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, R/2]
        x32 = x.float()
        if self.style == "half":
            x1, x2 = x32.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:  # interleaved pairs (x[2i], x[2i+1]) as complex numbers
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return out.to(x.dtype)
