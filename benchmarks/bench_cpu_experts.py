"""Benchmark one routed expert computed on the host CPU (full precision, int8, int4) against copying it over PCIe.

Builds `--experts` random experts of the given shapes in a HostExpertStore (pinned on CUDA hosts) and their CPU
layouts in a CpuExpertStore, then prints, per precision and token count T: the median and fastest ms per expert
call (rotating over the experts so repeats read memory, not cache), and the GB/s of weights read that makes;
the pinned host-to-device copy of one full expert (CUDA only); the hand-off cost of the worker thread; the
load-time cost of building the low-precision copies; and the start-up calibration (`measure_costs`).

    PYTHONPATH=src python3 benchmarks/bench_cpu_experts.py --threads 16 --out cpu_experts.json  # Mixtral-8x7B
    PYTHONPATH=src python3 benchmarks/bench_cpu_experts.py --hidden 256 --intermediate 512 --threads 1  # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from expertyard.experts.cpu import CpuExpertCompute, CpuExpertStore, measure_costs, set_cpu_threads
from expertyard.experts.host_store import HostExpertStore

# T = tokens, D = hidden size, I = expert intermediate size

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def times_ms(call, repeats: int) -> list[float]:
    call(0)  # warm-up
    out = []
    for r in range(1, repeats + 1):
        t = time.perf_counter()
        call(r)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096, help="D (Mixtral-8x7B: 4096)")
    ap.add_argument("--intermediate", type=int, default=14336, help="I (Mixtral-8x7B: 14336)")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--precisions", default="full,int8,int4")
    ap.add_argument("--group-size", type=int, default=None, help="int4 group (default: 128 where it divides)")
    ap.add_argument("--experts", type=int, default=3, help="distinct experts to rotate over (defeats the cache)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    threads = set_cpu_threads(args.threads)
    dtype = DTYPES[args.dtype]
    d, i = args.hidden, args.intermediate
    cuda = torch.cuda.is_available()
    keys = [(0, e) for e in range(args.experts)]
    host = HostExpertStore(keys, d, i, dtype, host_budget_bytes=None, pin=cuda)
    host.pool.normal_(0, 0.02)
    t0 = time.perf_counter()
    store = CpuExpertStore(host, keys, args.precisions, group_size=args.group_size, progress=False)
    build_s = time.perf_counter() - t0
    res = {"date": datetime.date.today().isoformat(), "host": platform.node(), "processor": platform.processor(),
           "torch": torch.__version__, "threads": threads, "hidden": d, "inter": i, "dtype": args.dtype,
           "group_size": store.group_size, "cuda": torch.cuda.get_device_name() if cuda else None,
           "build_s_per_expert": build_s / len(keys), "cpu": {}}
    print(f"D={d} I={i} {args.dtype}, {threads} threads, torch {torch.__version__}, int4 group {store.group_size}; "
          f"low-precision copies built in {build_s / len(keys) * 1e3:.0f} ms an expert")
    print(f"{'precision':>9} {'MiB':>8} " + " ".join(f"{f'T={t} ms (min)':>18} {'GB/s':>6}" for t in args.tokens))
    order = [p for p in ("full", "int8", "int4") if p in store.precisions]
    for p in order:
        layouts = [store.get(k, p) for k in keys]
        nbytes = store.nbytes(p)
        row, cells = {}, []
        for t in args.tokens:
            x = torch.randn(t, d).to(dtype)  # [T, D]
            ms = times_ms(lambda r: layouts[r % len(layouts)].forward(x), args.repeats)
            med = statistics.median(ms)
            row[t] = {"median_ms": med, "min_ms": min(ms), "gb_per_s": nbytes / med / 1e6}
            cells.append(f"{f'{med:.2f} ({min(ms):.2f})':>18} {nbytes / med / 1e6:6.1f}")
        res["cpu"][p] = {"nbytes": nbytes, "tokens": row}
        print(f"{p:>9} {nbytes / 2 ** 20:8.1f} " + " ".join(cells))

    # the worker thread's hand-off: submit().result() of one T=1 expert against calling run() directly
    comp = CpuExpertCompute(store)
    x = torch.randn(1, d).to(dtype)
    item = [(keys[0], order[-1], torch.zeros(1, dtype=torch.long), torch.ones(1))]
    direct = statistics.median(times_ms(lambda r: comp.run(x, item), args.repeats))
    worker = statistics.median(times_ms(lambda r: comp.submit(x, item).result(), args.repeats))
    comp.close()
    res["worker"] = {"precision": order[-1], "run_ms": direct, "submit_result_ms": worker}
    print(f"worker thread ({order[-1]}, T=1): run {direct:.3f} ms, submit().result() {worker:.3f} ms")

    if cuda:
        dev = torch.device("cuda")
        dst = torch.empty(host.numel, dtype=dtype, device=dev)

        def copy(r):
            dst.copy_(host.source(keys[r % len(keys)], dev), non_blocking=True)
            torch.cuda.synchronize()

        ms = times_ms(copy, args.repeats)
        med = statistics.median(ms)
        res["pinned_copy"] = {"pinned": host.pinned, "median_ms": med, "min_ms": min(ms),
                              "gb_per_s": host.expert_bytes / med / 1e6}
        print(f"copy one full expert host->device ({'pinned' if host.pinned else 'pageable'}): {med:.2f} ms "
              f"(min {min(ms):.2f}), {host.expert_bytes / med / 1e6:.1f} GB/s")

    t0 = time.perf_counter()
    costs = measure_costs(store, torch.device("cuda" if cuda else "cpu"))
    res["calibration_s"] = time.perf_counter() - t0
    res["costs"] = costs.to_dict()
    print(f"start-up calibration ({res['calibration_s']:.2f} s):\n  " + costs.describe().replace("\n", "\n  "))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
