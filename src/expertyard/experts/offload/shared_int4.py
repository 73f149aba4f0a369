"""int4 on both pipes (HOBBIT on the link and on the host CPU): one int4 copy of every expert in host memory, which
the host CPU computes misses from in place and the device's expert cache copies over the link.

The host copy is the CPU kernel's layout (`experts/cpu/weights.py`: torch's packed int4 codes and a
scale-and-zero per group, one pinned buffer an expert). A copy lands in a device staging buffer and is converted
there, on the copy stream, into the packed layout the device's dequantizing kernel reads (`quant/packed_expert.py`):

    codes:   unpack the CPU's row-blocked nibbles, re-pack them in bit-planes per group (`groupwise.pack_codes`)
    scales:  W = (q - 8) * scale + zero  ->  W = minimum + q * scale, minimum = zero - 8 * scale (float16)

so both pipes compute from the same codes. The link moves the int4 bytes (a quarter of a bf16 expert), and the
device cache holds about four times as many experts as full-precision slots in the same bytes.
"""

from __future__ import annotations

import os

import torch

from expertyard.config import ModelConfig
from expertyard.errors import ConfigError
from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.cpu import CpuExpertStore
from expertyard.experts.cpu.weights import int4_block_rows, unpack_int4_codes
from expertyard.experts.offload.slot_pool import LowPrecisionPool
from expertyard.quant.groupwise import pack_codes
from expertyard.quant.packed_expert import ExpertLayout, expert_views

# D = hidden size, I = expert intermediate size, G = group size, N = output rows, K = input columns


def shared_layout(hidden: int, inter: int, group_size: int) -> ExpertLayout:
    """The device slot layout of an int4 expert shared with the CPU, checked for a conversion without padding."""
    for name, n, k in (("gate/up", 2 * inter, hidden), ("down", hidden, inter)):
        if n % 16 or k % group_size:
            raise ConfigError(f"int4 on both pipes needs the {name} projection's {n} rows to be a multiple of 16 "
                              f"and its {k} input columns a multiple of --group-size {group_size}; use "
                              "--cpu-precision int4 without --precision low")
    return ExpertLayout.build(hidden, inter, 4, group_size)


def conversion_workspace_bytes(layout: ExpertLayout) -> int:
    """Device bytes a copy needs beside its slot: the staging buffer (about one slot) and the temporaries of
    converting the gate/up codes [2I, D] (unpacked nibbles, re-packed planes: a few bytes per weight)."""
    return 2 * layout.nbytes + 4 * 2 * layout.inter * layout.hidden


class CpuInt4Source:
    """The host side of the shared copies: the CPU store's int4 buffers and how to convert one on the device."""

    def __init__(self, store: CpuExpertStore):
        if not store.int4_buffers or "int4" not in store.precisions:
            raise ConfigError("the CPU expert store was built without int4 buffers (int4_buffers=True)")
        self.store = store
        d, i, g = store.hidden, store.inter, store.group_size
        self.layout = shared_layout(d, i, g)
        blocks = {int4_block_rows(n) for n in (2 * i, d)}
        if len(blocks) != 1 or None in blocks:
            raise ConfigError("this CPU's int4 kernel packs codes in a layout expertyard cannot convert for the "
                              "device; use --cpu-precision int4 without --precision low")
        self.block = blocks.pop()
        self.dtype = store.dtype
        self.expert_bytes = store.nbytes("int4")

    def source(self, key) -> torch.Tensor:
        return self.store.int4_buffer(key)

    def convert(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """One expert's CPU-layout bytes `src` [expert_bytes] uint8 -> the device layout, into `out` [nbytes] uint8
        (both on the same device)."""
        convert_cpu_int4(src, out, self.layout, self.block, self.dtype)


def convert_cpu_int4(src: torch.Tensor, out: torch.Tensor, layout: ExpertLayout, block: int, dtype: torch.dtype,
                     kernels: bool | None = None) -> None:
    """`src` [bytes] uint8: per matrix (gate/up [2I, D], then down [D, I]) the CPU's packed codes [N, K/2] (row
    block `block`) and its (scale, zero) [K/G, N, 2] in `dtype` -> the packed expert `out` [layout.nbytes] uint8.
    By Triton kernels on CUDA with EXPERTYARD_INT4_CONVERT_KERNELS=1 (`kernels`: force either way), else by torch
    operations (the kernels are off by default until measured on a GPU)."""
    if kernels is None:
        kernels = src.is_cuda and os.environ.get("EXPERTYARD_INT4_CONVERT_KERNELS", "0") == "1"
    use_kernels = kernels
    if use_kernels:
        from expertyard.kernels.int4_convert_triton import convert_codes, convert_scales
    d, i, g = layout.hidden, layout.inter, layout.group_size
    pos = 0
    for dst, (n, k) in zip(expert_views(out, layout), ((2 * i, d), (d, i))):
        packed = src[pos:pos + n * k // 2].view(n, k // 2)  # [N, K/2] uint8, the CPU's row blocks
        pos += n * k // 2
        nsz = k // g * n * 2 * dtype.itemsize
        sz = src[pos:pos + nsz].view(dtype).view(k // g, n, 2)  # [K/G, N, (scale, zero)]
        pos += nsz
        if use_kernels:
            convert_codes(packed, dst.packed, n, k, g, block)
            convert_scales(sz, dst.scale, dst.minimum)
            continue
        dst.packed.copy_(pack_codes(unpack_int4_codes(packed, n, k, block), 4, g))
        sz = sz.float()
        dst.scale.copy_(sz[..., 0])
        dst.minimum.copy_(sz[..., 1] - 8 * sz[..., 0])


class SharedInt4Pool(LowPrecisionPool):
    """A low-precision pool whose copies come from the CPU's int4 buffers (converted on arrival)."""

    def __init__(self, cfg: ModelConfig, state: ExpertCacheState, source: CpuInt4Source, device: torch.device,
                 dtype: torch.dtype):
        super().__init__(cfg, state, source, device, dtype)
        self.link_bytes = source.expert_bytes  # what one copy moves over the link
        self._staging = torch.empty(source.expert_bytes, dtype=torch.uint8, device=device) if self.cuda else None

    def source(self, key) -> tuple[torch.Tensor, int]:
        return self.store.source(key), self.link_bytes

    def write(self, slot: int, src: torch.Tensor) -> None:
        if self.cuda:  # on the copy stream: copy, then convert into the slot
            self._staging.copy_(src, non_blocking=True)
            self.store.convert(self._staging, self.weights[slot])
            return
        self.store.convert(src, self.weights[slot])
        self._dequantize_slot(slot)
