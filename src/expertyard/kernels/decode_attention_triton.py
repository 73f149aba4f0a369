"""Triton decode attention over the slot-indexed KV cache, used by `decode_attention` for CUDA tensors.

  _decode_kernel  grid (B, G * head blocks, splits): one program per (sequence, KV head[, slice of the keys])
                  computes every query head of the group at once ([BH, Dk] @ [Dk, BN] tiles), streaming that
                  sequence's keys and values in place with an online softmax in float32.
  _reduce_kernel  grid (B, H, Dv / 128), only with splits > 1: merges the splits' (max, sum, unnormalised
                  output) into the result.
Each program reads its sequence's slot and context length from device memory and loops up to that length (a
runtime bound), so one compiled kernel serves every step, and a CUDA graph's replays may see any lengths.
Block sizes and the number of splits depend only on shapes known at capture time, never on the lengths.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

# B = sequences, H = query heads, G = KV heads, Dk/Dv = key/value head dims, S = cache slots, L = cache length,
# P = splits of each sequence's keys; BH = query-head rows per program, BN = keys per block,
# BDK (+ BDT) = key dims in the main (+ tail) block, BDV = value dims

_MIN_KEYS_PER_SPLIT = 64  # a split streams at least this much of the cache's capacity (one block)
_MAX_SPLITS = 64
# _reduce_kernel's tile of splits: 8 or 64, not fitted to each count, so a process compiles two variants at most
# (a 64-row tile for 2 splits cost 2-4 us more per call at B=32 on an H200)
_FEW_SPLITS = 8
_REDUCE_DV = 128  # value dims per _reduce_kernel program
_STAGE_BYTES = 32 * 1024  # one key block's K and V tiles (the software pipeline holds two)
_ACC_ELEMS = 64 * 128  # float32 accumulator elements per program (BH x BDV) kept in registers


@triton.jit(do_not_specialize=["num_splits"],  # changes with the batch bucket: see moe_align.py
            # slices of the step's tensors, whose offsets (the prefill tokens before them) change every step
            do_not_specialize_on_alignment=["q_ptr", "out_ptr", "slots_ptr", "lens_ptr"])
def _decode_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, lens_ptr, out_ptr, part_acc_ptr, part_stats_ptr,
                   scale_log2, window, num_heads, num_splits,
                   stride_qb, stride_qh, stride_ks, stride_kl, stride_kg, stride_vs, stride_vl, stride_vg,
                   stride_ob, stride_oh,
                   GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DT: tl.constexpr,
                   BLOCK_DV: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1) // HEAD_BLOCKS
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    length = tl.load(lens_ptr + b).to(tl.int32)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(length - window, 0)
    chunk = tl.cdiv(tl.cdiv(length - first, num_splits), BLOCK_N) * BLOCK_N  # keys per split, whole blocks
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, length)  # lo >= hi: an empty split (short sequence), stores m=-inf, l=0

    offs_h = (tl.program_id(1) % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH] rows within the group
    row_ok = offs_h < GROUP  # padding rows (tl.dot needs >= 16) read zeros and are never stored
    head = g * GROUP + offs_h  # [BH] query heads
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV

    q_rows = q_ptr + b * stride_qb + head[:, None] * stride_qh  # [BH, 1]
    q = tl.load(q_rows + offs_dk[None, :], mask=row_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)  # [BH, BDK]
    k_base = k_ptr + slot * stride_ks + g * stride_kg
    v_base = v_ptr + slot * stride_vs + g * stride_vg
    if BLOCK_DT > 0:  # Dk not a power of two (MLA: 576 = 512 + 64): a second, masked block of key dims
        offs_dt = BLOCK_DK + tl.arange(0, BLOCK_DT)
        q_tail = tl.load(q_rows + offs_dt[None, :], mask=row_ok[:, None] & (offs_dt[None, :] < DK),
                         other=0.0)  # [BH, BDT]

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)  # running sum of exp2(score - m_i) * v
    for n0 in range(lo, hi, BLOCK_N):  # each block holds >= 1 visible key, so m_i is finite after the first
        pos = n0 + offs_n  # [BN] key positions
        key_ok = pos < hi
        k_ptrs = k_base + pos[None, :] * stride_kl  # [1, BN]
        k = tl.load(k_ptrs + offs_dk[:, None], mask=key_ok[None, :] & (offs_dk[:, None] < DK), other=0.0)  # [BDK, BN]
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee")  # [BH, BN]
        else:
            qk = tl.dot(q, k)
        if BLOCK_DT > 0:
            kt = tl.load(k_ptrs + offs_dt[:, None], mask=key_ok[None, :] & (offs_dt[:, None] < DK), other=0.0)
            if IEEE:
                qk = tl.dot(q_tail, kt, qk, input_precision="ieee")
            else:
                qk = tl.dot(q_tail, kt, qk)
        qk = tl.where(key_ok[None, :], qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # [BH]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])  # [BH, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + pos[:, None] * stride_vl + offs_dv[None, :], mask=key_ok[:, None] & dv_ok[None, :],
                    other=0.0)  # [BN, BDV]
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")  # [BH, BDV]
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    if SPLIT:
        part = (b * num_heads + head) * num_splits + split  # [BH] rows of the [B, H, P] partials
        tl.store(part_acc_ptr + part[:, None] * DV + offs_dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(part_stats_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_stats_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + offs_dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"], do_not_specialize_on_alignment=["out_ptr"])
def _reduce_kernel(part_acc_ptr, part_stats_ptr, out_ptr, num_heads, num_splits, stride_ob, stride_oh,
                   DV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DV: tl.constexpr):
    # one program per (sequence, query head, BLOCK_DV value dims); BLOCK_P >= num_splits
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_dv = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    p_ok = offs_p < num_splits
    dv_ok = offs_dv < DV
    part = (b * num_heads + h) * num_splits + offs_p  # [BP]
    m = tl.load(part_stats_ptr + part * 2, mask=p_ok, other=float("-inf"))  # [BP]
    l = tl.load(part_stats_ptr + part * 2 + 1, mask=p_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * DV + offs_dv[None, :], mask=p_ok[:, None] & dv_ok[None, :],
                  other=0.0)  # [BP, BDV]
    m_max = tl.max(m, axis=0)  # finite: split 0 is never empty
    w = tl.exp2(m - m_max)  # [BP]; 0 for empty splits (m = -inf)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)  # [BDV]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_dv, out.to(out_ptr.dtype.element_ty), mask=dv_ok)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # CPU tensors: the Triton interpreter (tests); an H100's / H200's count
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def block_config(group: int, dk: int, dv: int, elem_size: int) -> dict:
    """Tile sizes from head shapes and the element size alone."""
    block_dk = max(16, _prev_pow2(dk))  # tl.dot needs >= 16 along every dimension
    tail = dk - block_dk
    block_dt = max(16, triton.next_power_of_2(tail)) if tail > 0 else 0
    block_dv = max(16, triton.next_power_of_2(dv))
    block_h = max(16, triton.next_power_of_2(group))
    while block_h > 16 and block_h * block_dv > _ACC_ELEMS:  # large groups (DeepSeek's 128 heads): head blocks
        block_h //= 2
    row_bytes = (block_dk + block_dt + block_dv) * elem_size  # one key's K and V
    block_n = min(64, max(16, _prev_pow2(max(1, _STAGE_BYTES // row_bytes))))
    return dict(BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DT=block_dt, BLOCK_DV=block_dv,
                num_warps=4 if block_h * block_dv < _ACC_ELEMS else 8,
                num_stages=2 if block_n * row_bytes <= 2 * _STAGE_BYTES else 1)


def num_splits(batch: int, programs_per_seq: int, cache_len: int, num_sms: int) -> int:
    """Splits of each sequence's keys (split-K): doubled while the grid is smaller than one program per SM
    and each split still covers >= _MIN_KEYS_PER_SPLIT of the cache's capacity. Shapes only (batch bucket,
    cache length), so a captured graph keeps its grid whatever the lengths are at replay."""
    splits = 1
    while (batch * programs_per_seq * splits < num_sms and cache_len // (2 * splits) >= _MIN_KEYS_PER_SPLIT
           and splits < _MAX_SPLITS):
        splits *= 2
    return splits


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                            context_lens: torch.Tensor, scale: float, window: int | None, out: torch.Tensor,
                            splits: int | None = None) -> torch.Tensor:
    """`decode_attention` for inputs already checked; writes `out` [B, H, Dv]. `splits` overrides the
    heuristic (tests)."""
    b, h, dk = q.shape
    g, dv = k_cache.shape[2], v_cache.shape[3]
    group = h // g
    cfg = block_config(group, dk, dv, q.element_size())
    head_blocks = triton.cdiv(group, cfg["BLOCK_H"])
    if splits is None:
        splits = num_splits(b, g * head_blocks, k_cache.shape[1], _num_sms(q.device))
    assert 1 <= splits <= _MAX_SPLITS, splits
    if splits > 1:
        part_acc = torch.empty(b, h, splits, dv, dtype=torch.float32, device=q.device)  # [B, H, P, Dv]
        part_stats = torch.empty(b, h, splits, 2, dtype=torch.float32, device=q.device)  # [B, H, P, (m, l)]
    else:
        part_acc = part_stats = out  # unused
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _decode_kernel[(b, g * head_blocks, splits)](
            q, k_cache, v_cache, slots, context_lens, out, part_acc, part_stats,
            scale * 1.4426950408889634, window or 0, h, splits,  # scores in log2 units: exp2, not exp
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
            GROUP=group, HEAD_BLOCKS=head_blocks, DK=dk, DV=dv, HAS_WINDOW=window is not None, SPLIT=splits > 1,
            IEEE=q.dtype == torch.float32, **cfg)
        if splits > 1:
            reduce_dv = min(cfg["BLOCK_DV"], _REDUCE_DV)
            _reduce_kernel[(b, h, triton.cdiv(dv, reduce_dv))](
                part_acc, part_stats, out, h, splits, out.stride(0), out.stride(1),
                DV=dv, BLOCK_P=_FEW_SPLITS if splits <= _FEW_SPLITS else _MAX_SPLITS, BLOCK_DV=reduce_dv)
    return out
