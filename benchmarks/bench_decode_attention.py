"""Decode attention on CUDA: the old path (gather the first Lmax cache positions, SDPA with a boolean mask and
enable_gqa, as layers/attention.py did before the Triton kernel, on the same shape-free backends) against the
Triton kernel (kernels/decode_attention.py), Qwen3-30B-A3B attention shape (H=32, G=4, head dim 128), bf16.

Every sequence of a batch sits at the given context length; Lmax is the engine's CUDA-graph length bucket
(256, 512, 1024, ...) holding it. Each call reads another copy of the cache ("layer"), at least four times
the L2 cache's size in all, as a decode step's layers do; calls run back to back from one CUDA graph, and CUDA
events around its replays give the time per call. KV GB/s counts the K and V bytes the kernel must read.

    PYTHONPATH=src python benchmarks/bench_decode_attention.py [--out decode_attention.json]
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton
from torch.nn.attention import sdpa_kernel

from expertyard.kernels.decode_attention import decode_attention
from expertyard.layers.attention import _SHAPE_FREE_BACKENDS, _decode_sdpa  # the SDPA path _attend keeps
from expertyard.layers.attention_metadata import AttentionMetadata

# B = sequences, H = query heads, G = KV heads, D = head dim, L = cache length

H, G, D = 32, 4, 128
POINTS = [(1, 4096), (32, 1024), (128, 96), (256, 512)]  # (batch, context)
MAX_LAYERS = 48  # Qwen3-30B-A3B's layer count


def length_bucket(context: int) -> int:
    lmax = 256
    while lmax < context:
        lmax *= 2
    return lmax


def time_per_call_us(calls: list, replays: int = 20) -> float:
    """Capture `calls` back to back in one graph (after a warm-up: Triton compiles there); time replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def bench_point(batch: int, context: int, cache_len: int, dtype: torch.dtype) -> dict:
    kv_bytes = batch * context * G * 2 * D * dtype.itemsize  # K and V the kernel must read
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    layers = min(MAX_LAYERS, max(2, triton.cdiv(4 * l2, kv_bytes)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    caches = [(torch.randn(batch, cache_len, G, D, generator=gen, device="cuda").to(dtype),  # [S=B, L, G, D]
               torch.randn(batch, cache_len, G, D, generator=gen, device="cuda").to(dtype)) for _ in range(layers)]
    q = torch.randn(batch, H, D, generator=gen, device="cuda").to(dtype)  # [B, H, D]
    slots = torch.randperm(batch, generator=gen, device="cuda")  # [B]
    lens = torch.full((batch,), context, device="cuda")  # [B]
    lmax = length_bucket(context)
    meta = AttentionMetadata(token_slots=slots, positions=lens - 1, prefills=[], num_prefill_tokens=0,
                             decode_slots=slots, decode_context_lens=lens, decode_max_len=lmax)
    outs = {name: torch.empty(layers, batch, H, D, dtype=dtype, device="cuda") for name in ("sdpa", "kernel")}

    def sdpa(i):
        with sdpa_kernel(_SHAPE_FREE_BACKENDS):
            _decode_sdpa(q, *caches[i], meta, D**-0.5, None, outs["sdpa"][i])

    def kernel(i):
        decode_attention(q, *caches[i], slots, lens, D**-0.5, None, out=outs["kernel"][i])

    calls = max(layers, 16)
    sdpa_us = time_per_call_us([lambda i=i: sdpa(i % layers) for i in range(calls)])
    kernel_us = time_per_call_us([lambda i=i: kernel(i % layers) for i in range(calls)])
    diff = (outs["sdpa"].float() - outs["kernel"].float()).abs().max().item()
    return dict(batch=batch, context=context, lmax=lmax, cache_len=cache_len, layers=layers, sdpa_us=sdpa_us,
                kernel_us=kernel_us, speedup=sdpa_us / kernel_us, kernel_kv_gbps=kv_bytes / kernel_us / 1e3,
                max_abs_diff=diff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-len", type=int, default=4096, help="L of the cache (the engine's max_model_len)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    dtype = torch.bfloat16
    rows = []
    print(f"{'B':>4} {'ctx':>5} {'Lmax':>5} {'SDPA us':>9} {'kernel us':>10} {'x':>6} {'KV GB/s':>8} {'max|diff|':>9}")
    for batch, context in POINTS:
        r = bench_point(batch, context, max(args.cache_len, context), dtype)
        rows.append(r)
        print(f"{batch:>4} {context:>5} {r['lmax']:>5} {r['sdpa_us']:>9.1f} {r['kernel_us']:>10.1f} "
              f"{r['speedup']:>6.2f} {r['kernel_kv_gbps']:>8.0f} {r['max_abs_diff']:>9.1e}")
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    date=datetime.date.today().isoformat(), shape=dict(H=H, G=G, D=D), dtype=str(dtype))
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
