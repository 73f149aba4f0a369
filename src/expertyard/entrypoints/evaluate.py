"""`expertyard eval`: perplexity of a text file, with a sliding window; and, for lossy configurations (a low
precision), greedy agreement with the full-precision model."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from tqdm import tqdm

from expertyard.assets import heldout_text_path
from expertyard.engine.llm_engine import LLMEngine
from expertyard.entrypoints.common import add_model_args, add_offload_args, engine_from_args
from expertyard.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a text file; agreement with full precision",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, synthetic=True)
    add_offload_args(p)
    p.add_argument("--text", type=Path, default=None,
                   help="UTF-8 text file (default: TinyStories stories the bundled model was not trained on, shipped "
                        "with the package; none with --synthetic)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--window", type=int, default=None, help="context window (default: max model length)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: window / 2)")
    p.add_argument("--token-by-token", action="store_true",
                   help="one token per step, as offloaded decode meets the cache (token-level precision applies to "
                        "visits that fit the cache, i.e. decode steps, not long prefill chunks)")
    p.add_argument("--agreement-tokens", type=int, default=0,
                   help="also generate N greedy tokens with the full-precision resident model from the first "
                        "prompts of the text (random ids with --synthetic) and report how often this configuration "
                        "agrees: teacher-forced top-1 and the identical free-running prefix")
    p.add_argument("--agreement-prompts", type=int, default=4, help="prompts for --agreement-tokens")
    p.add_argument("--agreement-prompt-len", type=int, default=32, help="tokens per agreement prompt")
    p.set_defaults(func=run)


def perplexity(engine: LLMEngine, tokens: list[int], window: int, stride: int, progress: bool = True) -> dict:
    """Sliding-window perplexity: each token is scored once, with up to `window - 1` tokens of context."""
    if not 0 < stride <= window:
        raise ConfigError(f"stride={stride} must be in 1..window={window}")
    nll, scored, prev_end = 0.0, 0, 1  # the first token has no context and is not scored
    starts = range(0, max(len(tokens) - 1, 1), stride)
    # closed when the loop breaks early too, so that the bar ends its line before anything else is printed
    with tqdm(starts, desc="eval", disable=not progress) as bar:
        for begin in bar:
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


def agreement_prompts(engine: LLMEngine, tokens: list[int] | None, n: int, length: int, seed: int = 0
                      ) -> list[list[int]]:
    """n prompts of `length` tokens: consecutive slices of the text's tokens, or random ids without a text."""
    if tokens is not None and len(tokens) >= n * length:
        return [tokens[i * length:(i + 1) * length] for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.model_config.vocab_size, (n, length), generator=g).tolist()


def greedy_agreement(engine: LLMEngine, reference: LLMEngine, prompts: list[list[int]], n_tokens: int) -> dict:
    """The reference generates `n_tokens` greedily per prompt. `teacher_forced_agreement`: the fraction of those
    positions where `engine`'s most likely token, given the reference's prefix, is the reference's token;
    `identical_prefix`: tokens `engine` generates on its own before the first difference (mean over prompts).
    Prompts run one at a time, so each decode step is a batch-1 visit."""
    from expertyard.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    agree = total = 0
    prefix, logp_gap = [], 0.0
    for p in prompts:
        ref = reference.generate([p], params)[0].output_token_ids
        chosen, _, top = engine.prompt_logprobs(p + ref, top=1)
        ours_top = top[len(p) - 1:, 0].tolist()
        agree += sum(a == b for a, b in zip(ours_top, ref))
        total += len(ref)
        ref_chosen = reference.prompt_logprobs(p + ref)[0]
        logp_gap += float((chosen[len(p) - 1:] - ref_chosen[len(p) - 1:]).abs().sum())
        free = engine.generate([p], params)[0].output_token_ids
        same = next((i for i, (a, b) in enumerate(zip(free, ref)) if a != b), len(ref))
        prefix.append(same)
    return {"agreement_tokens": n_tokens, "agreement_prompts": len(prompts),
            "teacher_forced_agreement": agree / total, "identical_prefix_mean": sum(prefix) / len(prefix),
            "identical_prefix": prefix, "mean_abs_logprob_diff": logp_gap / total}


def run(args) -> int:
    synthetic = getattr(args, "synthetic", None)
    if args.text is None and not synthetic:
        args.text = heldout_text_path()
    if args.text is not None and not args.text.is_file():
        raise ConfigError(f"--text {args.text}: no such file")
    if synthetic and not args.agreement_tokens:
        raise ConfigError("--synthetic models have no tokenizer or text: use --agreement-tokens N to compare this "
                          "configuration with full precision on random prompts")
    config = {"max_num_batched_tokens": 1} if args.token_by_token else {}
    engine = engine_from_args(args, **config)
    tokens, result = None, {}
    if args.text is not None:
        if engine.tokenizer is None:
            raise ConfigError("perplexity needs a tokenizer; --synthetic models have none (drop --text)")
        # verbose=False: a text longer than the tokenizer's model_max_length is what a sliding window is for
        tokens = engine.tokenizer(args.text.read_text(encoding="utf-8"), verbose=False).input_ids
        if args.max_tokens:
            tokens = tokens[:args.max_tokens]
        if len(tokens) < 2:
            raise ConfigError(f"{args.text}: fewer than 2 tokens, nothing to score")
        window = min(args.window or engine.max_model_len, engine.max_model_len)
        result = perplexity(engine, tokens, window, args.stride or max(window // 2, 1), progress=not args.json)
        result |= {"text": str(args.text), "window": window}
    if args.agreement_tokens:
        need = args.agreement_prompt_len + args.agreement_tokens
        if need > engine.max_model_len:
            raise ConfigError(f"--agreement-prompt-len + --agreement-tokens = {need} exceeds the model length "
                              f"{engine.max_model_len}")
        reference = engine_from_args(args, resident=True)  # the full-precision resident model, batched as usual
        prompts = agreement_prompts(engine, tokens, args.agreement_prompts, args.agreement_prompt_len)
        result |= greedy_agreement(engine, reference, prompts, args.agreement_tokens)
        del reference
    if args.offload:
        result["offload"] = engine.model.experts.report(result.get("tokens", 1))
        if args.timeline:
            engine.model.experts.timeline.write(args.timeline)
    if args.json:
        print(json.dumps(result))
    else:
        if "perplexity" in result:
            print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens (window {result['window']})")
        if args.agreement_tokens:
            print(f"agreement with full precision over {args.agreement_tokens} greedy tokens x "
                  f"{len(result['identical_prefix'])} prompts: teacher-forced top-1 "
                  f"{result['teacher_forced_agreement']:.3f}, identical prefix {result['identical_prefix_mean']:.1f} "
                  f"tokens, mean |logprob diff| {result['mean_abs_logprob_diff']:.4f}")
        if args.offload and args.stats:
            from expertyard.entrypoints.generate import format_stats

            print(format_stats(result["offload"]))
    return 0
