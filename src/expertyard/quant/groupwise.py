"""Group-wise asymmetric quantization of a weight matrix to 8, 4 or 2 bits.

A matrix W [N, K] (N output rows, K input columns; y = W @ x) is cut along K into groups of `group_size`
consecutive input columns. Each (row, group) gets a float16 `scale` and a float16 `minimum`, and each weight
a code q in [0, 2^bits - 1]:

    W[n, k] ~ minimum[g, n] + q[n, k] * scale[g, n],    g = k // group_size

`minimum` is rounded *down* to float16 and `scale` *up*, so the code grid covers the whole range of the
group and round-to-nearest stays within scale / 2 of every weight (no clamping error). Storing the minimum
(a float offset) rather than an integer zero point costs the same 4 bytes per group in float16 and keeps
the grid edge exactly on the group's minimum; docs/quantization.md compares the two on real weights.

Codes are packed along K, row-major (K contiguous), little-endian inside a byte, in bit-planes per group:

    packed[n, g * GB + r] (uint8) = sum_j q[n, g * group_size + j * GB + r] << (j * bits)
    GB = group_size / per_byte,  per_byte = 8 // bits,  packed: [N, K / per_byte],  scale, minimum: [K / G, N]

i.e. inside each group, bit-plane j of the GB bytes holds GB consecutive input columns. A kernel then feeds
each plane to a matrix product against GB *consecutive* activations (no strided gather), and reads the codes of
an output row as contiguous bytes; the float16 scales of a group are one contiguous vector over N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertyard.errors import ConfigError

# N = output rows, K = input columns (the reduction dimension), G = group size, GB = G / per_byte

BITS = (8, 4, 2)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized [N, K] matrix: codes `packed` [N, K * bits / 8] uint8, `scale` and `minimum` [K / G, N] float16."""

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K) of the original matrix

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))


def per_byte(bits: int) -> int:
    return 8 // bits


def check_bits_and_group(bits: int, group_size: int, k: int | None = None, what: str = "matrix") -> None:
    """Raise ConfigError, naming the value, unless `bits` and `group_size` can quantize K input columns."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits} is not supported; choose one of {', '.join(map(str, BITS))}")
    if group_size < 8 or group_size % 8:
        raise ConfigError(f"group_size={group_size} must be a positive multiple of 8 (64 or 128 are usual)")
    if k is not None and k % group_size:
        raise ConfigError(f"group_size={group_size} does not divide the {k} input columns of the {what}; "
                          f"pick a group size that divides {k}")


def pack_codes(q: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes q [N, K] (integers in [0, 2^bits)) -> packed [N, K / per_byte] uint8 (see the module docstring)."""
    n, k = q.shape
    pb = per_byte(bits)
    if k % group_size or group_size % pb:
        raise ConfigError(f"K={k} must be a multiple of group_size={group_size}, itself a multiple of {pb}")
    qg = q.to(torch.uint8).reshape(n, k // group_size, pb, group_size // pb)  # [N, K/G, plane, GB]
    out = qg[:, :, 0].clone()
    for j in range(1, pb):
        out |= qg[:, :, j] << (j * bits)
    return out.reshape(n, k // pb)  # [N, K / per_byte]


def unpack_codes(packed: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """packed [N, K / per_byte] uint8 -> codes [N, K] uint8 (the inverse of `pack_codes`)."""
    n, r = packed.shape
    pb, mask = per_byte(bits), (1 << bits) - 1
    pg = packed.reshape(n, r * pb // group_size, group_size // pb)  # [N, K/G, GB]
    planes = [(pg >> (j * bits)) & mask for j in range(pb)]  # per_byte x [N, K/G, GB]
    return torch.stack(planes, dim=2).reshape(n, r * pb)  # [N, K]


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """Largest float16 <= x (x float32)."""
    y = x.to(torch.float16)
    over = y.float() > x
    return torch.where(over, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= x (x float32, >= 0)."""
    y = x.to(torch.float16)
    under = y.float() < x
    return torch.where(under, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _grid(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (minimum <= lo, scale) whose grid minimum + [0, qmax] * scale reaches hi."""
    minimum = _fp16_down(lo)
    return minimum, _fp16_up((hi - minimum.float()) / qmax)


def _codes(wg: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest codes [N, K/G, G] (float) of wg on each group's grid."""
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # scale 0: a constant group that float16 holds exactly
    return torch.round((wg - minimum.float().unsqueeze(-1)) / safe).clamp_(0, qmax)


CLIP_RATIOS = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def quantize(w: torch.Tensor, bits: int, group_size: int = 64, clip_search: bool = False) -> QuantizedMatrix:
    """Group-wise quantization of w [N, K] (any float dtype, any device) along K, rounding to nearest.

    By default each group's grid spans its [min, max], so every weight is within scale / 2 of its value.
    `clip_search` also tries grids shrunk about the group's centre by each of CLIP_RATIOS and keeps, per group,
    the one of least squared error (the extremes are then clipped); it matters at 2 bits (docs/quantization.md)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"quantize takes a float matrix [N, K], got {w.dtype} of shape {tuple(w.shape)}")
    n, k = w.shape
    check_bits_and_group(bits, group_size, k)
    qmax = (1 << bits) - 1
    wg = w.detach().float().reshape(n, k // group_size, group_size)  # [N, K/G, G]
    if not torch.isfinite(wg).all():
        raise ConfigError("quantize: the matrix holds inf or nan")
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [N, K/G]
    biggest = max(-lo.min().item(), hi.max().item())
    if biggest > FP16_MAX:
        raise ConfigError(f"quantize: weights up to {biggest:.3g} in magnitude do not fit the float16 minimum "
                          f"(|w| must stay within {FP16_MAX:g})")
    minimum, scale = _grid(lo, hi, qmax)  # [N, K/G] float16 each
    q = _codes(wg, minimum, scale, qmax)  # [N, K/G, G]
    if clip_search:
        def sq_err(m, s, codes):
            return (m.float().unsqueeze(-1) + codes * s.float().unsqueeze(-1) - wg).pow(2).sum(-1)  # [N, K/G]

        best = sq_err(minimum, scale, q)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        for ratio in CLIP_RATIOS:
            m, s = _grid(mid - half * ratio, mid + half * ratio, qmax)
            codes = _codes(wg, m, s, qmax)
            err = sq_err(m, s, codes)
            better = err < best
            best = torch.where(better, err, best)
            minimum, scale = torch.where(better, m, minimum), torch.where(better, s, scale)
            q = torch.where(better.unsqueeze(-1), codes, q)
    q = q.to(torch.uint8).reshape(n, k)
    return QuantizedMatrix(packed=pack_codes(q, bits, group_size), scale=scale.T.contiguous(),
                           minimum=minimum.T.contiguous(), bits=bits, group_size=group_size, shape=(n, k))


def dequantize(q: QuantizedMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QuantizedMatrix -> w [N, K] in `dtype` (computed in float32, or float64 when asked for)."""
    n, k = q.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    codes = unpack_codes(q.packed, q.bits, q.group_size).T.to(acc)  # [K, N]
    g = q.group_size
    w = codes.reshape(k // g, g, n) * q.scale.to(acc).unsqueeze(1) + q.minimum.to(acc).unsqueeze(1)  # [K/G, G, N]
    return w.reshape(k, n).T.contiguous().to(dtype)  # [N, K]


def quantized_nbytes(n: int, k: int, bits: int, group_size: int) -> int:
    """Bytes of codes plus float16 scales and minima for an [N, K] matrix."""
    return n * k * bits // 8 + 2 * 2 * n * (k // group_size)
