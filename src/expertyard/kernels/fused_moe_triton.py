"""Triton grouped GEMMs of the fused MoE (vLLM fused_moe style), used by `fused_moe` for CUDA tensors.

  moe_align    pairs sorted by expert, segments padded to BLOCK_M                  (kernels/moe_align.py)
  _gate_up     h[p] = silu(x[t] @ w13[e,:I].T) * (x[t] @ w13[e,I:].T)              [P, I]  (SiLU-and-mul fused)
  _down        y[t] += topk_w[p] * h[p] @ w2[e].T  (fp32 atomics, split-K allowed) [T, D]
               (ATOMIC=False: out[p] = topk_w[p] * h[p] @ w2[e].T, summed over K after  [P, D] -> [T, D];
               measured no faster on an H200 at Mixtral/Qwen3 shapes with T=2048, so off by default)
Each program owns one (BLOCK_M rows of one expert) x (BLOCK_N output columns) tile and streams that
expert's weight tile once. No host sync: every buffer is sized from shapes, so the call can be captured
in a CUDA graph. Block sizes come from a small table keyed by expected rows per active expert, not from
autotuning; a call compiles its kernels on first use, so warm up once per shape before graph capture.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from expertyard.kernels.moe_align import max_blocks, moe_align

# T = tokens, K = top-k, P = T*K pairs, E = experts, D = hidden, I = expert intermediate,
# M = padded sorted rows (num_blocks * BLOCK_M), BM/BN/BK = block sizes


@triton.jit(do_not_specialize=["num_blocks"])  # counts that vary per step: see moe_align.py
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ids_ptr, expert_ids_ptr, block_rows_ptr,
                    N, K, top_k, num_blocks,
                    stride_xt, stride_xk, stride_we, stride_wn, stride_wk, stride_hp,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    # N = I (output columns), K = D (reduction)
    pid = tl.program_id(0)
    pid_m = pid % num_blocks  # neighbouring programs share a weight tile (L2 reuse across M-blocks)
    pid_n = pid // num_blocks
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < tl.load(block_rows_ptr + pid_m)
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs_m, mask=row_ok, other=0).to(tl.int64)  # [BM]
    token = pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = offs_n % N  # wrapped: weight loads stay in bounds unmasked, the store is masked
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xk  # [BM, BK]
    g_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_wn[None, :] * stride_wn  # [BK, BN]
    u_ptrs = g_ptrs + N * stride_wn  # up_proj rows follow the gate_proj rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        if IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, fp32
    h_ptrs = h_ptr + pair[:, None] * stride_hp + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["num_blocks", "k_iters"])  # counts that vary per step: see moe_align.py
def _down_kernel(h_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, block_rows_ptr,
                 N, K, out_div, num_blocks, k_iters,
                 stride_hp, stride_we, stride_wn, stride_wk, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr):
    # N = D (output columns), K = I (reduction); program_id(1) picks a K-split of k_iters * BLOCK_K
    pid = tl.program_id(0)
    pid_m = pid % num_blocks
    pid_n = pid // num_blocks
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < tl.load(block_rows_ptr + pid_m)
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs_m, mask=row_ok, other=0).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = offs_n % N
    k0 = tl.program_id(1) * k_iters * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + pair[:, None] * stride_hp + offs_k[None, :]  # [BM, BK]
    b_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_wn[None, :] * stride_wn  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_iters):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    acc = acc * tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + (pair // out_div)[:, None] * stride_out + offs_n[None, :]
    mask = row_ok[:, None] & (offs_n[None, :] < N)
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc, mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def get_config(num_pairs: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
               num_sms: int = 132) -> dict:
    """Block sizes from shapes alone (never from routing data). rows = expected pairs per active expert:
    <= 16 is decode (memory-bound: small BM, narrow N-tiles and split-K so that enough programs stream
    weights at once), larger is prefill (compute-bound: tensor-core sized tiles)."""
    rows = num_pairs / min(num_pairs, num_experts)
    # BM, gate_up (BN, BK, warps, stages), down (BN, BK, warps, stages)
    if rows <= 16:
        bm, gu, dn = 16, (32, 128, 4, 4), (64, 128, 4, 4)
    elif rows <= 48:
        bm, gu, dn = 32, (64, 128, 4, 3), (64, 128, 4, 4)
    elif rows <= 128:
        bm, gu, dn = 64, (128, 64, 4, 4), (128, 64, 4, 4)
    else:  # best or within 2% of the best of six configs at 256-2,048 rows per expert (bench_moe_paths.py)
        bm, gu, dn = 128, (128, 64, 8, 4), (256, 64, 8, 4)
    if dtype == torch.float32:  # twice the bytes per tile: halve BK to stay inside shared memory
        gu = (min(gu[0], 64), gu[1] // 2, gu[2], min(gu[3], 3))
        dn = (dn[0], dn[1] // 2, dn[2], min(dn[3], 3))
    # split the down projection's reduction until ~2 programs per SM stream weights (decode; the largest bucket
    # was measured without: its tiles are tensor-core bound, not short of programs)
    active = min(num_pairs, num_experts)
    active_blocks = min(max_blocks(num_pairs, num_experts, bm), active * triton.cdiv(int(rows), bm))
    tiles = active_blocks * triton.cdiv(hidden, dn[0])
    k_blocks = triton.cdiv(inter, dn[1])
    split = 1
    while bm < 128 and tiles * split < 2 * num_sms and k_blocks // (2 * split) >= 4 and split < 16:
        split *= 2
    return {
        "BLOCK_M": bm,
        "gate_up": dict(BLOCK_N=gu[0], BLOCK_K=gu[1], num_warps=gu[2], num_stages=gu[3]),
        "down": dict(BLOCK_N=dn[0], BLOCK_K=dn[1], num_warps=dn[2], num_stages=dn[3],
                     SPLIT_K=split, ATOMIC=True),
    }


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                     topk_w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """`fused_moe` for CUDA tensors (inputs already checked). `config` overrides `get_config` (benchmarks)."""
    t, d = x.shape
    k = topk_ids.shape[1]
    e, i = w13.shape[0], w13.shape[1] // 2
    p = t * k
    with torch.cuda.device(x.device):
        cfg = config or get_config(p, e, d, i, x.dtype, _num_sms(x.device.index or 0))
        bm, gu, dn = cfg["BLOCK_M"], cfg["gate_up"], dict(cfg["down"])
        ieee = x.dtype == torch.float32  # exact fp32 dots (no tf32) for fp32 inputs
        split, bk = dn.pop("SPLIT_K"), dn["BLOCK_K"]
        atomic = dn.pop("ATOMIC") or split > 1
        if atomic:
            out = torch.empty(t, d, dtype=torch.float32, device=x.device)  # [T, D] summed over K by atomics
        else:
            out = torch.empty(p, d, dtype=torch.float32, device=x.device)  # [P, D] one row per pair
        sorted_ids, expert_ids, block_rows = moe_align(  # [M], [M/BM], [M/BM]; zeroes `out` for the atomics
            topk_ids.contiguous(), e, bm, zero=out if atomic else None)
        n_blocks = expert_ids.shape[0]

        h = torch.empty(p, i, dtype=x.dtype, device=x.device)  # [P, I]
        grid = (n_blocks * triton.cdiv(i, gu["BLOCK_N"]),)
        _gate_up_kernel[grid](
            x, w13, h, sorted_ids, expert_ids, block_rows, i, d, k, n_blocks,
            x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
            BLOCK_M=bm, BLOCK_N=gu["BLOCK_N"], BLOCK_K=gu["BLOCK_K"], EVEN_K=d % gu["BLOCK_K"] == 0, IEEE=ieee,
            num_warps=gu["num_warps"], num_stages=gu["num_stages"])

        k_iters = triton.cdiv(triton.cdiv(i, bk), split)
        grid = (n_blocks * triton.cdiv(d, dn["BLOCK_N"]), split)
        _down_kernel[grid](
            h, w2, out, topk_w.contiguous(), sorted_ids, expert_ids, block_rows, d, i, k if atomic else 1,
            n_blocks, k_iters, h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
            BLOCK_M=bm, EVEN_K=k_iters * bk * split == i, ATOMIC=atomic, IEEE=ieee, **dn)
        if not atomic:
            out = out.view(t, k, d).sum(dim=1)  # [T, D]
        return out.to(x.dtype)
