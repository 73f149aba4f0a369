"""One KV cache row ("slot") per running sequence, pre-allocated once."""

from __future__ import annotations

import torch

from expertyard.models.base import CausalLM


def allocate_kv_cache(model: CausalLM, num_slots: int, max_len: int, device: torch.device,
                      dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Per layer, its attention's cache tensors, each [num_slots, max_len, *feature_shape]."""
    return [[torch.zeros(num_slots, max_len, *shape, device=device, dtype=dtype) for shape in layer_shapes]
            for layer_shapes in model.kv_cache_shapes()]


def kv_cache_bytes(model: CausalLM, num_slots: int, max_len: int, dtype: torch.dtype) -> int:
    per_token = sum(torch.Size(shape).numel() for layer in model.kv_cache_shapes() for shape in layer)
    return per_token * num_slots * max_len * torch.empty((), dtype=dtype).element_size()
