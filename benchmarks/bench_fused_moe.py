"""Benchmark the Triton fused_moe on CUDA in bf16 at real MoE expert shapes.

For each model shape and token count T: median time per call of a CUDA-graph replay (how decode runs) and
of an eager call, the bandwidth of the distinct experts' weights the routing touched (GB/s, the figure to
hold against the device-to-device copy bandwidth measured here), TFLOP/s, and a naive per-expert torch
loop for comparison. Prints a table and writes JSON to --out.

    PYTHONPATH=src python benchmarks/bench_fused_moe.py --out fused_moe.json [--ablate]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json

import torch
import torch.nn.functional as F
import triton
import triton.testing

from expertyard.kernels.fused_moe import fused_moe
from expertyard.kernels.fused_moe_triton import fused_moe_triton, get_config

# T = tokens, K = top-k, P = T*K pairs, E = experts, D = hidden, I = expert intermediate

SHAPES = {
    "mixtral-8x7b": dict(d=4096, i=14336, e=8, k=2),
    "qwen3-30b-a3b": dict(d=2048, i=768, e=128, k=8),
}
TOKENS = [1, 4, 32, 256, 2048]


def naive_moe(x, w13, w2, ids, topk_w):
    """Per-expert loop, as HF modeling code does: host syncs to find each expert's tokens, bf16 matmuls."""
    k, i = ids.shape[1], w2.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
    flat, flat_w = ids.reshape(-1), topk_w.reshape(-1)  # [P]
    for e in flat.unique().tolist():
        pair = (flat == e).nonzero().squeeze(1)  # [n]
        tok = pair // k
        gate_up = x[tok] @ w13[e].T  # [n, 2I]
        h = F.silu(gate_up[:, :i]) * gate_up[:, i:]  # [n, I]
        y.index_add_(0, tok, (h @ w2[e].T).float() * flat_w[pair, None])
    return y.to(x.dtype)


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # flushes L2 between calls


def graph_ms(fn) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: Triton compiles here, never during capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e6  # bytes read + written


def make_case(shape, t, seed=0):
    d, i, e, k = shape["d"], shape["i"], shape["e"], shape["k"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, d, generator=g, device="cuda", dtype=torch.bfloat16)  # [T, D]
    ids = torch.rand(t, e, generator=g, device="cuda").argsort(dim=1)[:, :k]  # [T, K]
    topk_w = torch.rand(t, k, generator=g, device="cuda").softmax(dim=-1)  # [T, K]
    return x, ids, topk_w


def weights(shape):
    d, i, e = shape["d"], shape["i"], shape["e"]
    w13 = torch.randn(e, 2 * i, d, device="cuda", dtype=torch.bfloat16) * d**-0.5  # [E, 2I, D]
    w2 = torch.randn(e, d, i, device="cuda", dtype=torch.bfloat16) * i**-0.5  # [E, D, I]
    return w13, w2


