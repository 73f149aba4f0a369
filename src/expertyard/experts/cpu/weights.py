"""CPU compute layouts of one expert: full precision straight from the host store, int8 and int4 weight-only.

An expert computes y = down(silu(gate x) * up x), with gate and up stacked as w13 [2I, D] (gate rows first,
as in the host store's buffer) and down as w2 [D, I]. Each layout's `forward(x [T, D]) -> [T, D]` runs the
whole batch through two matmuls (no loop over tokens), in the layout's compute dtype (the model dtype: torch's
low-bit CPU kernels take activations and scales of one dtype, bfloat16, float16 or float32).

- `FullCpuExpert`: views on the host buffer (no copy), torch's CPU matmul (oneDNN; AMX on CPUs that have it).
- `Int8CpuExpert`: per-output-channel symmetric int8, `torch._weight_int8pack_mm(x [T, K], q int8 [N, K],
  scales [N]) -> x @ (q * scales[:, None]).T`.
- `Int4CpuExpert`: group-wise asymmetric int4, packed by `torch._convert_weight_to_int4pack_for_cpu(q int32
  [N, K] in 0..15, 1) -> uint8 [N, K / 2]`, run by `torch._weight_int4pack_mm_for_cpu(x [T, K], packed,
  group_size, scale_and_zero [K / G, N, 2])`, which dequantizes W[n, k] = (q[n, k] - 8) * scale + zero of
  (group k // G, row n).

The int kernels want N a multiple of 16 (int4) and K a multiple of the group (int4) or of 16 (int8 in
bfloat16: other K give wrong sums), so weights are zero-padded to those multiples at load and activations
zero-padded per call (a no-op at real model shapes). Where this torch lacks a kernel, the layout keeps its
codes and dequantizes per call before a plain matmul (same numbers, slower).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertyard.errors import ConfigError

# T = tokens, D = hidden size, I = expert intermediate size, N = output rows, K = input columns (reduction),
# G = int4 group size; Np, Kp = N, K padded for the kernels

HAS_INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")
HAS_INT4_KERNEL = (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
                   and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ROWS_PER_CHUNK = 128  # quantize this many rows at a time: the float32 temporaries stay in the CPU cache


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def default_group_size(hidden: int, inter: int) -> int:
    """128 where it divides D and I, else the largest of 64, 32 that does, else 32 (the weights are padded)."""
    for g in (128, 64, 32):
        if hidden % g == 0 and inter % g == 0:
            return g
    return 32


def check_group_size(group_size: int | None, hidden: int, inter: int) -> int:
    """`group_size` (None: the default for these shapes), validated against what the int4 CPU kernel accepts."""
    if group_size is None:
        return default_group_size(hidden, inter)
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 CPU group size {group_size} is not supported by torch's int4 CPU kernel; choose "
                          f"one of {', '.join(map(str, INT4_GROUP_SIZES))} (default: 128 where it divides "
                          f"D={hidden} and I={inter})")
    return group_size


def int8_nbytes(hidden: int, inter: int, dtype: torch.dtype) -> int:
    """Bytes of one expert's Int8CpuExpert (what `int8_grid` allocates, padding included)."""
    esize = torch.empty((), dtype=dtype).element_size()
    return sum(_round_up(n, 16) * (_round_up(k, 64) + esize) for n, k in ((2 * inter, hidden), (hidden, inter)))


def int4_nbytes(hidden: int, inter: int, group_size: int, dtype: torch.dtype) -> int:
    """Bytes of one expert's Int4CpuExpert (packed codes, scales and zeros, padding included)."""
    esize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for n, k in ((2 * inter, hidden), (hidden, inter)):
        np_, kp = _round_up(n, 16), _round_up(k, group_size)
        total += np_ * kp // 2 + np_ * (kp // group_size) * 2 * esize
    return total


class CpuExpert(ABC):
    precision: str
    hidden: int
    inter: int
    dtype: torch.dtype  # compute dtype: activations are converted to it once per call

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of weights one call reads."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] (any float dtype) -> [T, D] in `dtype`."""

    def _input(self, x: torch.Tensor, k_pad: int) -> torch.Tensor:
        x = x.to(self.dtype).contiguous()  # [T, D]
        return F.pad(x, (0, k_pad - x.shape[1])) if k_pad != x.shape[1] else x  # [T, Kp]

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, >= 2I] (gate | up | padding) -> silu(gate) * up [T, I]."""
        i = self.inter
        return F.silu(h[:, :i]) * h[:, i:2 * i]


class FullCpuExpert(CpuExpert):
    precision = "full"

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        # w13 [2I, D], w2 [D, I]: views on the host store's buffer, never copied
        self.w13, self.w2 = w13, w2
        self.inter, self.hidden = w13.shape[0] // 2, w13.shape[1]
        self.dtype = w13.dtype

    @classmethod
    def from_flat(cls, buf: torch.Tensor, hidden: int, inter: int) -> FullCpuExpert:
        """Views on a host-store buffer [3*I*D] = [gate | up | down]."""
        n13 = 2 * inter * hidden
        return cls(buf[:n13].view(2 * inter, hidden), buf[n13:].view(hidden, inter))

    @property
    def nbytes(self) -> int:
        return (self.w13.numel() + self.w2.numel()) * self.w13.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)  # [T, D]
        return F.linear(self._act(F.linear(x, self.w13)), self.w2)  # [T, 2I] -> [T, I] -> [T, D]


# ---- int8 ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int8Matrix:
    """W [N, K] ~ q * scale[:, None]: q int8 [Np, Kp] (zero-padded), scale [Np] in the compute dtype."""

    q: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        return (self.q.float() * self.scale.float()[:, None])[:n, :k]  # [N, K] float32

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, Kp] (compute dtype, contiguous) -> x @ W.T [T, Np]."""
        if HAS_INT8_KERNEL:
            return torch._weight_int8pack_mm(x, self.q, self.scale)
        return F.linear(x, self.q.to(x.dtype)) * self.scale  # dequantize-then-matmul (torch without the kernel)


