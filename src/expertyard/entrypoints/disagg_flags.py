"""The `--disaggregate` flags of `expertyard serve` and `expertyard bench` (no heavy imports: parsed at start-up)."""

from __future__ import annotations


def add_disagg_args(p, bench: bool = False) -> None:
    g = p.add_argument_group("distributed expert parallelism (docs/disaggregation.md)")
    g.add_argument("--disaggregate", action="store_true",
                   help="run on several ranks: attention ranks + expert ranks (or colocated expert parallelism)")
    g.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated",
                   help="colocated: every one of the M + N ranks runs attention and holds a share of the experts")
    g.add_argument("--attention-ranks", type=int, default=1, help="M: data-parallel attention ranks")
    g.add_argument("--expert-ranks", type=int, default=1, help="N: expert-parallel ranks")
    g.add_argument("--micro-batches", default="2" if not bench else "1,2,3,4",
                   help="m, the ping-pong micro-batches (1 = no overlap)" + ("; comma-separated to sweep" if bench else ""))
    g.add_argument("--dist-timeout", type=float, default=120.0,
                   help="seconds a rank waits for a peer before the deployment is declared down")
    g.add_argument("--eager-decode", action="store_true",
                   help="attention and expert ranks run decode steps eagerly instead of replaying CUDA graphs "
                        "(A/B, debugging)")
    g.add_argument("--replicate-experts", default="",
                   help="hot experts copied to every expert rank, as LAYER:E,E;LAYER:E (e.g. 0:3,7;5:1)")
    if not bench:
        g.add_argument("--max-restarts", type=int, default=0,
                       help="restart every rank this many times after a rank fails (torchrun's elastic agent); "
                            "once none are left, the command answers 503 until stopped")
