"""Benchmark the Triton low-precision expert FFN (quant/triton_ffn.py) against the bf16 fused_moe, at real shapes.

For each model shape, precision and token count T: median time of a CUDA-graph replay of `fused_moe_quantized`
over a pool holding every expert of one layer in that precision, the bytes of the packed experts the routing
touched (codes + float16 scales and minima), the GB/s that makes, that as a % of a 1 GiB device-to-device copy
measured in the same run (bytes read + written), and the bf16 `fused_moe` on the same weights and routing.

    PYTHONPATH=src python3 benchmarks/bench_quant_kernels.py --out quant_kernels.json [--ablate 1 32]
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/bench_quant_kernels.py --device cpu --models tiny  # dry run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time

import torch

from expertyard.kernels.fused_moe import fused_moe
from expertyard.quant import ExpertLayout, fused_moe_quantized_torch, new_pool, pack_expert
from expertyard.quant.triton_ffn import fused_moe_quantized_triton, get_config

# T = tokens, K = top-k, E = experts (= pool slots), D = hidden, I = expert intermediate

SHAPES = {
    "mixtral-8x7b": dict(d=4096, i=14336, e=8, k=2),
    "qwen3-30b-a3b": dict(d=2048, i=768, e=128, k=8),
    "tiny": dict(d=256, i=128, e=8, k=2),  # CPU dry run of this script
}


class Timer:
    """Median ms per call: CUDA graphs and do_bench (L2 flushed between calls) on CUDA, a host clock elsewhere."""

    def __init__(self, device: torch.device, rep_ms: int):
        self.cuda, self.rep = device.type == "cuda", rep_ms

    def eager(self, fn) -> float:
        if self.cuda:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10, rep=self.rep, return_mode="median")
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def graph(self, fn) -> float:
        if not self.cuda:
            return self.eager(fn)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles here, never during capture
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self.eager(graph.replay)


def copy_gbps(device: torch.device, timer: Timer) -> float:
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer.eager(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / ms / 1e6  # bytes read + written


def make_case(shape, t, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, shape["d"], generator=g, device=device).to(dtype)  # [T, D]
    ids = torch.rand(t, shape["e"], generator=g, device=device).argsort(dim=1)[:, :shape["k"]]  # [T, K] distinct
    topk_w = torch.rand(t, shape["k"], generator=g, device=device).softmax(dim=-1)  # [T, K]
    return x, ids, topk_w


def ablations(cfg: dict, hidden: int, group: int):
    """Config variants around get_config's pick (printed and saved, not used by fused_moe_quantized)."""
    def var(name, **changes):
        c = copy.deepcopy(cfg)
        for key, val in changes.items():
            part, field = key.split("__") if "__" in key else (None, key)
            (c[part] if part else c)[field] = val
        return name, c
    gu, dn = cfg["gate_up"], cfg["down"]
    yield "default", cfg
    for bn in (32, 64, 128):
        if bn != gu["BLOCK_N"]:
            yield var(f"gate_up BN {bn}", gate_up__BLOCK_N=bn)
    yield var("gate_up warps 2", gate_up__num_warps=2)
    if (hidden // group) % 2 == 0:
        yield var("gate_up GPI 2", gate_up__GPI=2)
    yield var("down BN 128", down__BLOCK_N=128)
    yield var("down warps 2", down__num_warps=2)
    yield var(f"down split {dn['SPLIT'] * 2}", down__SPLIT=dn["SPLIT"] * 2)
    yield var("stages 4", gate_up__num_stages=4, down__num_stages=4)
    yield var("inline PTX" if not cfg.get("ASM") else "no inline PTX", ASM=not cfg.get("ASM"))
    yield var("no magic (int-to-float convert)", ASM=False, MAGIC=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="quant_kernels_bench.json")
    ap.add_argument("--models", nargs="*", default=["mixtral-8x7b", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="*", type=int, default=[1, 4, 32])
    ap.add_argument("--bits", nargs="*", type=int, default=[4, 2])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--ablate", nargs="*", type=int, default=[], help="token counts to sweep configs at")
    ap.add_argument("--ablate-bits", nargs="*", type=int, default=[4], help="precisions to sweep configs at")
    ap.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per measurement")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="activations and weights")
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    timer = Timer(device, args.rep_ms)
    peak = copy_gbps(device, timer)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter dry run)"
    import triton

    result = {"device": name, "date": str(datetime.date.today()), "torch": torch.__version__,
              "triton": triton.__version__, "copy_gbps": peak, "group_size": args.group_size, "dtype": args.dtype,
              "rows": [],
              "ablation": []}
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}; device-to-device copy {peak:.0f} GB/s "
          f"(read + write); group size {args.group_size}; {args.dtype} activations", flush=True)
    print(f"{'model':14} {'prec':>5} {'T':>3} {'experts':>7} {'MB read':>8} {'graph us':>9} {'eager us':>9} "
          f"{'GB/s':>6} {'% copy':>6} {'vs bf16':>7} {'err':>8}", flush=True)
    for model in args.models:
        shape = SHAPES[model]
        d, i, e = shape["d"], shape["i"], shape["e"]
        g = torch.Generator(device=device).manual_seed(0)
        w13 = (torch.randn(e, 2 * i, d, generator=g, device=device) * d**-0.5).to(dtype)  # [E, 2I, D]
        w2 = (torch.randn(e, d, i, generator=g, device=device) * i**-0.5).to(dtype)  # [E, D, I]
        bf16_us = {}  # the full-precision fused_moe at each T
        base_label = "bf16" if dtype == torch.bfloat16 else "fp16"
        for t in args.tokens:
            x, ids, topk_w = make_case(shape, t, device, dtype)
            n_exp = ids.unique().numel()
            ms = timer.graph(lambda: fused_moe(x, w13, w2, ids, topk_w))
            nbytes = n_exp * 3 * d * i * 2
            bf16_us[t] = ms * 1e3
            row = dict(model=model, precision=base_label, tokens=t, experts_touched=n_exp, mb_read=nbytes / 1e6,
                       graph_us=ms * 1e3, eager_us=float("nan"), gbps=nbytes / ms / 1e6)
            row["pct_copy"] = 100 * row["gbps"] / peak
            result["rows"].append(row)
            print(f"{model:14} {base_label:>5} {t:3d} {n_exp:7d} {row['mb_read']:8.1f} {row['graph_us']:9.1f} {'':>9} "
                  f"{row['gbps']:6.0f} {row['pct_copy']:6.1f} {1.0:7.2f} {'':>8}", flush=True)
        for bits in args.bits:
            layout = ExpertLayout.build(d, i, bits, args.group_size)
            pool = new_pool(e, layout, device)  # [E, nbytes]: every expert of one layer in this precision
            for x_ in range(e):
                pack_expert(w13[x_, :i].float(), w13[x_, i:].float(), w2[x_].float(), bits, args.group_size,
                            out=pool[x_])
            for t in args.tokens:
                x, ids, topk_w = make_case(shape, t, device, dtype)
                n_exp = ids.unique().numel()
                nbytes = n_exp * layout.nbytes  # each touched slot's codes, scales and minima read once
                y = fused_moe_quantized_triton(x, pool, layout, ids, topk_w)
                ref = fused_moe_quantized_torch(x.float(), pool, layout, ids, topk_w)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                g_ms = timer.graph(lambda: fused_moe_quantized_triton(x, pool, layout, ids, topk_w))
                e_ms = timer.eager(lambda: fused_moe_quantized_triton(x, pool, layout, ids, topk_w))
                cfg = get_config(t * shape["k"], e, d, i, bits, args.group_size,
                                 torch.cuda.get_device_properties(device).multi_processor_count
                                 if device.type == "cuda" else 132)
                row = dict(model=model, precision=f"int{bits}", tokens=t, experts_touched=n_exp, mb_read=nbytes / 1e6,
                           graph_us=g_ms * 1e3, eager_us=e_ms * 1e3, gbps=nbytes / g_ms / 1e6, rel_err=err,
                           speedup_vs_bf16=bf16_us[t] / (g_ms * 1e3) if t in bf16_us else float("nan"), config=cfg,
                           bytes_per_expert=layout.nbytes)
                row["pct_copy"] = 100 * row["gbps"] / peak
                result["rows"].append(row)
                print(f"{model:14} {'int' + str(bits):>5} {t:3d} {n_exp:7d} {row['mb_read']:8.1f} "
                      f"{row['graph_us']:9.1f} "
                      f"{row['eager_us']:9.1f} {row['gbps']:6.0f} {row['pct_copy']:6.1f} {row['speedup_vs_bf16']:7.2f} "
                      f"{err:8.1e}", flush=True)
                if bits in args.ablate_bits and t in args.ablate:
                    for label, c in ablations(cfg, d, args.group_size):
                        try:
                            yv = fused_moe_quantized_triton(x, pool, layout, ids, topk_w, config=c)
                            v_err = ((yv.float() - ref).norm() / ref.norm()).item()
                            ms = timer.graph(lambda: fused_moe_quantized_triton(x, pool, layout, ids, topk_w, config=c))
                        except Exception as ex:  # e.g. out of registers or shared memory for a variant
                            print(f"    ablation {label}: failed ({type(ex).__name__}: {str(ex)[:80]})", flush=True)
                            continue
                        result["ablation"].append(dict(model=model, precision=f"int{bits}", tokens=t, variant=label,
                                                       us=ms * 1e3, gbps=nbytes / ms / 1e6, rel_err=v_err, config=c))
                        print(f"    ablation {label:32} {ms * 1e3:9.1f} us {nbytes / ms / 1e6:7.0f} GB/s  "
                              f"err {v_err:.1e}",
                              flush=True)
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            del pool
        del w13, w2
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
