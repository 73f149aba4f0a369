"""`expertyard simulate --precision mixed` (HOBBIT's two-pool cache: full/low hits and misses, skips, miss
penalty) and `expertyard simulate --fit-weights OUT.json` (fit hobbit's cache weights on a calibration part,
report a held-out part). `simulate_cmd` hands over to `run_mixed` for either."""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from expertyard.errors import ConfigError
from expertyard.experts.offload.budget import split_pools
from expertyard.experts.policies import save_hobbit_weights
from expertyard.experts.precision import PrecisionThresholds
from expertyard.trace.fit_hobbit import MixedSetup, fit_and_compare, pmap
from expertyard.trace.format import Trace
from expertyard.trace.mixed_simulate import FULL_BITS, byte_ratio, simulate_mixed, trace_levels
from expertyard.trace.replay_inputs import SWEEP_FRACTIONS, load_predictions, model_config_for
from expertyard.trace.simulate import capacity_for


def add_mixed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixed precision (HOBBIT)")
    g.add_argument("--precision", choices=["full", "mixed"], default="full",
                   help="full: one full-precision pool (the engine today); mixed: a full and a low-precision pool, "
                        "each pair's level from its gate weights")
    g.add_argument("--precision-thresholds", default="0.6,0.9",
                   help="T1,T2: a pair whose higher-ranked weights sum to <= T1 needs full precision, <= T2 low, "
                        "else it is skipped on a miss")
    g.add_argument("--low-precision-bits", type=int, default=4, choices=[2, 4, 8],
                   help="bits of the low-precision copies (a low miss costs bits/16 of a full one)")
    g.add_argument("--low-pool-fraction", type=float, default=0.25,
                   help="share of the cache bytes given to the low-precision pool")
    g.add_argument("--seed", type=int, default=0, help="seed of the stand-in gate weights (traces without weights)")
    g.add_argument("--fit-weights", type=Path, default=None,
                   help="fit hobbit's weights on the first part of the trace, write them to this JSON file and "
                        "report lru, lfu, hobbit and belady on the held-out rest")
    g.add_argument("--calibration-fraction", type=float, default=0.25,
                   help="--fit-weights: share of the tokens (whole sequences) to fit on")


def _setup(args, trace: Trace, budget: int, levels, ratio: float) -> MixedSetup:
    high, low = split_pools(budget, ratio, args.low_pool_fraction, trace.top_k)
    return MixedSetup(levels, high, low, args.low_precision_bits / FULL_BITS, ratio)


def run_mixed(args, trace: Trace, full: Trace, policy_kwargs: dict, model_path: Path) -> int:
    """`model_path`: the model for predictors and shapes (--model, else the bundled one)."""
    if args.batch_size != 1:
        raise ConfigError(f"--precision mixed replays one token at a time; drop --batch-size {args.batch_size}")
    thresholds = PrecisionThresholds.parse(args.precision_thresholds)
    cfg, _ = model_config_for(trace, args.model, model_path)
    ratio, ratio_source = byte_ratio(args.low_precision_bits, cfg and cfg.hidden_size,
                                     cfg and cfg.moe.intermediate_size)
    levels, level_source = trace_levels(trace, thresholds, args.seed, offset=args.start_token)
    out = {"trace": str(args.trace), "model": trace.model, "tokens": trace.num_tokens,
           "trace_tokens": full.num_tokens, "sequences": len(trace.seq_starts), "moe_layers": trace.num_layers,
           "num_experts": trace.num_experts, "top_k": trace.top_k, "precision": "mixed",
           "thresholds": [thresholds.full, thresholds.low], "low_precision_bits": args.low_precision_bits,
           "low_cost": args.low_precision_bits / FULL_BITS, "byte_ratio": ratio, "byte_ratio_source": ratio_source,
           "low_pool_fraction": args.low_pool_fraction, "levels_source": level_source,
           "level_shares": [float((levels == v).mean()) for v in range(3)]}
    if args.fit_weights is not None:
        return _fit(args, trace, levels, ratio, out)
    if args.sweep:
        budgets = [capacity_for(trace, cache_fraction=f) for f in SWEEP_FRACTIONS]
    else:
        budgets = [capacity_for(trace, args.cache_experts, args.cache_fraction)]
    predictions = load_predictions(trace, args.trace, args.predictor, args.prefetch_depth, model_path,
                                   args.predictor_path, progress=not args.json)
    policies = (["lru", "lfu", "hobbit", "belady"] if args.sweep else
                [args.policy] + ([] if args.policy == "belady" else ["belady"]))
    jobs = [(b, p) for b in budgets for p in policies]

    def one(job):
        budget, policy = job
        s = _setup(args, trace, budget, levels, ratio)
        predict = policy != "belady" or not args.sweep and args.policy == "belady"
        r = simulate_mixed(trace, levels, policy, s.high_slots, s.low_slots, s.low_cost,
                           predictions if predict else None, args.adaptive_prefetch and predict,
                           policy_kwargs if policy == "hobbit" else None, args.predictor if predict else "none")
        return r.summary(ratio) | {"budget": budget, "cache_fraction": budget / (trace.num_layers * trace.num_experts)}

    for b in budgets:
        _setup(args, trace, b, levels, ratio)  # pool errors before any replay
    out["runs"] = pmap(one, jobs, args.jobs)
    if args.json:
        print(json.dumps(out))
    else:
        print_mixed(out)
    return 0


