"""One routed expert, quantized, in ONE contiguous uint8 buffer, so that one host-to-device copy moves it
into a slot of a low-precision GPU pool (`pool [S, layout.nbytes] uint8`).

gate [I, D] and up [I, D] are quantized together as w13 = [gate; up] [2I, D] (groups run along D inside
each row, so this equals quantizing them one by one), down [D, I] as w2 along I. Sections, each starting
on a 128-byte boundary (the buffer length is a multiple of 128 too, so slots of a pool stay aligned):

    w13.packed [2I, D / per_byte] uint8   codes (groupwise.py layout: rows of bit-planed groups)
    w2.packed  [D, I / per_byte]  uint8
    w13.scale  [D / G, 2I] float16,  w13.minimum [D / G, 2I] float16
    w2.scale   [I / G, D]  float16,  w2.minimum  [I / G, D]  float16

`ExpertLayout` holds the byte offsets; kernels read a slot through them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from expertyard.errors import ConfigError
from expertyard.quant.groupwise import QuantizedMatrix, check_bits_and_group, dequantize, per_byte, quantize

# D = hidden size, I = expert intermediate size, G = group size

ALIGN = 128
SECTIONS = ("w13_packed", "w2_packed", "w13_scale", "w13_minimum", "w2_scale", "w2_minimum")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ExpertLayout:
    """Where each part of a packed expert lives: byte offsets into the expert's buffer of `nbytes` bytes."""

    hidden: int
    inter: int
    bits: int
    group_size: int
    w13_packed: int
    w2_packed: int
    w13_scale: int
    w13_minimum: int
    w2_scale: int
    w2_minimum: int
    nbytes: int

    @classmethod
    def build(cls, hidden: int, inter: int, bits: int, group_size: int = 64) -> ExpertLayout:
        check_bits_and_group(bits, group_size, hidden, "gate/up projections (hidden size)")
        check_bits_and_group(bits, group_size, inter, "down projection (expert intermediate size)")
        d, i, g = hidden, inter, group_size
        sizes = {"w13_packed": d // per_byte(bits) * 2 * i, "w2_packed": i // per_byte(bits) * d,
                 "w13_scale": d // g * 2 * i * 2, "w13_minimum": d // g * 2 * i * 2,
                 "w2_scale": i // g * d * 2, "w2_minimum": i // g * d * 2}
        offsets, pos = {}, 0
        for name in SECTIONS:
            offsets[name] = pos
            pos = _align(pos + sizes[name])
        return cls(hidden=d, inter=i, bits=bits, group_size=g, nbytes=pos, **offsets)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExpertLayout:
        fields = json.loads(text)
        layout = cls.build(fields["hidden"], fields["inter"], fields["bits"], fields["group_size"])
        if asdict(layout) != fields:
            raise ConfigError(f"packed-expert layout {fields} differs from this version's {asdict(layout)}; "
                              "re-run `expertyard quantize`")
        return layout

    @property
    def bf16_nbytes(self) -> int:
        return 3 * self.hidden * self.inter * 2


def _section(buf: torch.Tensor, offset: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    size = rows * cols * torch.empty((), dtype=dtype).element_size()
    return buf[offset:offset + size].view(dtype).view(rows, cols)


def expert_views(buf: torch.Tensor, layout: ExpertLayout) -> tuple[QuantizedMatrix, QuantizedMatrix]:
    """Views (no copies) of a packed expert buffer [nbytes] uint8 as (w13 [2I, D], w2 [D, I]) QuantizedMatrix."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != layout.nbytes:
        raise ConfigError(f"a packed expert is a uint8 vector of {layout.nbytes} bytes, got {buf.dtype} "
                          f"of shape {tuple(buf.shape)}")
    d, i, b, g = layout.hidden, layout.inter, layout.bits, layout.group_size
    w13 = QuantizedMatrix(packed=_section(buf, layout.w13_packed, 2 * i, d // per_byte(b), torch.uint8),
                          scale=_section(buf, layout.w13_scale, d // g, 2 * i, torch.float16),
                          minimum=_section(buf, layout.w13_minimum, d // g, 2 * i, torch.float16),
                          bits=b, group_size=g, shape=(2 * i, d))
    w2 = QuantizedMatrix(packed=_section(buf, layout.w2_packed, d, i // per_byte(b), torch.uint8),
                         scale=_section(buf, layout.w2_scale, i // g, d, torch.float16),
                         minimum=_section(buf, layout.w2_minimum, i // g, d, torch.float16),
                         bits=b, group_size=g, shape=(d, i))
    return w13, w2


def pack_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, bits: int, group_size: int = 64,
                out: torch.Tensor | None = None, clip_search: bool = False) -> torch.Tensor:
    """Quantize one expert (gate, up [I, D], down [D, I]) into a packed buffer [layout.nbytes] uint8 on their
    device (or into `out`, e.g. a row of a pinned host pool). `clip_search`: see groupwise.quantize."""
    i, d = gate.shape
    if tuple(up.shape) != (i, d) or tuple(down.shape) != (d, i):
        raise ConfigError(f"expert shapes gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}: "
                          f"expected [I, D], [I, D], [D, I]")
    layout = ExpertLayout.build(d, i, bits, group_size)
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=gate.device) if out is None else out
    views = expert_views(buf, layout)
    for dst, w in zip(views, (torch.cat([gate, up]), down)):
        q = quantize(w, bits, group_size, clip_search)
        dst.packed.copy_(q.packed)
        dst.scale.copy_(q.scale)
        dst.minimum.copy_(q.minimum)
    return buf


def pack_expert_flat(flat: torch.Tensor, hidden: int, inter: int, bits: int, group_size: int = 64,
                     clip_search: bool = False) -> torch.Tensor:
    """Quantize an expert held as the host store's flat buffer [gate | up | down] (3*I*D elements)."""
    i, d = inter, hidden
    if flat.numel() != 3 * i * d:
        raise ConfigError(f"a flat expert of I={i}, D={d} has {3 * i * d} elements, got {flat.numel()}")
    return pack_expert(flat[:i * d].view(i, d), flat[i * d:2 * i * d].view(i, d), flat[2 * i * d:].view(d, i),
                       bits, group_size, clip_search=clip_search)


def dequantize_expert(buf: torch.Tensor, layout: ExpertLayout, dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed expert -> (w13 [2I, D], w2 [D, I]) in `dtype`, the layout of kernels/fused_moe.py."""
    w13, w2 = expert_views(buf, layout)
    return dequantize(w13, dtype), dequantize(w2, dtype)


def new_pool(num_slots: int, layout: ExpertLayout, device: torch.device | str) -> torch.Tensor:
    """A low-precision slot pool [S, nbytes] uint8: slot s receives an expert by `pool[s].copy_(buf)`."""
    return torch.zeros(num_slots, layout.nbytes, dtype=torch.uint8, device=device)
