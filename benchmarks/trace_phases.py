"""Where the GPU time of a profiled window goes, from the Chrome traces of `EXPERTYARD_PROFILE_DIR`.

    python benchmarks/trace_phases.py OUT/rank0_steps70-71.json.gz OUT/rank1_steps70-71.json.gz

For each trace (one rank): device time by kind of kernel (NCCL, fused MoE, attention, GEMM, other), how much of
the window some compute kernel was running, how much only NCCL was, and how much the GPU idled; then, for the
ranks together on one clock (traces of one host share it), the segments of one step in order: runs of
consecutive kernels of one kind on one rank, so the serial chain attention -> dispatch -> experts -> combine and
the gaps between its links can be read off. `--step-window US` bounds that listing (default: the first 6 ms
after rank 0's last step begins).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

KINDS = (
    ("nccl", re.compile(r"nccl", re.I)),
    ("fused_moe", re.compile(r"fused_moe|moe_align|_moe_|_gate_up_kernel|_down_kernel|_offsets_kernel", re.I)),
    ("attention", re.compile(r"attention|attn|flash|_decode_kernel", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|sm90_|sm80_|cublas|matmul", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


@dataclass
class Kernel:
    rank: str
    stream: int
    name: str
    kind: str
    start: float  # us, absolute
    end: float


def load(path: Path) -> tuple[list[Kernel], list[tuple[str, float, float]]]:
    """The trace's GPU kernels and its host `expertyard.*` ranges (absolute us)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    base = trace.get("baseTimeNanoseconds", 0) / 1000.0
    rank = path.name.split("_")[0]
    kernels, ranges = [], []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X":
            continue
        ts, dur = float(ev.get("ts", 0)) + base, float(ev.get("dur", 0))
        if ev.get("cat") == "kernel":
            stream = int(ev.get("args", {}).get("stream", ev.get("tid", 0)))
            kernels.append(Kernel(rank, stream, ev["name"], kind_of(ev["name"]), ts, ts + dur))
        elif ev.get("cat") == "user_annotation" and ev.get("name", "").startswith("expertyard."):
            ranges.append((ev["name"], ts, ts + dur))
    kernels.sort(key=lambda k: k.start)
    return kernels, ranges


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summary(kernels: list[Kernel], ranges) -> list[str]:
    t0, t1 = kernels[0].start, max(k.end for k in kernels)
    window = t1 - t0
    by_kind = defaultdict(float)
    count = defaultdict(int)
    for k in kernels:
        by_kind[k.kind] += k.end - k.start
        count[k.kind] += 1
    compute = union([(k.start, k.end) for k in kernels if k.kind != "nccl"])
    anything = union([(k.start, k.end) for k in kernels])
    steps = [r for r in ranges if r[0] == "expertyard.layers"]
    out = [f"window {window / 1000:.3f} ms on the device, {len(steps)} steps on the host "
           f"({', '.join(f'{(b - a) / 1000:.2f}' for _, a, b in steps)} ms in expertyard.layers)",
           f"  compute kernels running {compute / window:6.1%}   only NCCL {(anything - compute) / window:6.1%}   "
           f"idle {1 - anything / window:6.1%}"]
    for kind in sorted(by_kind, key=by_kind.get, reverse=True):
        out.append(f"  {kind:>10}: {by_kind[kind] / 1000:8.3f} ms device time in {count[kind]:6d} kernels")
    return out


def segments(kernels: list[Kernel], start: float, span: float, merge_gap: float = 3.0) -> list[str]:
    """Runs of one kind on one rank's stream within [start, start + span), in start order."""
    rows: list[list] = []  # [rank, stream, kind, end, kernels, start]
    for k in kernels:
        if not start <= k.start < start + span:
            continue
        last = rows[-1] if rows else None
        if last is not None and last[:3] == [k.rank, k.stream, k.kind] and k.start - last[3] <= merge_gap:
            last[3] = max(last[3], k.end)
            last[4] += 1
        else:
            rows.append([k.rank, k.stream, k.kind, k.end, 1, k.start])
    out = [f"{'t (us)':>9} {'rank':>6} {'stream':>6} {'kind':>10} {'us':>8} {'kernels':>7}"]
    for rank, stream, kind, end, n, s in rows:
        out.append(f"{s - start:9.1f} {rank:>6} {stream:>6} {kind:>10} {end - s:8.1f} {n:7d}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+", type=Path)
    ap.add_argument("--step-window", type=float, default=6000.0, help="us of the last step to list (default 6000)")
    args = ap.parse_args()
    everything: list[Kernel] = []
    last_step_start = None
    for path in args.traces:
        kernels, ranges = load(path)
        if not kernels:
            print(f"{path.name}: no GPU kernels in the trace")
            continue
        print(f"== {path.name}")
        print("\n".join(summary(kernels, ranges)))
        everything += kernels
        steps = sorted(a for name, a, _ in ranges if name == "expertyard.layers")
        if steps and path.name.startswith("rank0"):
            last_step_start = steps[-1]
    if not everything:
        return
    everything.sort(key=lambda k: k.start)
    if last_step_start is None:
        last_step_start = everything[len(everything) // 2].start
    first = next((k.start for k in everything if k.start >= last_step_start), everything[0].start)
    print(f"\n== segments of the last step, all ranks on one clock (first {args.step_window:.0f} us)")
    print("\n".join(segments(everything, first, args.step_window)))


if __name__ == "__main__":
    main()
