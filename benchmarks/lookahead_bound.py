"""How much future knowledge a cache policy needs to approach Belady: "Belady with lookahead W".

    PYTHONPATH=src python benchmarks/lookahead_bound.py --trace T.npz [--start-token N] [--max-tokens N]
        [--windows 0,1,2,26,52,260,inf] [--fractions 0.1,0.25,0.5] [--json FILE]

At each eviction (visit v), a candidate whose next use falls within visits v+1..v+W is ranked by that use,
exactly (Belady's order), and kept before every candidate whose next use lies beyond the window or never comes;
those are ranked by `reuse`'s own estimate. W = 0 is `reuse`, W = inf is Belady (`trace.fast_replay`'s
`lookahead`). A visit is one (token, MoE layer), so W = 1 knows the next layer's routing and W = L (the MoE
layers) the whole next token's: an upper bound for any policy told that much of the future. Batch 1, no prefetch,
slots as `expertyard simulate --cache-fraction` computes them. Prints misses / Belady's misses (hit rate).
"""

from __future__ import annotations

import argparse
import json
import math
import time

from expertyard.trace import load_trace
from expertyard.trace.fast_replay import fast_replay
from expertyard.trace.fit_hobbit import slice_trace
from expertyard.trace.simulate import capacity_for, schedule


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def bound_table(trace, windows: list[float], fractions: list[float]) -> list[dict]:
    """One row per (window, fraction): misses, hits, Belady's misses at the same slots."""
    rows = []
    for f in fractions:
        slots = capacity_for(trace, cache_fraction=f)
        belady = fast_replay(trace, "belady", slots, 1, schedule)[1]
        for w in windows:
            t0 = time.perf_counter()
            hits, misses, _, _ = fast_replay(trace, "reuse", slots, 1, schedule, lookahead=w)
            rows.append({"window": w, "fraction": f, "slots": slots, "misses": misses, "hits": hits,
                         "belady_misses": belady, "ratio": misses / belady, "hit_rate": hits / (hits + misses),
                         "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def label(w: float) -> str:
    return {0: "0 (reuse)", math.inf: "inf (Belady)"}.get(w, f"{w:g}")


def markdown(rows: list[dict], windows: list[float], fractions: list[float]) -> str:
    cell = {(r["window"], r["fraction"]): r for r in rows}
    slots = {r["fraction"]: r["slots"] for r in rows}
    out = ["| W (visits) | " + " | ".join(f"{f:g} ({slots[f]} slots)" for f in fractions) + " |",
           "|---" * (len(fractions) + 1) + "|"]
    for w in windows:
        out.append(f"| {label(w)} | " + " | ".join(
            f"{cell[w, f]['ratio']:.3f} ({cell[w, f]['hit_rate']:.3f})" for f in fractions) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", required=True, help="routing trace (.npz, docs/trace-format.md)")
    ap.add_argument("--windows", type=floats, default=floats("0,1,2,26,52,260,inf"),
                    help="lookaheads W in visits (inf: the whole future)")
    ap.add_argument("--fractions", type=floats, default=floats("0.1,0.25,0.5"), help="cache sizes (of L x E)")
    ap.add_argument("--start-token", type=int, default=0, help="replay from this token (a sequence start)")
    ap.add_argument("--max-tokens", type=int, default=None, help="replay at most this many tokens")
    ap.add_argument("--json", metavar="FILE", help="also write the rows here")
    args = ap.parse_args(argv)
    if any(w < 0 or (w != math.inf and w != int(w)) for w in args.windows):
        ap.error("--windows: whole numbers >= 0, or inf")
    trace = load_trace(args.trace, hidden=False)
    if args.start_token:
        trace = slice_trace(trace, args.start_token, trace.num_tokens)
    if args.max_tokens:
        trace = trace.head(args.max_tokens)
    t0 = time.perf_counter()
    rows = bound_table(trace, args.windows, args.fractions)
    print(f"{args.trace}: tokens {args.start_token}..{args.start_token + trace.num_tokens - 1} "
          f"({trace.num_tokens}), {trace.num_layers} MoE layers x {trace.num_experts} experts, top-{trace.top_k}; "
          f"misses / Belady's (hit rate), {time.perf_counter() - t0:.0f} s")
    print(markdown(rows, args.windows, args.fractions))
    if args.json:
        meta = {"trace": args.trace, "start_token": args.start_token, "tokens": trace.num_tokens}
        with open(args.json, "w") as fh:
            json.dump({**meta, "rows": [{**r, "window": label(r["window"])} for r in rows]}, fh, indent=1)


if __name__ == "__main__":
    main()
