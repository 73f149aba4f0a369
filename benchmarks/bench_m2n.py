"""M2N micro-benchmark: latency (p50, p99) and throughput of expertyard's dispatch and combine against a plain
`all_to_all_single` moving the same bytes per rank pair.

    python benchmarks/bench_m2n.py --attention-ranks 2 --expert-ranks 2 --device cuda --out m2n.json
    python benchmarks/bench_m2n.py --attention-ranks 1 --expert-ranks 1 --device cpu --sizes 4KB,64KB   (gloo)

Starts its own ranks through torchrun's launcher. Sizes are bytes per (source, destination) buffer: rows of a
`--hidden`-wide activation (+ routing metadata), i.e. tokens per micro-batch. dispatch = pack on the attention
ranks + M x N P2P + unpack on the expert ranks; combine = N x M P2P + the weighted sum on the attention ranks;
all_to_all = `all_to_all_single` over all M + N ranks with the same per-pair bytes (the colocated exchange).
pack and p2p split the dispatch: the packing alone, and the M x N P2P of buffers packed beforehand.
A timing is the slowest rank's, from a barrier to the end of its part (device synchronised): p50/p99 of single
calls, and `loop us`, the cost per call of `--inner` back-to-back calls (what a layer loop pays; it also
amortises the barrier's skew between ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from expertyard.disagg.config import DisaggConfig  # noqa: E402
from expertyard.disagg.m2n import RowLayout, combine, pack_dispatch, unpack_dispatch  # noqa: E402
from expertyard.disagg.placement import ExpertPlacement  # noqa: E402
from expertyard.disagg.transport import Exchanger  # noqa: E402

UNITS = {"KB": 2**10, "MB": 2**20}


def parse_size(s: str) -> int:
    for u, f in UNITS.items():
        if s.upper().endswith(u):
            return int(float(s[:-2]) * f)
    return int(s)


def _timed(fn, device, ctrl, iters: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + iters):
        dist.barrier(group=ctrl)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=ctrl)
        if i >= warmup:
            out.append(float(dt))
    return out


def worker(cfg: DisaggConfig, device_type: str, sizes: list[int], hidden: int, top_k: int, num_experts: int,
           iters: int, warmup: int, inner: int) -> list[dict] | None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" else torch.device("cpu")
    from expertyard.disagg.groups import init_distributed

    groups = init_distributed(cfg, rank, world, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout = RowLayout(hidden, top_k, dtype)
    attn, experts = cfg.attention_rank_ids, cfg.expert_rank_ids
    placement = ExpertPlacement.balanced([0], num_experts, len(experts))
    tables = placement.tables(0, device)
    disp, comb = Exchanger(groups.dispatch, device, "dispatch"), Exchanger(groups.combine, device, "combine")
    a2a = dist.new_group(list(range(world)), backend="nccl" if device.type == "cuda" else "gloo")
    rows_out = []
    for size in sizes:
        c = max(1, size // (layout.width * layout.elt) - 1)  # tokens per micro-batch: buffer = (C + 1) rows
        g = torch.Generator(device).manual_seed(rank)
        x = torch.randn(c, hidden, device=device, dtype=dtype, generator=g)
        ids = torch.randint(0, num_experts, (c, top_k), device=device, generator=g)
        w = torch.rand(c, top_k, device=device, generator=g)
        state = {}

        def dispatch():
            if rank in attn:
                buf, state["route"] = pack_dispatch(layout, x, ids, w, *tables, len(experts), c)
                chunks = buf.view(len(experts), c + 1, -1)
                disp.p2p([(r, chunks[j]) for j, r in enumerate(experts)], []).wait()
            if rank in experts:
                recv = torch.empty(len(attn) * (c + 1), layout.width, dtype=dtype, device=device)
                chunks = recv.view(len(attn), c + 1, -1)
                disp.p2p([], [(r, chunks[j]) for j, r in enumerate(attn)]).wait()
                state["got"] = unpack_dispatch(layout, recv, len(attn), c)

        def combine_back():
            if rank in experts:
                y = state["got"].x.view(len(attn), c, hidden)
                comb.p2p([(r, y[j]) for j, r in enumerate(attn)], []).wait()
            if rank in attn:
                answers = torch.empty(len(experts) * c, hidden, dtype=dtype, device=device)
                comb.p2p([], [(r, answers[j * c:(j + 1) * c]) for j, r in enumerate(experts)]).wait()
                combine(state["route"], answers, dtype)

        packed, _ = pack_dispatch(layout, x, ids, w, *tables, len(experts), c)  # [N * (C+1), W]
        landing = torch.empty(len(attn) * (c + 1), layout.width, dtype=dtype, device=device)

        def pack_only():  # the attention ranks' packing alone (no transfer)
            if rank in attn:
                pack_dispatch(layout, x, ids, w, *tables, len(experts), c)

        def p2p_only():  # the dispatch's transfer alone, from a buffer packed beforehand
            if rank in attn:
                chunks = packed.view(len(experts), c + 1, -1)
                disp.p2p([(r, chunks[j]) for j, r in enumerate(experts)], []).wait()
            if rank in experts:
                chunks = landing.view(len(attn), c + 1, -1)
                disp.p2p([], [(r, chunks[j]) for j, r in enumerate(attn)]).wait()

        send = torch.randn(world * (c + 1), layout.width, device=device).to(dtype)
        recv_all = torch.empty_like(send)

        def all_to_all():
            dist.all_to_all_single(recv_all, send, group=a2a)

        pair_bytes = (c + 1) * layout.width * layout.elt
        for name, fn, pairs in (("dispatch", dispatch, len(attn) * len(experts)),
                                ("combine", combine_back, len(attn) * len(experts)),
                                ("pack", pack_only, len(attn) * len(experts)),
                                ("p2p", p2p_only, len(attn) * len(experts)),
                                ("all_to_all", all_to_all, world * (world - 1))):
            t = sorted(_timed(fn, device, groups.control, iters, warmup))
            p50, p99 = t[len(t) // 2], t[min(len(t) - 1, int(len(t) * 0.99))]

            def loop(fn=fn):
                for _ in range(inner):
                    fn()

            lt = sorted(_timed(loop, device, groups.control, max(3, iters // inner), 1))
            rows_out.append({"op": name, "bytes_per_pair": pair_bytes, "tokens": c, "p50_us": 1e6 * p50,
                             "p99_us": 1e6 * p99, "loop_us": 1e6 * lt[len(lt) // 2] / inner,
                             "GBps": pairs * pair_bytes / p50 / 1e9})
    dist.destroy_process_group()
    return rows_out if rank == 0 else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention-ranks", type=int, default=2)
    p.add_argument("--expert-ranks", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="4KB,16KB,64KB,256KB,1MB,4MB,8MB")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per sample of the loop_us column")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from expertyard.disagg.launch import _free_port
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg = DisaggConfig(attention_ranks=args.attention_ranks, expert_ranks=args.expert_ranks)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.world_size, rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0, run_id="bench-m2n")
    rows = elastic_launch(launch, worker)(cfg, args.device, sizes, args.hidden, args.top_k, args.num_experts,
                                          args.iters, args.warmup, args.inner)[0]
    result = {"attention_ranks": cfg.attention_ranks, "expert_ranks": cfg.expert_ranks, "device": args.device,
              "hidden": args.hidden, "top_k": args.top_k, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"M2N: {cfg.attention_ranks} attention x {cfg.expert_ranks} expert ranks on {args.device}; "
          f"all_to_all over all {cfg.world_size} ranks")
    print(f"{'op':>10} {'KiB/pair':>9} {'p50 us':>9} {'p99 us':>9} {'loop us':>9} {'GB/s':>8}")
    for r in rows:
        print(f"{r['op']:>10} {r['bytes_per_pair'] / 1024:9.1f} {r['p50_us']:9.1f} {r['p99_us']:9.1f} "
              f"{r['loop_us']:9.1f} {r['GBps']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
