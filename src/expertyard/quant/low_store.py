"""Low-precision copies of every routed expert in host memory, beside the full-precision host store.

One packed buffer per expert (`quant/packed_expert.py`), rows of one pinned uint8 pool [N, nbytes], so a
low-precision miss is one `copy_` of `nbytes` (28% of bf16 at int4 G64). Built at load by quantizing the host
store (on the GPU when there is one: Mixtral-8x7B's 336 MiB experts pack in milliseconds there, seconds on a
CPU), or read from the files `expertyard quantize` wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from expertyard.device import pin_for_life_of
from expertyard.errors import CheckpointError, ConfigError
from expertyard.quant.packed_expert import ExpertLayout, pack_expert_flat
from expertyard.quant.store import file_name, load_quantized_experts

BITS_BY_NAME = {"int8": 8, "int4": 4, "int2": 2}
ExpertKey = tuple[int, int]  # (layer, expert)


class FullPrecisionExperts(Protocol):
    """What quantizing needs of the full-precision host store (experts/host_store.py: HostExpertStore)."""

    hidden: int
    inter: int

    def source(self, key: ExpertKey, device: torch.device) -> torch.Tensor:
        """The expert's flat host buffer [3*I*D] (gate, up, down)."""


def parse_low_precision(text: str) -> int:
    """'int4' (or '4') -> 4."""
    bits = BITS_BY_NAME.get(text.lower()) or (int(text) if text.isdigit() and int(text) in (8, 4, 2) else None)
    if bits is None:
        raise ConfigError(f"--low-precision {text!r}: choose int8, int4 or int2")
    return bits


class LowPrecisionStore:
    def __init__(self, keys: list[ExpertKey], layout: ExpertLayout, pin: bool):
        self.layout = layout
        self.row = {k: n for n, k in enumerate(keys)}
        self.pool = torch.zeros(len(keys), layout.nbytes, dtype=torch.uint8)  # [N, nbytes]
        self.pinned = pin_for_life_of(self, self.pool) if pin else False

    @property
    def expert_bytes(self) -> int:
        return self.layout.nbytes

    def source(self, key: ExpertKey) -> torch.Tensor:
        return self.pool[self.row[key]]

    @classmethod
    def quantize(cls, host: FullPrecisionExperts, keys: list[ExpertKey], bits: int, group_size: int,
                 device: torch.device, pin: bool, progress: bool = True) -> LowPrecisionStore:
        """Pack every expert of the full-precision host store (on `device`, back into pinned host rows)."""
        layout = ExpertLayout.build(host.hidden, host.inter, bits, group_size)
        store = cls(keys, layout, pin)
        for key in tqdm(keys, desc=f"quantizing experts to int{bits}", unit="expert", disable=not progress):
            flat = host.source(key, torch.device("cpu")).to(device, torch.float32)
            store.pool[store.row[key]].copy_(pack_expert_flat(flat, host.hidden, host.inter, bits, group_size))
        return store

    @classmethod
    def from_files(cls, directory: Path, keys: list[ExpertKey], bits: int, model, hidden: int, inter: int,
                   pin: bool) -> LowPrecisionStore:
        """Read DIR/experts.int{bits}.safetensors (checked against `model`'s shapes and routers)."""
        experts = load_quantized_experts(directory, bits, model=model)
        layout = experts.layout
        if (layout.hidden, layout.inter) != (hidden, inter):
            raise CheckpointError(f"{Path(directory) / file_name(bits)}: experts of D={layout.hidden}, "
                                  f"I={layout.inter}; the model has D={hidden}, I={inter}")
        store = cls(keys, layout, pin)
        for key in keys:
            store.pool[store.row[key]].copy_(experts[key])
        return store
