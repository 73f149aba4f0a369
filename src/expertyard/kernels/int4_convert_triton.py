"""The int4 copy's conversion on the device (int4 on both pipes, `experts/offload/shared_int4.py`) in two kernels
per matrix instead of ~a dozen torch operations: the host launches 4 kernels per copied expert.

    codes:  the CPU kernel's row-blocked nibbles [N, K/2] -> bit-planes per group [N, K/2] (`groupwise.pack_codes`)
    scales: (scale, zero) per group, the CPU's dtype -> scale, minimum = zero - 8 * scale (float16)

Bit for bit what `shared_int4.convert_cpu_int4` computes with torch operations (tests/test_shared_int4.py compares them).
Imported only when a CUDA tensor arrives (or under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# N = output rows, K = input columns, G = group size, B = the CPU layout's row block (0: column pairs)

_BLOCK = 1024


@triton.jit
def _cpu_code(src_ptr, n, k, K, mask, ROW_BLOCK: tl.constexpr):
    """The code of weight (n, k) in the CPU's packed int4 layout (see `unpack_int4_codes`)."""
    if ROW_BLOCK == 0:  # two consecutive columns a byte, low nibble first
        byte = tl.load(src_ptr + n * (K // 2) + k // 2, mask=mask, other=0).to(tl.int32)
        shift = (k % 2) * 4
    else:  # [N/B, K, B/2]: row bB + j in the low nibble, row bB + B/2 + j in the high one
        half: tl.constexpr = ROW_BLOCK // 2
        r = n % ROW_BLOCK
        byte = tl.load(src_ptr + ((n // ROW_BLOCK) * K + k) * half + r % half, mask=mask, other=0).to(tl.int32)
        shift = tl.where(r >= half, 4, 0)
    return (byte >> shift) & 15


@triton.jit
def _codes_kernel(src_ptr, dst_ptr, N, K, GROUP: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    # one output byte per lane: dst[n, g G/2 + c] = code(n, gG + c) | code(n, gG + G/2 + c) << 4
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N * (K // 2)
    n = offs // (K // 2)
    j = offs % (K // 2)
    k_lo = (j // (GROUP // 2)) * GROUP + j % (GROUP // 2)
    lo = _cpu_code(src_ptr, n, k_lo, K, mask, ROW_BLOCK)
    hi = _cpu_code(src_ptr, n, k_lo + GROUP // 2, K, mask, ROW_BLOCK)
    tl.store(dst_ptr + offs, (lo | (hi << 4)).to(tl.uint8), mask=mask)


@triton.jit
def _scales_kernel(sz_ptr, scale_ptr, minimum_ptr, numel, BLOCK: tl.constexpr):
    # sz [K/G, N, 2] (scale, zero) -> scale, minimum [K/G, N] float16
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    scale = tl.load(sz_ptr + 2 * offs, mask=mask, other=0).to(tl.float32)
    zero = tl.load(sz_ptr + 2 * offs + 1, mask=mask, other=0).to(tl.float32)
    tl.store(scale_ptr + offs, scale.to(tl.float16), mask=mask)
    tl.store(minimum_ptr + offs, (zero - 8.0 * scale).to(tl.float16), mask=mask)


def convert_codes(packed: torch.Tensor, dst: torch.Tensor, n: int, k: int, group: int, row_block: int) -> None:
    """packed [N, K/2] uint8 (CPU layout) -> dst [N, K/2] uint8 (bit-planes per group), on packed's device."""
    grid = (triton.cdiv(n * k // 2, _BLOCK),)
    _codes_kernel[grid](packed, dst, n, k, GROUP=group, ROW_BLOCK=row_block, BLOCK=_BLOCK)


def convert_scales(sz: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> None:
    """sz [K/G, N, 2] (scale, zero) in the CPU's dtype -> scale, minimum [K/G, N] float16."""
    numel = scale.numel()
    _scales_kernel[(triton.cdiv(numel, _BLOCK),)](sz, scale, minimum, numel, BLOCK=_BLOCK)
