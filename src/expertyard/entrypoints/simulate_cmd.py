"""`expertyard simulate`: replay a routing trace through the engine's expert cache (policy, prefetch) and report
hit rate and traffic, always beside the offline optimum (Belady) for the same capacity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from expertyard.entrypoints.simulate_mixed import add_mixed_args, run_mixed
from expertyard.errors import ConfigError
from expertyard.experts.policies import (DEFAULT_POLICY, ONLINE_POLICIES, POLICIES, load_hobbit_weights,
                                         policy_params_from_args)
from expertyard.experts.predictors import PREDICTOR_NAMES
from expertyard.trace.fast_replay import KERNELS
from expertyard.trace.fit_hobbit import slice_trace
from expertyard.trace.format import load_trace
from expertyard.trace.replay_inputs import SWEEP_FRACTIONS, expert_bytes_for, load_predictions
from expertyard.trace.simulate import capacity_for, simulate_many

PREDICTORS = ["none", "oracle", *[p for p in PREDICTOR_NAMES if p not in ("none", "oracle")]]


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="replay a routing trace through the expert cache: hit rates, traffic",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace", type=Path, required=True, help="routing trace (.npz), e.g. from `expertyard trace`")
    p.add_argument("--policy", choices=sorted(POLICIES), default=DEFAULT_POLICY, help="eviction policy")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-fraction", type=float, help="cache slots as a fraction of all L x E routed experts")
    cache.add_argument("--cache-experts", type=int, help="cache slots (experts)")
    p.add_argument("--sweep", action="store_true",
                   help="table of --policies at each of --fractions, misses relative to Belady's, instead of one run")
    p.add_argument("--policies", default=",".join(sweep_policies()),
                   help="--sweep: comma-separated policies (belady always runs as the bound)")
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in SWEEP_FRACTIONS),
                   help="--sweep: comma-separated cache fractions")
    p.add_argument("--plot", type=Path, default=None,
                   help="--sweep: write a PNG of hit rate against cache size, one curve per policy (matplotlib)")
    p.add_argument("--predictor", choices=PREDICTORS, default="none",
                   help="prefetch: oracle = the true experts of the next layers (an upper bound); next-gate, "
                        "trained = the engine's predictors on the trace's hidden states (needs --save-hidden)")
    p.add_argument("--prefetch-depth", type=int, default=1, help="MoE layers ahead to prefetch (1..3)")
    p.add_argument("--predictor-path", type=Path, default=None,
                   help="trained predictor file; None: pregate.safetensors beside the model")
    p.add_argument("--model", type=Path, default=None,
                   help="model directory for next-gate/trained predictors and the expert size; None: the bundled model")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (union of experts)")
    p.add_argument("--max-tokens", type=int, default=None, help="replay only the first N tokens")
    p.add_argument("--start-token", type=int, default=0,
                   help="replay from this token on (the first token of a sequence; e.g. a held-out part)")
    p.add_argument("--expert-bytes", type=int, default=None,
                   help="bytes of one expert; None: bf16 3*D*I of --model, or of the trace's model if known")
    p.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    p.add_argument("--policy-weights", type=Path, default=None,
                   help="hobbit: weights file (from --fit-weights); None: equal weights")
    p.add_argument("--adaptive-prefetch", action="store_true",
                   help="HOBBIT's adaptive prefetch: a deeper layer's predictions only while the nearer ones were "
                        "all cached")
    add_mixed_args(p)
    p.set_defaults(func=run)


def sweep_policies() -> list[str]:
    """The online policies the compiled replay runs (a sweep over the full trace takes seconds each), lru and lfu
    first; others (hobbit) replay in Python: name them with --policies."""
    return ["lru", "lfu", *sorted(set(ONLINE_POLICIES) & set(KERNELS) - {"lru", "lfu"})]


def bundled_model() -> Path:
    from expertyard.entrypoints.common import bundled_model_path  # imports torch and the engine

    return bundled_model_path()


def _names(text: str, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in POLICIES:
            raise ConfigError(f"{flag}: unknown cache policy {n!r}; choose among {', '.join(sorted(POLICIES))}")
    if not names:
        raise ConfigError(f"{flag} is empty: name at least one policy")
    return [n for n in names if n != "belady"]


def _fractions(text: str) -> list[float]:
    try:
        out = sorted({float(f) for f in text.split(",") if f.strip()})
    except ValueError:
        raise ConfigError(f"--fractions {text!r} must be comma-separated numbers in (0, 1], e.g. 0.1,0.25,0.5") from None
    if not out or not all(0 < f <= 1 for f in out):
        raise ConfigError(f"--fractions {text!r} must be comma-separated numbers in (0, 1], e.g. 0.1,0.25,0.5")
    return out


def policy_kwargs_for(args) -> dict:
    """--policy-weights and the like, for the policy they belong to (checked now, so a bad file fails before any
    replay); in a sweep or a fit, for hobbit."""
    if args.sweep or args.fit_weights is not None:
        return {} if args.policy_weights is None else {"weights": load_hobbit_weights(args.policy_weights)}
    params = policy_params_from_args(args.policy, args)
    if "weights" in params:
        params["weights"] = load_hobbit_weights(params["weights"])
    return params


def run(args) -> int:
    for flag, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens), ("--jobs", args.jobs)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if args.sweep and (args.cache_fraction is not None or args.cache_experts is not None):
        raise ConfigError("--sweep runs each of --fractions; drop --cache-fraction/--cache-experts")
    if args.plot is not None and not args.sweep:
        raise ConfigError("--plot draws the curves of a --sweep; add --sweep")
    need_hidden = args.predictor in ("next-gate", "trained")
    full = load_trace(args.trace, hidden=need_hidden)
    if args.start_token:
        if not 0 <= args.start_token < full.num_tokens:
            raise ConfigError(f"--start-token {args.start_token} must be in 0..{full.num_tokens - 1}")
        full = slice_trace(full, args.start_token, full.num_tokens)
    trace = full.head(args.max_tokens) if args.max_tokens else full
    policy_kwargs = policy_kwargs_for(args)
    model_path = args.model or bundled_model()
    if args.precision == "mixed" or args.fit_weights is not None:
        return run_mixed(args, trace, full, policy_kwargs, model_path)
    if args.sweep:
        fractions = _fractions(args.fractions)
        capacities = sorted({capacity_for(trace, cache_fraction=f) for f in fractions})
    else:
        capacities = [capacity_for(trace, args.cache_experts, args.cache_fraction)]
    expert_bytes, bytes_source = expert_bytes_for(trace, args.expert_bytes, args.model, model_path)
    predictions = load_predictions(trace, args.trace, args.predictor, args.prefetch_depth, model_path,
                                   args.predictor_path, progress=not args.json)
    policies = _names(args.policies, "--policies") if args.sweep else [args.policy]
    jobs = [dict(policy=p, capacity=c, batch_size=args.batch_size, predict=True, predictor_name=args.predictor,
                 **({"policy_kwargs": policy_kwargs} if p == "hobbit" and policy_kwargs else {}),
                 **({"adaptive": True} if args.adaptive_prefetch else {}))
            for c in capacities for p in policies]
    jobs += [dict(policy="belady", capacity=c, batch_size=args.batch_size, predict=False) for c in capacities]
    if not args.sweep and args.policy == "belady" and predictions is None:
        jobs = jobs[:1]  # the run is the bound
    results = [r.summary(expert_bytes) for r in simulate_many(trace, jobs, predictions, args.jobs)]
    total = trace.num_layers * trace.num_experts
    bound = {r["capacity"]: r["misses"] for r in results if r["policy"] == "belady" and r["predictor"] == "none"}
    for r in results:
        r["cache_fraction"] = r["capacity"] / total
        r["misses_vs_belady"] = r["misses"] / bound[r["capacity"]] if bound.get(r["capacity"]) else None
    out = {"trace": str(args.trace), "model": trace.model, "phase": trace.phase, "tokens": trace.num_tokens,
           "trace_tokens": full.num_tokens, "start_token": args.start_token, "sequences": len(trace.seq_starts),
           "moe_layers": trace.num_layers, "num_experts": trace.num_experts, "top_k": trace.top_k,
           "batch_size": args.batch_size, "expert_bytes": expert_bytes, "expert_bytes_source": bytes_source}
    if args.sweep:
        order = {c: i for i, c in enumerate(capacities)}
        names = [*policies, "belady"]
        out["sweep"] = sorted(results, key=lambda r: (names.index(r["policy"]), order[r["capacity"]]))
    else:
        out["result"] = results[0]
        out["belady_bound"] = results[-1]
    if args.plot is not None:
        from expertyard.trace.plot import plot_hit_rates  # imports matplotlib

        plot_hit_rates(out["sweep"], args.plot, f"{trace.model} ({trace.phase}), {trace.num_tokens} tokens")
        out["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(out))
    else:
        print_report(out)
    return 0


def _header(o: dict) -> str:
    size = (f"expert {o['expert_bytes'] / 1e6:.2f} MB ({o['expert_bytes_source']})" if o["expert_bytes"]
            else "expert size unknown (pass --expert-bytes): traffic in experts")
    return (f"{o['model']} trace ({o['phase']}): {o['tokens']} tokens of {o['trace_tokens']}, {o['sequences']} "
            f"sequences, {o['moe_layers']} MoE layers x {o['num_experts']} experts, top-{o['top_k']}; batch "
            f"{o['batch_size']}; {size}")


def _row(label: str, r: dict, with_bytes: bool) -> str:
    prec = "-" if r["prefetch_precision"] is None else f"{r['prefetch_precision']:.3f}"
    on_time = "-" if r["prefetch_precision"] is None else f"{r['prefetch_precision_on_time']:.3f}"
    recall = "-" if not r["prefetches"] else f"{r['prefetch_recall']:.3f}"
    traffic = f"{r['bytes_per_token'] / 1e6:10.2f}" if with_bytes else f"{r['loads_per_token']:10.2f}"
    vs = "-" if r["misses_vs_belady"] is None else f"{r['misses_vs_belady']:.3f}"
    return (f"{label:<34} {r['capacity']:>6} {100 * r['cache_fraction']:6.1f}% {r['hit_rate']:8.4f} "
            f"{r['misses_per_token']:12.2f} {vs:>8} {traffic} {prec:>9} {on_time:>7} {recall:>7}")


def print_report(o: dict) -> None:
    with_bytes = o["expert_bytes"] is not None
    print(_header(o))
    print(f"{'':<34} {'slots':>6} {'cache':>7} {'hit rate':>8} {'misses/token':>12} {'/belady':>8} "
          f"{'MB/token' if with_bytes else 'loads/tok':>10} {'prefetch':>9} {'on time':>7} {'recall':>7}")
    rows = o["sweep"] if "sweep" in o else [o["result"], o["belady_bound"]]
    for i, r in enumerate(rows):
        if r["predictor"] == "none":
            label = r["policy"] + (" (bound, no prediction)" if r["policy"] == "belady" else "")
        else:
            oracle = " (upper bound)" if r["predictor"] == "oracle" else ""
            label = f"{r['policy']} + {r['predictor']}{oracle} d={r['depth']}"
        print(_row(label, r, with_bytes))
    if any(r["predictor"] == "oracle" for r in rows):
        print("oracle prefetch knows the true experts of the next layers: an upper bound for any predictor")
    if "plot" in o:
        print(f"hit-rate curves written to {o['plot']}")
    print("/belady = misses over Belady's (the offline optimum, no prefetch) at the same size; prefetch = precision (prefetch hits / prefetches; a hit may come visits later), on time = used by the "
          "visit predicted for; recall = prefetch hits / accesses; traffic counts misses + prefetches")