def int8_grid(w: torch.Tensor, dtype: torch.dtype) -> Int8Matrix:
    """Symmetric per-row int8 of w [N, K]: scale = max|w_row| / 127 rounded up in `dtype`, q = round(w / scale)."""
    n, k = w.shape
    np_, kp = _round_up(n, 16), _round_up(k, 64)
    absmax = w.abs().amax(dim=1).float()  # [N]
    scale = F.pad((absmax / 127 * (1 + 2 ** -7)).to(dtype), (0, np_ - n))  # [Np]; rounding can't shrink it
    safe = torch.where(scale > 0, scale.float(), torch.ones((), device=w.device))  # [Np]
    q = torch.zeros(np_, kp, dtype=torch.int8)  # [Np, Kp]
    for r in range(0, n, _ROWS_PER_CHUNK):
        rows = w[r:r + _ROWS_PER_CHUNK].to(torch.float32, copy=True)  # [R, K], a copy: modified in place
        rows.div_(safe[r:r + rows.shape[0], None]).round_().clamp_(-127, 127)
        q[r:r + rows.shape[0], :k] = rows.cpu()
    return Int8Matrix(q, scale.cpu(), (n, k))


class Int8CpuExpert(CpuExpert):
    precision = "int8"

    def __init__(self, w13: Int8Matrix, w2: Int8Matrix):
        self.w13, self.w2 = w13, w2
        self.hidden, self.inter = w2.shape
        self.dtype = w13.scale.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in (self.w13, self.w2) for t in (m.q, m.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13.matmul(self._input(x, self.w13.q.shape[1]))  # [T, Np13]
        a = self._act(h)  # [T, I]
        a = F.pad(a, (0, self.w2.q.shape[1] - self.inter)) if self.w2.q.shape[1] != self.inter else a  # [T, Kp2]
        return self.w2.matmul(a)[:, :self.hidden]  # [T, D]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, D], w2 [D, I]) float32 as the kernel sees them."""
        return self.w13.dequantize(), self.w2.dequantize()


# ---- int4 ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int4Grid:
    """W [N, K] ~ (codes - 8) * scale + zero per (row, group of G input columns); codes int32 [Np, Kp] in 0..15,
    scale and zero [Np, Kp / G] in the compute dtype (zero-padded rows and columns)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        g = self.group_size
        s = self.scale.float().repeat_interleave(g, dim=1)  # [Np, Kp]
        z = self.zero.float().repeat_interleave(g, dim=1)
        return ((self.codes.float() - 8) * s + z)[:n, :k]  # [N, K] float32


def int4_grid(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> Int4Grid:
    """Asymmetric group-wise int4 of w [N, K]: per group, scale = (max - min) / 15 (rounded up in `dtype`),
    zero = min + 8 * scale, codes = round((w - zero) / scale) + 8 clamped to 0..15."""
    n, k = w.shape
    g = group_size
    np_, kp = _round_up(n, 16), _round_up(k, g)
    codes = torch.full((np_, kp), 8, dtype=torch.int32)  # [Np, Kp]; padding dequantizes to zero
    scale = torch.zeros(np_, kp // g, dtype=dtype)  # [Np, Kp/G]
    zero = torch.zeros(np_, kp // g, dtype=dtype)
    for r in range(0, n, _ROWS_PER_CHUNK):
        rows = w[r:r + _ROWS_PER_CHUNK].to(torch.float32, copy=True)  # [R, K], a copy: modified in place
        rows = F.pad(rows, (0, kp - k)).view(rows.shape[0], kp // g, g)  # [R, Kp/G, G]
        lo, hi = torch.aminmax(rows, dim=2)  # [R, Kp/G]
        s = ((hi - lo) / 15 * (1 + 2 ** -7)).to(dtype)  # rounded in dtype, never below (hi - lo) / 15
        z = (lo + 8 * s.float()).to(dtype)
        safe = torch.where(s > 0, s.float(), torch.ones((), device=w.device))
        rows.sub_(z.float().unsqueeze(2)).div_(safe.unsqueeze(2)).round_().add_(8).clamp_(0, 15)  # codes
        rr = slice(r, r + rows.shape[0])
        codes[rr] = rows.view(rows.shape[0], kp).cpu()
        scale[rr], zero[rr] = s.cpu(), z.cpu()
    return Int4Grid(codes, scale, zero, g, (n, k))


class Int4Matrix:
    """An Int4Grid in the kernel's packed layout: packed uint8 [Np, Kp / 2], scale_and_zero [Kp / G, Np, 2]."""

    def __init__(self, grid: Int4Grid):
        self.shape, self.group_size = grid.shape, grid.group_size
        self.kp = grid.codes.shape[1]
        self.scale_and_zero = torch.stack([grid.scale, grid.zero], dim=2).transpose(0, 1).contiguous()
        if HAS_INT4_KERNEL:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(grid.codes, 1)
        else:  # two codes a byte, low nibble first: kept for dequantize-then-matmul
            c = grid.codes.to(torch.uint8)
            self.packed = c[:, 0::2] | (c[:, 1::2] << 4)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_and_zero))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, Kp] (compute dtype, contiguous) -> x @ W.T [T, Np]."""
        if HAS_INT4_KERNEL:
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scale_and_zero)
        codes = torch.stack([self.packed & 15, self.packed >> 4], dim=2).view(self.packed.shape[0], self.kp)
        s, z = (self.scale_and_zero[..., j].T.repeat_interleave(self.group_size, dim=1) for j in (0, 1))
        return F.linear(x, ((codes.to(x.dtype) - 8) * s + z).to(x.dtype))  # [Np, Kp] dequantized per call


def int4_block_rows(rows: int, cols: int = 64) -> int | None:
    """How this CPU's int4 kernel lays out packed codes of a [rows, cols] matrix: the row block B such that
    `unpack_int4_codes` inverts it, found by packing a random probe (torch picks the layout by the CPU's vector
    width: x86 with AVX-512 pairs rows n and n + 32 of each 64-row block). None when no known layout matches."""
    if not HAS_INT4_KERNEL:
        return 0
    q = torch.randint(0, 16, (rows, cols), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (64, 32, 16, 0):
        if (block == 0 or rows % block == 0) and torch.equal(unpack_int4_codes(packed, rows, cols, block).int(), q):
            return block
    return None


def unpack_int4_codes(packed: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """Packed int4 codes [rows, cols / 2] uint8 (any device) -> codes [rows, cols] uint8 in 0..15. `block` B: the
    byte at [b, k, j] of the [rows / B, cols, B / 2] view holds row b B + j in its low nibble and row
    b B + B / 2 + j in its high one; B = 0: two consecutive columns a byte, low nibble first."""
    if block == 0:
        return torch.stack([packed & 15, packed >> 4], dim=2).reshape(rows, cols)
    b = packed.reshape(rows // block, cols, block // 2)  # [R/B, C, B/2]
    return torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(rows, cols)  # [R/B, B, C] -> [R, C]


class Int4CpuExpert(CpuExpert):
    precision = "int4"

    def __init__(self, w13: Int4Matrix, w2: Int4Matrix):
        self.w13, self.w2 = w13, w2
        self.hidden, self.inter = w2.shape
        self.group_size = w13.group_size
        self.dtype = w13.scale_and_zero.dtype

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13.matmul(self._input(x, self.w13.kp))  # [T, Np13]
        a = self._act(h)  # [T, I]
        a = F.pad(a, (0, self.w2.kp - self.inter)) if self.w2.kp != self.inter else a  # [T, Kp2]
        return self.w2.matmul(a)[:, :self.hidden]  # [T, D]


def quantize_for_cpu(w13: torch.Tensor, w2: torch.Tensor, bits: int, group_size: int | None = None,
                     dtype: torch.dtype | None = None) -> Int4CpuExpert | Int8CpuExpert:
    """w13 [2I, D], w2 [D, I] (any float dtype, any device: the math runs there, the result lives on the CPU)
    -> the int8 (per channel) or int4 (group-wise, `group_size` None: 128 where it divides D and I) layout,
    computing in `dtype` (default: the weights' dtype)."""
    dtype = dtype or w13.dtype
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"CPU expert compute dtype {dtype} is not supported; use one of bfloat16, float16, float32")
    if w13.dim() != 2 or w2.dim() != 2 or w13.shape[0] != 2 * w2.shape[1] or w13.shape[1] != w2.shape[0]:
        raise ConfigError(f"expert shapes w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not match "
                          f"([2I, D] and [D, I])")
    if bits == 8:
        return Int8CpuExpert(int8_grid(w13, dtype), int8_grid(w2, dtype))
    if bits == 4:
        g = check_group_size(group_size, w2.shape[0], w2.shape[1])
        return Int4CpuExpert(Int4Matrix(int4_grid(w13, g, dtype)), Int4Matrix(int4_grid(w2, g, dtype)))
    raise ConfigError(f"CPU expert compute supports 8 or 4 bits, not {bits}")
