"""`expertyard trace`: record the expert routing of a text file (prefill) into a trace file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from expertyard.entrypoints.common import add_model_args, bundled_model_path, engine_from_args
from expertyard.errors import ConfigError
from expertyard.trace.format import save_trace
from expertyard.trace.record import trace_text


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="record which experts the model routes each token of a text to",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--text", type=Path, required=True,
                   help="UTF-8 text; documents separated by <|endoftext|> (else by blank lines)")
    p.add_argument("--out", type=Path, required=True, help="trace file to write (.npz)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after N tokens")
    p.add_argument("--save-hidden", action="store_true",
                   help="also keep each MoE layer's input (float16 [T, L, D]) so predictors can be replayed")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.text.is_file():
        raise ConfigError(f"--text {args.text}: no such file")
    if args.out.parent and not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: directory {args.out.parent} does not exist")
    engine = engine_from_args(args)
    start = time.perf_counter()
    trace = trace_text(engine, args.text.read_text(encoding="utf-8"), (args.model or bundled_model_path()).name,
                       f"expertyard trace --text {args.text.name}", args.max_tokens, args.save_hidden,
                       progress=not args.json)
    seconds = time.perf_counter() - start
    save_trace(args.out, trace)
    result = {"out": str(args.out), "model": trace.model, "tokens": trace.num_tokens,
              "sequences": len(trace.seq_starts), "moe_layers": trace.num_layers, "num_experts": trace.num_experts,
              "top_k": trace.top_k, "hidden": trace.hidden is not None, "seconds": round(seconds, 2),
              "bytes": args.out.stat().st_size}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.out}: {trace.num_tokens} tokens in {len(trace.seq_starts)} sequences, {trace.num_layers} MoE "
              f"layers, top-{trace.top_k} of {trace.num_experts}{', hidden states' if args.save_hidden else ''} "
              f"({seconds:.1f} s)")
    return 0
