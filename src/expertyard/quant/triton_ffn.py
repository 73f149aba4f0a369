"""Triton grouped expert FFN straight from packed low-bit experts (dequantize in registers), for CUDA tensors.

The grouped form of kernels/fused_moe_triton.py over a low-precision slot pool [S, nbytes] uint8:
  moe_align    pairs sorted by slot, segments padded to BLOCK_M; slot id -1 (or >= S) dropped
  _qgate_up    h[p] = silu(x[t] @ gate_s.T) * (x[t] @ up_s.T)                       [P, I]
  _qdown       y[t] += topk_w[p] * h[p] @ down_s.T  (fp32 atomics, split over groups) [T, D]
Each program owns BLOCK_M rows of one slot x BLOCK_N output columns and streams that slot's codes once.

Per quantization group (GROUP consecutive input columns, one float16 scale s and minimum m per output n):
    sum_k a[k] * (m + q[k] * s) = s * sum_k a[k] * q[k] + m * sum_k a[k]
so the codes go into tl.dot as small integers, exact in bf16/fp16/fp32, and the scale and minimum are applied
once per group to a [BLOCK_M, BLOCK_N] partial sum. Bit-plane j of a group's GB = GROUP / PACK code bytes holds
GB consecutive columns (quant/groupwise.py), so each plane is one dot against GB consecutive activations; the
activations' group sum is one more dot, against a tile of ones, which lands in the accumulator's layout.
MAGIC reads a code as a 16-bit float by OR-ing it into the mantissa of 128.0 (bf16) or 1024.0 (fp16) instead
of converting an integer; the bias is folded into the minimum. ASM does that in inline PTX two codes per
instruction (prmt spreads 4 bytes into 16-bit lanes, one lop3 per plane and register). No host sync; every
buffer is sized from shapes (CUDA-graph capturable after a warm-up call). Block sizes come from `get_config`,
keyed by shapes only.

Interpreted (TRITON_INTERPRET=1, CPU tensors) the same kernels run without the inline PTX.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from expertyard.kernels.fused_moe_triton import _num_sms
from expertyard.kernels.moe_align import max_blocks, moe_align
from expertyard.quant.packed_expert import ExpertLayout

# T = tokens, K = top-k, P = T*K pairs, S = slots, D = hidden, I = expert intermediate, G = group size,
# BM/BN = block sizes, GB = code bytes per group and output row = G / PACK


def _asm_planes(bits: int, magic: int) -> str:
    """PTX turning 4 packed bytes into the 16-bit floats `magic + code` of each of their 8 // bits bit-planes:
    bytes 0, 1 are spread into the 16-bit lanes of one register and bytes 2, 3 of another (prmt), then each
    plane is one shift and one lop3 ((r >> s) & mask | magic) per register, two values at a time."""
    pack, mask = 8 // bits, (1 << bits) - 1
    lanes_mask, lanes_magic = f"0x{mask:04X}{mask:04X}", f"0x{magic:04X}{magic:04X}"
    src = f"${2 * pack}"
    lines = ["{", ".reg .b32 z, lo, hi, tl, th;", "mov.b32 z, 0;",
             f"prmt.b32 lo, {src}, z, 0x4140;", f"prmt.b32 hi, {src}, z, 0x4342;"]
    for j in range(pack):
        if j == 0:
            lines += [f"lop3.b32 ${2 * j}, lo, {lanes_mask}, {lanes_magic}, 0xEA;",
                      f"lop3.b32 ${2 * j + 1}, hi, {lanes_mask}, {lanes_magic}, 0xEA;"]
        else:
            lines += [f"shr.b32 tl, lo, {j * bits};", f"shr.b32 th, hi, {j * bits};",
                      f"lop3.b32 ${2 * j}, tl, {lanes_mask}, {lanes_magic}, 0xEA;",
                      f"lop3.b32 ${2 * j + 1}, th, {lanes_mask}, {lanes_magic}, 0xEA;"]
    return "\n".join(lines + ["}"])


_ASM_CONSTRAINTS_4 = tl.constexpr("=r," * 4 + "r")
_ASM_CONSTRAINTS_2 = tl.constexpr("=r," * 8 + "r")
_ASM_4_BF16 = tl.constexpr(_asm_planes(4, 0x4300))
_ASM_2_BF16 = tl.constexpr(_asm_planes(2, 0x4300))
_ASM_4_FP16 = tl.constexpr(_asm_planes(4, 0x6400))
_ASM_2_FP16 = tl.constexpr(_asm_planes(2, 0x6400))


@triton.jit
def _planes(b, dtype: tl.constexpr, BITS: tl.constexpr, MAGIC_BITS: tl.constexpr, ASM: tl.constexpr):
    """The 8 // BITS bit-planes of a uint8 code tile as `dtype` tiles (plane j: columns j * GB + r), each
    code c read as c (MAGIC_BITS == 0) or as MAGIC_BIAS + c (the code OR-ed into a 16-bit float's mantissa)."""
    if ASM:
        if BITS == 4:
            if MAGIC_BITS == 0x4300:
                return tl.inline_asm_elementwise(_ASM_4_BF16, _ASM_CONSTRAINTS_4, [b],
                                                 dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise(_ASM_4_FP16, _ASM_CONSTRAINTS_4, [b],
                                                 dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            if MAGIC_BITS == 0x4300:
                return tl.inline_asm_elementwise(_ASM_2_BF16, _ASM_CONSTRAINTS_2, [b],
                                                 dtype=(tl.bfloat16,) * 4, is_pure=True, pack=4)
            else:
                return tl.inline_asm_elementwise(_ASM_2_FP16, _ASM_CONSTRAINTS_2, [b],
                                                 dtype=(tl.float16,) * 4, is_pure=True, pack=4)
    else:
        MASK: tl.constexpr = (1 << BITS) - 1
        if BITS == 8:
            return (_code_to(b, dtype, MAGIC_BITS),)
        elif BITS == 4:
            return (_code_to(b & MASK, dtype, MAGIC_BITS), _code_to((b >> 4) & MASK, dtype, MAGIC_BITS))
        else:
            return (_code_to(b & MASK, dtype, MAGIC_BITS), _code_to((b >> 2) & MASK, dtype, MAGIC_BITS),
                    _code_to((b >> 4) & MASK, dtype, MAGIC_BITS), _code_to((b >> 6) & MASK, dtype, MAGIC_BITS))


@triton.jit
def _code_to(c, dtype: tl.constexpr, MAGIC_BITS: tl.constexpr):
    if MAGIC_BITS != 0:
        return (c.to(tl.uint16) | MAGIC_BITS).to(tl.uint16).to(dtype, bitcast=True)
    else:
        return c.to(dtype)


@triton.jit
def _group_sums(a, ones, xs, IEEE: tl.constexpr):
    """xs [BM, BN] += sum over the columns of a [BM, GB], broadcast over BN: a product with a tile of ones, which
    lands in the accumulator's layout (a row sum would need shuffles and a barrier)."""
    if IEEE:
        return tl.dot(a, ones, xs, input_precision="ieee")
    else:
        return tl.dot(a, ones, xs)


@triton.jit(do_not_specialize=["num_blocks"])  # counts that vary per step: see moe_align.py
def _qgate_up_kernel(x_ptr, pool_ptr, pool16_ptr, h_ptr, sorted_ids_ptr, slot_ids_ptr, block_rows_ptr,
                     N, K, top_k, num_blocks, slot_bytes, off_q, off_s, off_m,
                     stride_xt, stride_xk, stride_hp,
                     BITS: tl.constexpr, PACK: tl.constexpr, GROUP: tl.constexpr, GPI: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     MAGIC_BITS: tl.constexpr, MAGIC_BIAS: tl.constexpr, ASM: tl.constexpr, IEEE: tl.constexpr):
    # N = I (output columns of gate and of up), K = D (reduction); w13 codes [2I, D / PACK], gate rows first
    GB: tl.constexpr = GROUP // PACK
    pid = tl.program_id(0)
    pid_m = pid % num_blocks  # neighbouring programs share a weight tile
    pid_n = pid // num_blocks
    slot = tl.load(slot_ids_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < tl.load(block_rows_ptr + pid_m)
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs_m, mask=row_ok, other=0).to(tl.int64)  # [BM]
    token = pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = offs_n % N  # wrapped: weight loads stay in bounds unmasked, the store is masked
    offs_r = tl.arange(0, GB)
    base = slot * slot_bytes
    row_bytes = K // PACK
    q_ptrs = pool_ptr + base + off_q + offs_wn[None, :] * row_bytes + offs_r[:, None]  # [GB, BN] gate codes, group 0
    up_off = N * row_bytes  # up rows follow the gate rows
    s_ptrs = pool16_ptr + (base + off_s) // 2 + offs_wn  # [BN] gate scales of group 0
    m_ptrs = pool16_ptr + (base + off_m) // 2 + offs_wn
    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_r[None, :] * stride_xk  # [BM, GB] group 0, plane 0
    ones = tl.full((GB, BLOCK_N), 1.0, dtype=x_ptr.dtype.element_ty)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // (GROUP * GPI)):
        for gi in tl.static_range(GPI):
            bg = tl.load(q_ptrs + gi * GB)  # [GB, BN] uint8
            bu = tl.load(q_ptrs + gi * GB + up_off)
            tg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            tu = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            pg = _planes(bg, x_ptr.dtype.element_ty, BITS, MAGIC_BITS, ASM)  # PACK x [GB, BN]
            pu = _planes(bu, x_ptr.dtype.element_ty, BITS, MAGIC_BITS, ASM)
            for j in tl.static_range(PACK):
                a = tl.load(a_ptrs + (gi * GROUP + j * GB) * stride_xk, mask=row_ok[:, None], other=0.0)  # [BM, GB]
                if IEEE:
                    tg = tl.dot(a, pg[j], tg, input_precision="ieee")
                    tu = tl.dot(a, pu[j], tu, input_precision="ieee")
                else:
                    tg = tl.dot(a, pg[j], tg)
                    tu = tl.dot(a, pu[j], tu)
                xs = _group_sums(a, ones, xs, IEEE)
            sg = tl.load(s_ptrs + gi * 2 * N).to(tl.float32)
            su = tl.load(s_ptrs + gi * 2 * N + N).to(tl.float32)
            mg = tl.load(m_ptrs + gi * 2 * N).to(tl.float32) - MAGIC_BIAS * sg
            mu = tl.load(m_ptrs + gi * 2 * N + N).to(tl.float32) - MAGIC_BIAS * su
            acc_g += tg * sg[None, :] + xs * mg[None, :]
            acc_u += tu * su[None, :] + xs * mu[None, :]
        q_ptrs += GPI * GB
        s_ptrs += GPI * 2 * N
        m_ptrs += GPI * 2 * N
        a_ptrs += GPI * GROUP * stride_xk
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, fp32
    h_ptrs = h_ptr + pair[:, None] * stride_hp + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["num_blocks", "iters_per_split"])  # counts that vary per step: see moe_align.py
def _qdown_kernel(h_ptr, pool_ptr, pool16_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, slot_ids_ptr, block_rows_ptr,
                  N, K, out_div, num_blocks, iters_per_split, slot_bytes, off_q, off_s, off_m,
                  stride_hp, stride_out,
                  BITS: tl.constexpr, PACK: tl.constexpr, GROUP: tl.constexpr, GPI: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  MAGIC_BITS: tl.constexpr, MAGIC_BIAS: tl.constexpr, ASM: tl.constexpr, ATOMIC: tl.constexpr,
                  IEEE: tl.constexpr):
    # N = D (output columns), K = I (reduction); w2 codes [D, I / PACK]; program_id(1) picks a range of groups
    GB: tl.constexpr = GROUP // PACK
    pid = tl.program_id(0)
    pid_m = pid % num_blocks
    pid_n = pid // num_blocks
    slot = tl.load(slot_ids_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < tl.load(block_rows_ptr + pid_m)
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs_m, mask=row_ok, other=0).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = offs_n % N
    offs_r = tl.arange(0, GB)
    it0 = tl.program_id(1) * iters_per_split  # first iteration (of GPI groups) of this split
    it1 = tl.minimum(it0 + iters_per_split, K // (GROUP * GPI))
    g0 = it0 * GPI  # first group
    base = slot * slot_bytes
    q_ptrs = pool_ptr + base + off_q + offs_wn[None, :] * (K // PACK) + (g0 * GB + offs_r)[:, None]  # [GB, BN]
    s_ptrs = pool16_ptr + (base + off_s) // 2 + g0 * N + offs_wn  # [BN]
    m_ptrs = pool16_ptr + (base + off_m) // 2 + g0 * N + offs_wn
    a_ptrs = h_ptr + pair[:, None] * stride_hp + g0 * GROUP + offs_r[None, :]  # [BM, GB] plane 0
    ones = tl.full((GB, BLOCK_N), 1.0, dtype=h_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(it0, it1):
        for gi in tl.static_range(GPI):
            b = tl.load(q_ptrs + gi * GB)  # [GB, BN] uint8
            t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            pw = _planes(b, h_ptr.dtype.element_ty, BITS, MAGIC_BITS, ASM)  # PACK x [GB, BN]
            for j in tl.static_range(PACK):
                a = tl.load(a_ptrs + gi * GROUP + j * GB, mask=row_ok[:, None], other=0.0)  # [BM, GB]
                if IEEE:
                    t = tl.dot(a, pw[j], t, input_precision="ieee")
                else:
                    t = tl.dot(a, pw[j], t)
                xs = _group_sums(a, ones, xs, IEEE)
            s = tl.load(s_ptrs + gi * N).to(tl.float32)
            m = tl.load(m_ptrs + gi * N).to(tl.float32) - MAGIC_BIAS * s
            acc += t * s[None, :] + xs * m[None, :]
        q_ptrs += GPI * GB
        s_ptrs += GPI * N
        m_ptrs += GPI * N
        a_ptrs += GPI * GROUP
    acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + (pair // out_div)[:, None] * stride_out + offs_n[None, :]
    mask = row_ok[:, None] & (offs_n[None, :] < N)
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc, mask=mask)


def min_group_size(bits: int) -> int:
    """tl.dot needs a reduction of >= 16: each bit-plane of a group spans group_size / (8 / bits) columns."""
    return 16 * (8 // bits)


def get_config(num_pairs: int, num_slots: int, hidden: int, inter: int, bits: int, group_size: int,
               num_sms: int = 132) -> dict:
    """Block sizes from shapes alone (never from routing data); rows = expected pairs per used slot."""
    rows = num_pairs / min(num_pairs, num_slots)
    bm = 16 if rows <= 16 else 32 if rows <= 48 else 64
    active = min(num_pairs, num_slots)
    active_blocks = min(max_blocks(num_pairs, num_slots, bm), active * triton.cdiv(int(rows), bm))
    # gate_up: 64-column tiles unless that leaves SMs idle (small I, e.g. Qwen3's 768 at batch 1)
    gu_bn = 64 if active_blocks * triton.cdiv(inter, 64) >= num_sms else 32
    dn_bn = 64
    # down: split the groups of I until ~2 programs per SM stream codes, keeping >= 4 groups per split
    tiles = active_blocks * triton.cdiv(hidden, dn_bn)
    groups = inter // group_size
    split = 1
    while tiles * split < 2 * num_sms and groups // (2 * split) >= 4 and split < 16:
        split *= 2
    return {
        "BLOCK_M": bm,
        "gate_up": dict(BLOCK_N=gu_bn, GPI=1, num_warps=4, num_stages=3),
        "down": dict(BLOCK_N=dn_bn, GPI=1, num_warps=4, num_stages=3, SPLIT=split),
        "MAGIC": True,  # codes to bf16/fp16 by OR-ing into a mantissa (no int-to-float conversion)
        # ... in inline PTX, two codes per instruction (int4, int2; bf16/fp16): 25% fewer instructions per weight
        # (SASS), bit logic simulated on the CPU, off until tests/gpu/test_quant_kernels.py has run it on a GPU
        "ASM": False,
    }


def _magic(dtype: torch.dtype, bits: int, enabled: bool) -> tuple[int, float]:
    """(bits OR-ed into a code, value of the empty pattern) to read a code as a 16-bit float, or (0, 0.0)."""
    if not enabled:
        return 0, 0.0
    if dtype == torch.bfloat16 and bits <= 4:  # 0x4300 = 128.0, mantissa step 1 up to 255
        return 0x4300, 128.0
    if dtype == torch.float16:  # 0x6400 = 1024.0, mantissa step 1 up to 2047
        return 0x6400, 1024.0
    return 0, 0.0


def fused_moe_quantized_triton(x: torch.Tensor, pool: torch.Tensor, layout: ExpertLayout, slot_ids: torch.Tensor,
                               topk_w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """`fused_moe_quantized` for CUDA tensors (inputs already checked; CPU tensors run under TRITON_INTERPRET=1).
    `config` overrides `get_config` (benchmarks)."""
    t, d = x.shape
    k = slot_ids.shape[1]
    s, i = pool.shape[0], layout.inter
    bits, g = layout.bits, layout.group_size
    if g < min_group_size(bits):
        raise ValueError(f"the Triton kernel needs group_size >= {min_group_size(bits)} at {bits} bits, "
                         f"the layout has {g}")
    p = t * k
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
    cfg = config or get_config(p, s, d, i, bits, g, sms)
    bm, gu, dn = cfg["BLOCK_M"], dict(cfg["gate_up"]), dict(cfg["down"])
    ieee = x.dtype == torch.float32  # exact fp32 dots (no tf32) for fp32 inputs
    magic_bits, magic_bias = _magic(x.dtype, bits, cfg.get("MAGIC", True))
    asm = bool(cfg.get("ASM", False)) and magic_bits != 0 and bits in (4, 2) and x.is_cuda  # no PTX when interpreted
    common = dict(BITS=bits, PACK=8 // bits, GROUP=g, MAGIC_BITS=magic_bits, MAGIC_BIAS=magic_bias, ASM=asm, IEEE=ieee)
    pool16 = pool.view(torch.float16)  # the same bytes, for the scales and minima
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        out = torch.empty(t, d, dtype=torch.float32, device=x.device)  # [T, D] summed over K by atomics
        sorted_ids, block_slots, block_rows = moe_align(slot_ids.contiguous(), s, bm, zero=out)  # [M], [M/BM] x2
        n_blocks = block_slots.shape[0]

        h = torch.empty(p, i, dtype=x.dtype, device=x.device)  # [P, I]
        grid = (n_blocks * triton.cdiv(i, gu["BLOCK_N"]),)
        _qgate_up_kernel[grid](
            x, pool, pool16, h, sorted_ids, block_slots, block_rows, i, d, k, n_blocks, pool.stride(0),
            layout.w13_packed, layout.w13_scale, layout.w13_minimum, x.stride(0), x.stride(1), h.stride(0),
            BLOCK_M=bm, **common, **gu)

        if d % (g * gu["GPI"]):
            raise ValueError(f"gate_up GPI={gu['GPI']} must divide the {d // g} groups of D")
        split, gpi = dn.pop("SPLIT"), dn["GPI"]
        iters = i // (g * gpi)
        if iters * g * gpi != i:
            raise ValueError(f"down GPI={gpi} must divide the {i // g} groups of I")
        per_split = triton.cdiv(iters, split)
        grid = (n_blocks * triton.cdiv(d, dn["BLOCK_N"]), triton.cdiv(iters, per_split))
        _qdown_kernel[grid](
            h, pool, pool16, out, topk_w.contiguous(), sorted_ids, block_slots, block_rows, d, i, k, n_blocks,
            per_split, pool.stride(0), layout.w2_packed, layout.w2_scale, layout.w2_minimum,
            h.stride(0), out.stride(0), BLOCK_M=bm, ATOMIC=True, **common, **dn)
        return out.to(x.dtype)

