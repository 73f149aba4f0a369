"""The expert FFN on CUDA at the shapes decode meets on one GPU, on an expert rank and on a colocated rank (each
rank sees only its local experts: pairs routed elsewhere are -1): the Triton fused kernels with `get_config`'s block
sizes and a few alternatives, against torch's grouped GEMMs (`torch.nn.functional.grouped_mm`, CUTLASS on Hopper,
over rows sorted by expert: `grouped_gemm_moe` below), the vendor path a user would otherwise reach for.

For each case: CUDA-graph replay time per path (median, L2 flushed), TFLOP/s of the fastest over the kept
(token, expert) pairs, relative error of each path against a float32 per-expert loop. JSON to --out.

    PYTHONPATH=src python benchmarks/bench_moe_paths.py --out moe_paths.json [--cases NAME ...] [--no-sweep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from bench_fused_moe import SHAPES, graph_ms, weights  # noqa: E402

from expertyard.kernels.fused_moe import fused_moe_torch  # noqa: E402
from expertyard.kernels.fused_moe_triton import fused_moe_triton, get_config  # noqa: E402

# T = rows handed to the expert FFN, K = top-k, E = local experts, D = hidden, I = expert intermediate

# name: (model, rows T, local experts of the model's E (a rank's share), where the rows come from)
CASES = {
    "mixtral-gpu-256": ("mixtral-8x7b", 256, 8, "one GPU, 256 tokens"),
    "mixtral-gpu-1024": ("mixtral-8x7b", 1024, 8, "one GPU, 1,024 tokens"),
    "mixtral-gpu-2048": ("mixtral-8x7b", 2048, 8, "one GPU, 2,048 tokens (prefill chunk)"),
    "mixtral-2x2-m2": ("mixtral-8x7b", 1024, 4, "expert rank of 2+2, batch 2,048, m=2 (2 sources x 512)"),
    "mixtral-2x2-m1": ("mixtral-8x7b", 2048, 4, "expert rank of 2+2, batch 2,048, m=1 (2 sources x 1,024)"),
    "mixtral-1x3-m2": ("mixtral-8x7b", 1024, 3, "busiest expert rank of 1+3, batch 2,048, m=2"),
    "mixtral-coloc-4": ("mixtral-8x7b", 2048, 2, "colocated rank of 4, batch 2,048 (4 sources x 512)"),
    "qwen3-gpu-256": ("qwen3-30b-a3b", 256, 128, "one GPU, 256 tokens"),
    "qwen3-gpu-2048": ("qwen3-30b-a3b", 2048, 128, "one GPU, 2,048 tokens"),
    "qwen3-2x2-b256": ("qwen3-30b-a3b", 256, 64, "expert rank of 2+2, batch 256, m=1"),
    "qwen3-2x2-b2048": ("qwen3-30b-a3b", 2048, 64, "expert rank of 2+2, batch 2,048, m=1"),
}

# Triton block sizes tried besides the default: BLOCK_M, gate_up (BN, BK, warps, stages), down (BN, BK, warps, stages)
SWEEP = [  # the first five are the first sweep; the rest aim at ~256 rows per expert (BLOCK_M padding)
    (128, (128, 64, 8, 4), (128, 64, 8, 4)),
    (128, (128, 64, 8, 4), (256, 64, 8, 4)),
    (64, (128, 64, 4, 4), (128, 64, 4, 4)),
    (64, (128, 64, 8, 4), (256, 64, 8, 3)),
    (128, (64, 64, 4, 4), (128, 64, 4, 4)),
    (64, (256, 64, 8, 3), (256, 64, 8, 3)),
    (64, (256, 64, 8, 3), (256, 64, 8, 4)),
    (64, (128, 128, 4, 3), (256, 64, 4, 4)),
    (128, (128, 64, 8, 3), (256, 64, 8, 3)),
    (128, (256, 32, 8, 4), (256, 64, 8, 4)),
]


def grouped_gemm_moe(x, w13, w2, topk_ids, topk_w):
    """fused_moe's contract through torch's grouped GEMMs; ids outside [0, E) dropped. No host sync."""
    t, k = topk_ids.shape
    e, i = w13.shape[0], w13.shape[1] // 2
    p = t * k
    ids = topk_ids.reshape(-1).long()  # [P]
    key = torch.where((ids >= 0) & (ids < e), ids, e)  # [P] dropped pairs sort after every expert
    order = torch.argsort(key, stable=True)  # [P]
    counts = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, key, torch.ones(p, dtype=torch.int32, device=x.device))  # [E + 1] (bincount syncs)
    offs = counts[:e].cumsum(0, dtype=torch.int32)  # [E] end row of each expert's group
    token = order // k  # [P]
    h13 = F.grouped_mm(x.index_select(0, token), w13.transpose(1, 2), offs=offs)  # [P, 2I]
    h = F.silu(h13[:, :i]) * h13[:, i:]  # [P, I]
    y = F.grouped_mm(h, w2.transpose(1, 2), offs=offs).float()  # [P, D]; rows past offs[-1] undefined
    kept = torch.arange(p, device=x.device) < offs[-1]  # [P]
    weight = torch.where(kept, topk_w.reshape(-1)[order].float(), 0.0)  # [P]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)  # [T, D]
    out.index_add_(0, token, torch.where(kept[:, None], y * weight[:, None], 0.0))
    return out.to(x.dtype)


def sweep_config(bm, gu, dn):
    return {"BLOCK_M": bm,
            "gate_up": dict(BLOCK_N=gu[0], BLOCK_K=gu[1], num_warps=gu[2], num_stages=gu[3]),
            "down": dict(BLOCK_N=dn[0], BLOCK_K=dn[1], num_warps=dn[2], num_stages=dn[3], SPLIT_K=1, ATOMIC=True)}


def local_routing(t, e_model, e_local, k, seed):
    """Routing of T tokens over the model's experts, seen by a rank holding experts [0, e_local): ids -> -1."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.rand(t, e_model, generator=g, device="cuda").argsort(dim=1)[:, :k]  # [T, K]
    ids = torch.where(ids < e_local, ids, -1)
    topk_w = torch.rand(t, k, generator=g, device="cuda").softmax(dim=-1)  # [T, K]
    return ids, topk_w


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moe_paths.json")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--no-sweep", action="store_true", help="skip the Triton block-size alternatives")
    ap.add_argument("--sweep-from", type=int, default=0, help="skip the first N entries of SWEEP")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "date": str(datetime.date.today()), "torch": torch.__version__,
              "triton": triton.__version__, "rows": []}
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print(f"{'case':18} {'pairs':>6} {'triton us':>9} {'best sweep us':>13} {'grouped us':>10} {'x triton':>8} "
          f"{'TFLOP/s':>7} {'err tri':>8} {'err grp':>8}", flush=True)
    loaded = None
    for name in args.cases:
        model, t, e_local, what = CASES[name]
        shape = SHAPES[model]
        if loaded != model:
            w13_all, w2_all = weights(shape)
            loaded = model
        w13, w2 = w13_all[:e_local], w2_all[:e_local]
        x = torch.randn(t, shape["d"], device="cuda", dtype=torch.bfloat16)  # [T, D]
        ids, topk_w = local_routing(t, shape["e"], e_local, shape["k"], seed=t + e_local)
        kept = int((ids >= 0).sum())
        flops = 6 * kept * shape["d"] * shape["i"]
        ref = fused_moe_torch(x.float(), w13.float(), w2.float(), ids.clamp(min=0),
                              torch.where(ids >= 0, topk_w, 0.0))  # float32 per-expert loop
        y_tri = fused_moe_triton(x, w13, w2, ids, topk_w)
        y_grp = grouped_gemm_moe(x, w13, w2, ids, topk_w)
        tri_ms = graph_ms(lambda: fused_moe_triton(x, w13, w2, ids, topk_w))
        grp_ms = graph_ms(lambda: grouped_gemm_moe(x, w13, w2, ids, topk_w))
        sweep = []
        if not args.no_sweep and kept / e_local >= 64:
            for bm, gu, dn in SWEEP[args.sweep_from:]:
                cfg = sweep_config(bm, gu, dn)
                try:
                    ms = graph_ms(lambda: fused_moe_triton(x, w13, w2, ids, topk_w, config=cfg))
                except Exception as err:  # e.g. out of shared memory
                    print(f"    sweep {bm} {gu} {dn}: failed ({type(err).__name__})", flush=True)
                    continue
                sweep.append(dict(config=cfg, us=ms * 1e3))
        best = min(sweep, key=lambda s: s["us"]) if sweep else None
        fastest = min([tri_ms, grp_ms] + ([best["us"] / 1e3] if best else []))
        row = dict(case=name, what=what, model=model, rows=t, local_experts=e_local, kept_pairs=kept,
                   triton_us=tri_ms * 1e3, grouped_us=grp_ms * 1e3, sweep=sweep,
                   default_config=get_config(t * shape["k"], e_local, shape["d"], shape["i"], torch.bfloat16,
                                             props.multi_processor_count),
                   tflops_best=flops / fastest / 1e9, err_triton=rel_err(y_tri, ref), err_grouped=rel_err(y_grp, ref))
        result["rows"].append(row)
        print(f"{name:18} {kept:6d} {row['triton_us']:9.1f} {best['us'] if best else float('nan'):13.1f} "
              f"{row['grouped_us']:10.1f} {tri_ms / grp_ms:8.2f} {row['tflops_best']:7.1f} "
              f"{row['err_triton']:8.1e} {row['err_grouped']:8.1e}", flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        del ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
