"""Group (token, expert) pairs by expert in fixed-size buffers, with no host sync (CUDA-graph capturable).

Each expert's pairs get a segment of `sorted_ids` padded up to a multiple of BLOCK_M, so each BLOCK_M-row
block of the grouped GEMMs belongs to one expert. Buffer sizes depend only on (P, E, BLOCK_M): at most
min(P, E) experts are non-empty and each pads by < BLOCK_M rows, so the rows fit in P + min(P, E)*(BLOCK_M-1).
Blocks past the real end get expert id -1 (the GEMMs return at once).
Decode-sized batches take one launch, which also zeroes the caller's output accumulator: _align_small_kernel
when P x E is small, _align_pairs_kernel when P is small but E is large (an offloaded pool's thousands of slots
at batch 1: it works in [P, P], each expert stood for by its first pair; EXPERTYARD_MOE_ALIGN_PAIRS=1). Larger batches take three (plus a
memset):
  1. _count_kernel   (grid over pairs): counts[e] += 1 with atomics; the returned old count is the pair's rank.
  2. _offsets_kernel (one program):     padded prefix sums -> seg_start[E], and per block its expert and rows.
  3. _scatter_kernel (grid over pairs): sorted_ids[seg_start[e] + rank] = pair index.
Ranks from atomics make the order of pairs inside a segment vary between runs; nothing depends on it.

Integer arguments that change from step to step (pair, block and zeroing counts, here and in the GEMM kernels)
are `do_not_specialize`: Triton otherwise compiles one variant per pattern of "== 1" and "divisible by 16"
among them, and under serving a step meeting a new pattern stalled every running stream for 0.7-1.8 s. They
are loop bounds and masks, so the hints bought nothing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# P = T*K (token, expert) pairs, E = experts, M = padded rows = num_blocks * BLOCK_M

_PAIRS_PER_PROGRAM = 1024
_SMALL_ONEHOT = 16384  # P x E one-hot elements up to which one program aligns (decode: P = T*K small)
_SMALL_ZERO = 65536  # elements one program zeroes (256 KB of fp32) before a memset launch is cheaper


@triton.jit(do_not_specialize=["num_pairs"])  # counts that vary per step: see moe_align.py
def _count_kernel(ids_ptr, counts_ptr, rank_ptr, num_pairs, num_experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
    ok = (offs < num_pairs) & (e >= 0) & (e < num_experts)  # ids outside [0, E) are dropped
    rank = tl.atomic_add(counts_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=ok, sem="relaxed")
    tl.store(rank_ptr + offs, rank, mask=ok)


@triton.jit
def _write_blocks(counts, starts, ends, offs_e, e_ok, expert_ids_ptr, block_rows_ptr, num_blocks,
                  BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    for b0 in range(0, num_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        row0 = offs_b * BLOCK_M  # [BLOCK_B] first row of each block
        # exactly one non-empty expert's segment holds row0, or none (a block past the end)
        hit = (starts[None, :] <= row0[:, None]) & (row0[:, None] < ends[None, :]) & e_ok[None, :]  # [BLOCK_B, BLOCK_E]
        hit_i = hit.to(tl.int32)
        found = tl.sum(hit_i, axis=1)
        expert = tl.sum(hit_i * offs_e[None, :], axis=1)
        seg_row0 = tl.sum(hit_i * starts[None, :], axis=1)
        count = tl.sum(hit_i * counts[None, :], axis=1)
        rows = tl.minimum(tl.maximum(count - (row0 - seg_row0), 0), BLOCK_M)
        b_ok = offs_b < num_blocks
        tl.store(expert_ids_ptr + offs_b, tl.where(found > 0, expert, -1), mask=b_ok)
        tl.store(block_rows_ptr + offs_b, tl.where(found > 0, rows, 0), mask=b_ok)


@triton.jit(do_not_specialize=["num_blocks"])  # counts that vary per step: see moe_align.py
def _offsets_kernel(counts_ptr, seg_start_ptr, expert_ids_ptr, block_rows_ptr, num_experts, num_blocks,
                    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < num_experts
    counts = tl.load(counts_ptr + offs_e, mask=e_ok, other=0)  # [BLOCK_E]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(seg_start_ptr + offs_e, starts, mask=e_ok)
    _write_blocks(counts, starts, ends, offs_e, e_ok, expert_ids_ptr, block_rows_ptr, num_blocks, BLOCK_M, BLOCK_B)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks", "zero_numel"])  # counts that vary per step: see moe_align.py
def _align_small_kernel(ids_ptr, sorted_ids_ptr, expert_ids_ptr, block_rows_ptr, zero_ptr,
                        num_pairs, num_experts, num_blocks, zero_numel,
                        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_Z: tl.constexpr):
    # all of moe_align in one program: counts and ranks from a [P, E] one-hot in registers, no atomics
    offs_p = tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < num_experts
    e = tl.load(ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1).to(tl.int32)  # [BLOCK_P]
    onehot = ((e[:, None] == offs_e[None, :]) & e_ok[None, :]).to(tl.int32)  # [BLOCK_P, BLOCK_E]; bad ids: 0 row
    counts = tl.sum(onehot, axis=0)  # [BLOCK_E]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # [BLOCK_P] earlier pairs of the same expert
    dest = tl.sum(onehot * starts[None, :], axis=1) + rank
    tl.store(sorted_ids_ptr + dest, offs_p, mask=tl.sum(onehot, axis=1) > 0)
    _write_blocks(counts, starts, ends, offs_e, e_ok, expert_ids_ptr, block_rows_ptr, num_blocks, BLOCK_M, BLOCK_B)
    for z0 in range(0, zero_numel, BLOCK_Z):  # the caller's fp32 accumulator, saving a memset launch
        offs_z = z0 + tl.arange(0, BLOCK_Z)
        tl.store(zero_ptr + offs_z, tl.zeros([BLOCK_Z], dtype=zero_ptr.dtype.element_ty), mask=offs_z < zero_numel)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks", "zero_numel"])  # counts that vary per step: see moe_align.py
def _align_pairs_kernel(ids_ptr, sorted_ids_ptr, expert_ids_ptr, block_rows_ptr, zero_ptr,
                        num_pairs, num_experts, num_blocks, zero_numel,
                        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_Z: tl.constexpr):
    # _align_small_kernel's output from [P, P] comparisons (i: a pair, j: another), whatever E is
    offs_p = tl.arange(0, BLOCK_P)
    e = tl.load(ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1).to(tl.int32)  # [BLOCK_P]
    ok = (offs_p < num_pairs) & (e >= 0) & (e < num_experts)  # ids outside [0, E) are dropped
    same = (e[:, None] == e[None, :]) & ok[:, None] & ok[None, :]  # [BLOCK_P, BLOCK_P]
    rank = tl.sum((same & (offs_p[None, :] < offs_p[:, None])).to(tl.int32), axis=1)  # earlier pairs, same expert
    count = tl.sum(same.to(tl.int32), axis=1)  # [BLOCK_P] pairs of the pair's expert
    first = ok & (rank == 0)  # the pair that stands for its expert
    padded = tl.where(first, (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    below = (e[None, :] < e[:, None]) & first[None, :]  # [BLOCK_P, BLOCK_P]: j stands for a smaller expert
    start = tl.sum(tl.where(below, padded[None, :], 0), axis=1)  # [BLOCK_P] the expert's first padded row
    tl.store(sorted_ids_ptr + start + rank, offs_p, mask=ok)
    _write_blocks(count, start, start + padded, e, first, expert_ids_ptr, block_rows_ptr, num_blocks, BLOCK_M,
                  BLOCK_B)
    for z0 in range(0, zero_numel, BLOCK_Z):  # the caller's fp32 accumulator, saving a memset launch
        offs_z = z0 + tl.arange(0, BLOCK_Z)
        tl.store(zero_ptr + offs_z, tl.zeros([BLOCK_Z], dtype=zero_ptr.dtype.element_ty), mask=offs_z < zero_numel)


@triton.jit(do_not_specialize=["num_pairs"])  # counts that vary per step: see moe_align.py
def _scatter_kernel(ids_ptr, rank_ptr, seg_start_ptr, sorted_ids_ptr, num_pairs, num_experts,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
    ok = (offs < num_pairs) & (e >= 0) & (e < num_experts)
    dest = tl.load(seg_start_ptr + e, mask=ok, other=0) + tl.load(rank_ptr + offs, mask=ok, other=0)
    tl.store(sorted_ids_ptr + dest, offs, mask=ok)


def pairs_path_on() -> bool:
    """EXPERTYARD_MOE_ALIGN_PAIRS=1 takes `_align_pairs_kernel` for few pairs over many experts (else the three
    kernels); off by default until it has been run compiled on a GPU (it is checked under the interpreter)."""
    return os.environ.get("EXPERTYARD_MOE_ALIGN_PAIRS", "0") == "1"


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the number of BLOCK_M-row blocks after padding."""
    rows = min(num_pairs * block_m, num_pairs + min(num_pairs, num_experts) * (block_m - 1))
    return triton.cdiv(rows, block_m)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, zero: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] (int32/int64, CUDA) -> (sorted_ids [M] int32, expert_ids [M/BLOCK_M] int32,
    block_rows [M/BLOCK_M] int32). sorted_ids holds flat pair indices t*K+k; within block b only the first
    block_rows[b] entries are meaningful (the rest is padding, never written). expert_ids[b] = -1 past the end.
    `zero`, if given (contiguous), is zeroed on the way."""
    ids = topk_ids.reshape(-1)  # [P]
    num_pairs = ids.numel()
    n_blocks = max_blocks(num_pairs, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=dev)  # [M]
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=dev)  # [M/BLOCK_M]
    block_rows = torch.empty(n_blocks, dtype=torch.int32, device=dev)  # [M/BLOCK_M]
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_b = max(16, 8192 // block_e)
    block_p = max(16, triton.next_power_of_2(num_pairs))
    zero_numel = 0 if zero is None else zero.numel()
    if block_p * block_e <= _SMALL_ONEHOT and zero_numel <= _SMALL_ZERO:
        _align_small_kernel[(1,)](ids, sorted_ids, expert_ids, block_rows, zero if zero is not None else sorted_ids,
                                  num_pairs, num_experts, n_blocks, zero_numel, BLOCK_M=block_m, BLOCK_P=block_p,
                                  BLOCK_E=block_e, BLOCK_B=block_b, BLOCK_Z=1024, num_warps=8)
        return sorted_ids, expert_ids, block_rows
    if block_p * block_p <= _SMALL_ONEHOT and zero_numel <= _SMALL_ZERO and pairs_path_on():
        _align_pairs_kernel[(1,)](ids, sorted_ids, expert_ids, block_rows, zero if zero is not None else sorted_ids,
                                  num_pairs, num_experts, n_blocks, zero_numel, BLOCK_M=block_m, BLOCK_P=block_p,
                                  BLOCK_B=max(16, 8192 // block_p), BLOCK_Z=1024, num_warps=8)
        return sorted_ids, expert_ids, block_rows

    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)  # [E]
    rank = torch.empty(num_pairs, dtype=torch.int32, device=dev)  # [P]
    seg_start = torch.empty(num_experts, dtype=torch.int32, device=dev)  # [E]
    grid = (triton.cdiv(num_pairs, _PAIRS_PER_PROGRAM),)
    _count_kernel[grid](ids, counts, rank, num_pairs, num_experts, BLOCK=_PAIRS_PER_PROGRAM)
    _offsets_kernel[(1,)](counts, seg_start, expert_ids, block_rows, num_experts, n_blocks,
                          BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_B=block_b, num_warps=8)
    _scatter_kernel[grid](ids, rank, seg_start, sorted_ids, num_pairs, num_experts, BLOCK=_PAIRS_PER_PROGRAM)
    if zero is not None:
        zero.zero_()
    return sorted_ids, expert_ids, block_rows