def _fit(args, trace: Trace, levels, ratio: float, out: dict) -> int:
    if args.sweep or args.cache_experts is None and args.cache_fraction is None:
        raise ConfigError("--fit-weights fits at one cache size: give --cache-fraction or --cache-experts")
    budget = capacity_for(trace, args.cache_experts, args.cache_fraction)
    setup = _setup(args, trace, budget, levels, ratio)
    result, report = fit_and_compare(trace, setup, budget, args.calibration_fraction, args.jobs)
    fitted_on = {k: out[k] for k in ("trace", "model", "tokens", "thresholds", "low_precision_bits", "byte_ratio",
                                     "low_pool_fraction", "levels_source")}
    fitted_on |= {"budget_experts": budget, "high_slots": setup.high_slots, "low_slots": setup.low_slots,
                  "calibration_tokens": report["calibration_tokens"], "date": date.today().isoformat()}
    penalty = {k: report[k] for k in ("units", "calibration", "held_out", "held_out_tokens",
                                      "held_out_full_precision_misses_per_token")}
    save_hobbit_weights(args.fit_weights, result.weights, fitted_on, penalty)
    out |= {"budget": budget, "high_slots": setup.high_slots, "low_slots": setup.low_slots,
            "weights": result.weights.as_dict(), "weights_file": str(args.fit_weights), **report}
    if args.json:
        print(json.dumps(out))
    else:
        print_fit(out)
    return 0


def _head(o: dict) -> str:
    shares = "/".join(f"{100 * v:.1f}" for v in o["level_shares"])
    return (f"{o['model']}: {o['tokens']} tokens of {o['trace_tokens']}, {o['moe_layers']} MoE layers x "
            f"{o['num_experts']} experts, top-{o['top_k']}; thresholds {o['thresholds'][0]},{o['thresholds'][1]}, "
            f"pairs full/low/skip {shares}% ({o['levels_source']}); int{o['low_precision_bits']} copies at "
            f"{o['byte_ratio']:.3f} of a full one ({o['byte_ratio_source']}); low pool {o['low_pool_fraction']:.2f} "
            f"of the bytes; penalty = full misses + {o['low_cost']:.3f} x low misses")


def print_mixed(o: dict) -> None:
    print(_head(o))
    print(f"{'policy':<24} {'budget':>6} {'full/low slots':>14} {'full hit':>8} {'low hit':>8} {'full miss':>9} "
          f"{'low miss':>8} {'skipped':>8} {'penalty/tok':>11} {'loads/tok':>9}  (per token)")
    for r in o["runs"]:
        label = r["policy"] + ("" if r["predictor"] == "none" else
                               f" + {r['predictor']} d={r['depth']}{' adaptive' if r['adaptive'] else ''}")
        n = r["tokens"]
        print(f"{label:<24} {r['budget']:>6} {r['high_slots']:>7}/{r['low_slots']:<6} {r['full_hits'] / n:8.2f} "
              f"{r['low_hits'] / n:8.2f} {r['full_misses'] / n:9.2f} {r['low_misses'] / n:8.2f} "
              f"{r['skipped'] / n:8.2f} {r['penalty_per_token']:11.3f} {r['loads_per_token']:9.2f}")
    print("loads/tok: full-copy equivalents moved (low copies and prefetches at their byte ratio)")


def print_fit(o: dict) -> None:
    print(_head(o))
    w = o["weights"]
    print(f"budget {o['budget']} experts = {o['high_slots']} full + {o['low_slots']} low slots; fitted on tokens "
          f"{o['calibration_tokens'][0]}..{o['calibration_tokens'][1]} ({o['calibration']['evaluations']} replays): "
          + ", ".join(f"{k} {v:.4f}" for k, v in w.items()) + f" -> {o['weights_file']}")
    cal = o["calibration"]
    print("calibration penalty/token: hobbit (fitted) {:.3f}; single terms {}".format(
        cal["hobbit_fitted"], ", ".join(f"{k} {v:.3f}" for k, v in cal["single_term"].items())))
    print(f"held out, tokens {o['held_out_tokens'][0]}..{o['held_out_tokens'][1]}: penalty/token (mixed) | "
          "misses/token (full precision, same budget)")
    for name, v in o["held_out"].items():
        print(f"  {name:<8} {v:9.3f} | {o['held_out_full_precision_misses_per_token'][name]:9.3f}")
