"""`expertyard generate`: one prompt in, text out."""

from __future__ import annotations

import argparse
import json
import sys
import time

from expertyard.engine.sampling_params import SamplingParams
from expertyard.entrypoints.common import add_model_args, add_offload_args, engine_from_args
from expertyard.errors import ConfigError, RequestError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_offload_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the most likely tokens holding "
                                                            "this share of the probability (1 disables it)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the K most likely tokens (0 disables it)")
    p.add_argument("--seed", type=int, default=None, help="seed of this request's sampling, for reproducible output "
                                                         "(default: none)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.set_defaults(func=run)


def sampling_params(args) -> SamplingParams:
    """The sampling flags, checked before anything is loaded."""
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=args.stop)
    except RequestError as e:  # "temperature=-1.0 must be ..." -> "--temperature -1.0 must be ..."
        name, _, rest = str(e).partition("=")
        raise ConfigError(f"--{name.replace('_', '-')} {rest}") from None


def run(args) -> int:
    params = sampling_params(args)
    if args.system and not args.chat:
        raise ConfigError("--system needs --chat")
    engine = engine_from_args(args)
    prompt = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    seq = engine.add_request(prompt, params)
    printed, start, first = 0, time.perf_counter(), None
    if not args.json and not args.chat:
        sys.stdout.write(args.prompt)  # continue the prompt in place, as a completion
    while not seq.finished:
        engine.step()
        first = first or time.perf_counter()
        if not args.json:  # stream the text as it grows
            sys.stdout.write(seq.text[printed:])
            sys.stdout.flush()
            printed = len(seq.text)
    elapsed = time.perf_counter() - start
    n = len(seq.output_token_ids)
    decode_tps = (n - 1) / (time.perf_counter() - first) if n > 1 and first else 0.0
    stats = engine.model.experts.report(seq.num_prompt_tokens + n) if args.offload else None
    if args.offload and args.timeline:
        engine.model.experts.timeline.write(args.timeline)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": seq.text, "finish_reason": seq.finish_reason,
                          "prompt_tokens": seq.num_prompt_tokens, "completion_tokens": n,
                          "seconds": round(elapsed, 4), "decode_tokens_per_s": round(decode_tps, 2),
                          **({"offload": stats} if stats else {})}))
    else:
        sys.stdout.write(seq.text[printed:] + "\n")
        print(f"[{n} tokens, {elapsed:.2f} s, {decode_tps:.1f} tokens/s decode, finish: {seq.finish_reason}]",
              file=sys.stderr)
        if stats and args.stats:
            print(format_stats(stats), file=sys.stderr)
    return 0


def format_stats(s: dict) -> str:
    """The offload statistics of `OffloadedExperts.report`, for people (--stats)."""
    link = (f"copy stream busy {s['copy_busy_s']:.3f} s, stall {s['stall_ms_per_token']:.2f} ms/token, "
            if s["host_pinned"] or s["copy_busy_s"] else "")
    lines = [f"[expert cache: {s['cache_slots']} slots, hit rate {100 * s['hit_rate']:.1f}% "
             f"({s['hits']} hits, {s['misses']} misses, {s['misses_per_token']:.2f}/token); prefetch: "
             f"{s['prefetches']} loads, precision {100 * s['prefetch_precision']:.0f}%, predictor precision "
             f"{100 * s['predictor_precision']:.0f}% recall {100 * s['predictor_recall']:.0f}%; copied "
             f"{s['bytes_copied'] / 2**20:,.0f} MiB ({s['bytes_per_token'] / 2**20:,.1f} MiB/token), {link}routing "
             f"read {s['host_sync_ms_per_token']:.2f} ms/token (p50 {s['routing_wait_us_p50']:.0f} us per layer)]"]
    if "cpu_compute" in s:
        split = " ".join(f"L{layer}:{v['cpu']}/{v['copied']}" for layer, v in s["split_per_layer"].items())
        lines.append(f"[misses on the CPU ({s['cpu_precision']}): {s['cpu_experts_per_token']:.2f}/token, "
                     f"{s['cpu_ms_per_token']:.2f} ms/token; copied: {s['copied_misses_per_token']:.2f}/token; split per layer "
                     f"(CPU/copied): {split or 'no misses'}]")
    return "\n".join(lines)