def ablations(cfg: dict):
    """Config variants around the heuristic's pick, to check the table (printed, not used by fused_moe)."""
    def var(name, **changes):
        c = copy.deepcopy(cfg)
        for key, val in changes.items():
            part, field = key.split("__")
            c[part][field] = val
        return name, c
    gu, dn = cfg["gate_up"], cfg["down"]
    yield "default", cfg
    if cfg["BLOCK_M"] <= 32:  # decode: how many programs stream weights
        yield var(f"gate_up BN {gu['BLOCK_N'] * 2}", gate_up__BLOCK_N=gu["BLOCK_N"] * 2)
        yield var(f"gate_up BN {gu['BLOCK_N'] // 2}", gate_up__BLOCK_N=gu["BLOCK_N"] // 2)
        yield var(f"down split {dn['SPLIT_K'] * 2}", down__SPLIT_K=dn["SPLIT_K"] * 2)
        if dn["SPLIT_K"] > 1:
            yield var(f"down split {dn['SPLIT_K'] // 2}", down__SPLIT_K=dn["SPLIT_K"] // 2)
        yield var(f"down BN {dn['BLOCK_N'] // 2}", down__BLOCK_N=dn["BLOCK_N"] // 2)
    else:  # prefill: tile shapes
        yield var(f"gate_up BN {gu['BLOCK_N'] // 2}", gate_up__BLOCK_N=gu["BLOCK_N"] // 2)
        yield var(f"gate_up stages {gu['num_stages'] + 1}", gate_up__num_stages=gu["num_stages"] + 1)
        yield var(f"down BN {dn['BLOCK_N'] * 2}", down__BLOCK_N=dn["BLOCK_N"] * 2)
        yield var(f"down stages {dn['num_stages'] + 1}", down__num_stages=dn["num_stages"] + 1)
        yield var("down store" if dn["ATOMIC"] else "down atomic", down__ATOMIC=not dn["ATOMIC"], down__SPLIT_K=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fused_moe_bench.json")
    ap.add_argument("--models", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="*", type=int, default=TOKENS)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--ablate", nargs="*", type=int, default=[], help="token counts to sweep configs at")
    args = ap.parse_args()

    props = torch.cuda.get_device_properties(0)
    peak = copy_gbps()
    result = {"device": props.name, "sms": props.multi_processor_count, "date": str(datetime.date.today()),
              "torch": torch.__version__, "triton": triton.__version__, "copy_gbps": peak, "rows": [], "ablation": []}
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}; "
          f"device-to-device copy {peak:.0f} GB/s (read + write)", flush=True)
    header = (f"{'model':14} {'T':>5} {'experts':>7} {'weights MB':>10} {'graph us':>9} {'eager us':>9} {'GB/s':>7} "
              f"{'% copy':>6} {'TFLOP/s':>7} {'naive us':>9} {'speedup':>7} {'err':>7}")
    print(header, flush=True)
    for name in args.models:
        shape = SHAPES[name]
        w13, w2 = weights(shape)
        expert_bytes = 3 * shape["d"] * shape["i"] * w13.element_size()
        for t in args.tokens:
            x, ids, topk_w = make_case(shape, t)
            n_exp = ids.unique().numel()
            nbytes = n_exp * expert_bytes  # each touched expert's weights read once
            flops = 6 * t * shape["k"] * shape["d"] * shape["i"]
            y = fused_moe(x, w13, w2, ids, topk_w)
            y_naive = naive_moe(x, w13, w2, ids, topk_w)
            err = ((y.float() - y_naive.float()).norm() / y_naive.float().norm()).item()  # sanity, both bf16
            g_ms = graph_ms(lambda: fused_moe(x, w13, w2, ids, topk_w))
            e_ms = bench_ms(lambda: fused_moe(x, w13, w2, ids, topk_w))
            n_ms = float("nan") if args.no_naive else bench_ms(lambda: naive_moe(x, w13, w2, ids, topk_w))
            row = dict(model=name, tokens=t, experts_touched=n_exp, weight_mb=nbytes / 1e6, graph_us=g_ms * 1e3,
                       eager_us=e_ms * 1e3, rel_err_vs_naive=err, gbps=nbytes / g_ms / 1e6,
                       tflops=flops / g_ms / 1e9, naive_us=n_ms * 1e3,
                       config=get_config(t * shape["k"], shape["e"], shape["d"], shape["i"], torch.bfloat16,
                                         props.multi_processor_count))
            row["pct_copy"] = 100 * row["gbps"] / peak
            result["rows"].append(row)
            print(f"{name:14} {t:5d} {n_exp:7d} {row['weight_mb']:10.1f} {row['graph_us']:9.1f} {row['eager_us']:9.1f} "
                  f"{row['gbps']:7.0f} {row['pct_copy']:6.1f} {row['tflops']:7.1f} {row['naive_us']:9.1f} "
                  f"{n_ms / g_ms:7.2f} {err:7.1e}", flush=True)
            if t in args.ablate:
                for label, cfg in ablations(row["config"]):
                    try:
                        ms = graph_ms(lambda: fused_moe_triton(x, w13, w2, ids, topk_w, config=cfg))
                    except Exception as err:  # e.g. out of shared memory for a variant
                        print(f"    ablation {label}: failed ({type(err).__name__}: {str(err)[:80]})", flush=True)
                        continue
                    result["ablation"].append(dict(model=name, tokens=t, variant=label, us=ms * 1e3, config=cfg))
                    print(f"    ablation {label:22} {ms * 1e3:9.1f} us  {nbytes / ms / 1e6:7.0f} GB/s", flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        del w13, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
