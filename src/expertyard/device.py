"""Devices, dtypes and page-locked host memory: the one place that turns `--device` / `--dtype` into torch objects."""

from __future__ import annotations

import weakref

import torch

from expertyard.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """('cuda' | 'cpu' | 'cuda:1' | None, 'bfloat16' | ... | None) -> (device, dtype). Defaults: CUDA when torch
    sees a GPU, else the CPU; bfloat16 on CUDA, float32 on the CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for, but torch sees no CUDA device; use --device cpu")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return dev, DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def pin_for_life_of(owner: object, t: torch.Tensor) -> bool:
    """Page-lock `t` while `owner` lives: unregistered before the memory goes back to the allocator (a stale
    registration makes a later registration of that address fail). False if the pages could not be locked."""
    if not _register_pinned(t):
        return False
    weakref.finalize(owner, torch.cuda.cudart().cudaHostUnregister, t.data_ptr())
    return True


def _register_pinned(t: torch.Tensor) -> bool:
    """Page-lock an existing host tensor (no power-of-two rounding, unlike the caching host allocator)."""
    if not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        cudart.cudaGetLastError()  # clear it, or the next CUDA call would report it; copies run pageable
        return False
    return True
