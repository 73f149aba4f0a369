"""`expertyard eval`: perplexity of a text file, with a sliding window."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tqdm import tqdm

from expertyard.engine.llm_engine import LLMEngine
from expertyard.entrypoints.common import add_model_args, add_offload_args, engine_from_args
from expertyard.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a text file", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_offload_args(p)
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--window", type=int, default=None, help="context window (default: max model length)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: window / 2)")
    p.set_defaults(func=run)


def perplexity(engine: LLMEngine, tokens: list[int], window: int, stride: int, progress: bool = True) -> dict:
    """Sliding-window perplexity: each token is scored once, with up to `window - 1` tokens of context."""
    if not 0 < stride <= window:
        raise ConfigError(f"stride={stride} must be in 1..window={window}")
    nll, scored, prev_end = 0.0, 0, 1  # the first token has no context and is not scored
    starts = range(0, max(len(tokens) - 1, 1), stride)
    for begin in tqdm(starts, desc="eval", disable=not progress):
        end = min(begin + window, len(tokens))
        logp = engine.score(tokens[begin:end])  # [end - begin - 1]: log p(token i | tokens before)
        new = end - prev_end  # tokens in this window not scored by an earlier one
        if new > 0:
            nll -= float(logp[-new:].double().sum())
            scored += new
            prev_end = end
        if end == len(tokens):
            break
    return {"tokens": scored, "nll": nll, "perplexity": math.exp(nll / scored) if scored else float("nan")}


def run(args) -> int:
    if not args.text.is_file():
        raise ConfigError(f"--text {args.text}: no such file")
    engine = engine_from_args(args)
    if engine.tokenizer is None:
        raise ConfigError("eval needs a tokenizer; --synthetic models have none")
    tokens = engine.tokenizer(args.text.read_text(encoding="utf-8")).input_ids
    if args.max_tokens:
        tokens = tokens[:args.max_tokens]
    if len(tokens) < 2:
        raise ConfigError(f"{args.text}: fewer than 2 tokens, nothing to score")
    window = min(args.window or engine.max_model_len, engine.max_model_len)
    result = perplexity(engine, tokens, window, args.stride or max(window // 2, 1), progress=not args.json)
    result |= {"text": str(args.text), "window": window}
    if args.offload:
        result["offload"] = engine.model.experts.report(result["tokens"])
        if args.timeline:
            engine.model.experts.timeline.write(args.timeline)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens (window {window})")
        if args.offload and args.stats:
            from expertyard.entrypoints.generate import format_stats

            print(format_stats(result["offload"]))
    return 0
