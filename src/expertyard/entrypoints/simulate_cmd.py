"""`expertyard simulate`: replay a routing trace through the engine's expert cache (policy, prefetch) and report
hit rate and traffic, always beside the offline optimum (Belady) for the same capacity."""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path

from expertyard.errors import ConfigError
from expertyard.experts.policies import POLICIES
from expertyard.experts.predictors import PREDICTOR_NAMES
from expertyard.trace.format import Trace, TraceError, load_trace
from expertyard.trace.simulate import Predictions, capacity_for, predict_trace, simulate_many

SWEEP_FRACTIONS = (0.10, 0.25, 0.50)
PREDICTORS = ["none", "oracle", *[p for p in PREDICTOR_NAMES if p != "none"]]


def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="replay a routing trace through the expert cache: hit rates, traffic",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace", type=Path, required=True, help="routing trace (.npz), e.g. from `expertyard trace`")
    p.add_argument("--policy", choices=sorted(POLICIES), default="lru", help="eviction policy")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache-fraction", type=float, help="cache slots as a fraction of all L x E routed experts")
    cache.add_argument("--cache-experts", type=int, help="cache slots (experts)")
    p.add_argument("--sweep", action="store_true",
                   help="table of every policy (lru, lfu, ..., belady) at 10%%, 25%%, 50%% cache instead of one run")
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
    from expertyard.entrypoints.simulate_mixed import add_mixed_args

    add_mixed_args(p)
    p.set_defaults(func=run)


def sweep_policies() -> list[str]:
    """Every registered online policy, lru and lfu first (belady is the bound, run beside them)."""
    return ["lru", "lfu", *sorted(set(POLICIES) - {"lru", "lfu", "belady"})]


def _model_path(args) -> Path:
    from expertyard.entrypoints.common import bundled_model_path

    return args.model or bundled_model_path()


def _config(path: Path):
    from expertyard.loader.checkpoint import read_hf_config
    from expertyard.loader.load import model_config_from_hf

    return model_config_from_hf(read_hf_config(path))


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def model_config_for(trace: Trace, args):
    """The trace's model config (`--model`, the bundled model, or the real shapes of a model expertyard knows)
    and its name for reports; (None, None) when unknown."""
    if args.model is not None:
        return _config(args.model), args.model.name
    if _norm(trace.model) == _norm(_model_path(args).name):
        return _config(_model_path(args)), f"bundled {trace.model}"
    from expertyard.synthetic import SYNTHETIC_MODELS, synthetic_hf_config
    from expertyard.loader.load import model_config_from_hf

    for name in SYNTHETIC_MODELS:  # real shapes of the models expertyard knows
        if _norm(name) in _norm(trace.model):
            return model_config_from_hf(synthetic_hf_config(name)), f"{name} shapes"
    return None, None


def expert_bytes_for(trace: Trace, args) -> tuple[int | None, str]:
    """Bytes of one routed expert and where the number comes from."""
    if args.expert_bytes is not None:
        if args.expert_bytes < 1:
            raise ConfigError(f"--expert-bytes {args.expert_bytes} must be >= 1")
        return args.expert_bytes, "--expert-bytes"
    cfg, name = model_config_for(trace, args)
    if cfg is None:
        return None, "unknown model: traffic in experts"
    return cfg.expert_bytes(2), f"bf16, {name}"


def load_predictions(trace: Trace, args) -> Predictions | None:
    if args.predictor == "none":
        return None
    if not 1 <= args.prefetch_depth <= 3:
        raise ConfigError(f"--prefetch-depth {args.prefetch_depth} must be 1, 2 or 3")
    if args.prefetch_depth >= trace.num_layers:
        raise ConfigError(f"--prefetch-depth {args.prefetch_depth} must be below the trace's {trace.num_layers} "
                          "MoE layers")
    if args.predictor == "oracle":
        return Predictions.oracle(args.prefetch_depth)
    if trace.hidden is None:
        raise TraceError(f"trace key 'hidden' is missing from {args.trace}: the {args.predictor} predictor reads "
                         "each MoE layer's input; record the trace with `expertyard trace --save-hidden`")
    import torch

    from expertyard.loader.load import load_model

    path = _model_path(args)
    loaded = load_model(path, "cpu", torch.float32, progress=not args.json)
    cfg = loaded.config
    if (len(cfg.moe_layers), cfg.moe.num_experts) != (trace.num_layers, trace.num_experts):
        raise ConfigError(f"the trace ({trace.model}) has {trace.num_layers} MoE layers x {trace.num_experts} "
                          f"experts, the model at {path} {len(cfg.moe_layers)} x {cfg.moe.num_experts}: pass the "
                          "--model the trace was recorded with")
    if trace.hidden is not None and trace.hidden.shape[2] != cfg.hidden_size:
        raise ConfigError(f"trace key 'hidden' has size {trace.hidden.shape[2]}, the model at {path} "
                          f"{cfg.hidden_size}: pass the --model the trace was recorded with")
    if args.predictor == "next-gate":
        from expertyard.experts.predictors import NextGatePredictor

        predictor = NextGatePredictor(loaded.model, args.prefetch_depth)
    else:
        try:
            from expertyard.experts.predictors.trained import TrainedPredictor
        except ImportError as e:
            raise ConfigError("the trained predictor is not available in this installation "
                              f"(expertyard.experts.predictors.trained: {e}); use next-gate or oracle") from e
        load = TrainedPredictor.load
        params = inspect.signature(load).parameters
        kwargs = {"depth": args.prefetch_depth} if "depth" in params else {}
        if args.predictor_path is not None:
            if "path" not in params:
                raise ConfigError("this trained predictor cannot load from --predictor-path; put it beside the model")
            kwargs["path"] = args.predictor_path
        predictor = load(path, loaded.model, **kwargs)
    return predict_trace(predictor, trace, list(cfg.moe_layers))


def policy_kwargs_for(args) -> dict:
    """hobbit's weights from --policy-weights (checked now, so a bad file fails before any replay)."""
    if args.policy_weights is None:
        return {}
    from expertyard.experts.policies import load_hobbit_weights

    if args.policy != "hobbit" and not args.sweep and args.fit_weights is None:
        raise ConfigError(f"--policy-weights is for --policy hobbit, not {args.policy}")
    return {"weights": load_hobbit_weights(args.policy_weights)}


def run(args) -> int:
    for flag, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens), ("--jobs", args.jobs)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if args.sweep and (args.cache_fraction is not None or args.cache_experts is not None):
        raise ConfigError("--sweep runs cache fractions 10%, 25% and 50%; drop --cache-fraction/--cache-experts")
    need_hidden = args.predictor in ("next-gate", "trained")
    full = load_trace(args.trace, hidden=need_hidden)
    if args.start_token:
        from expertyard.trace.fit_hobbit import slice_trace

        if not 0 <= args.start_token < full.num_tokens:
            raise ConfigError(f"--start-token {args.start_token} must be in 0..{full.num_tokens - 1}")
        full = slice_trace(full, args.start_token, full.num_tokens)
    trace = full.head(args.max_tokens) if args.max_tokens else full
    policy_kwargs = policy_kwargs_for(args)
    if args.precision == "mixed" or args.fit_weights is not None:
        from expertyard.entrypoints.simulate_mixed import run_mixed

        return run_mixed(args, trace, full, policy_kwargs)
    if args.sweep:
        capacities = [capacity_for(trace, cache_fraction=f) for f in SWEEP_FRACTIONS]
    else:
        capacities = [capacity_for(trace, args.cache_experts, args.cache_fraction)]
    expert_bytes, bytes_source = expert_bytes_for(trace, args)
    predictions = load_predictions(trace, args)
    policies = sweep_policies() if args.sweep else [args.policy]
    jobs = [dict(policy=p, capacity=c, batch_size=args.batch_size, predict=True, predictor_name=args.predictor,
                 **({"policy_kwargs": policy_kwargs} if p == "hobbit" and policy_kwargs else {}),
                 **({"adaptive": True} if args.adaptive_prefetch else {}))
            for c in capacities for p in policies]
    jobs += [dict(policy="belady", capacity=c, batch_size=args.batch_size, predict=False) for c in capacities]
    if not args.sweep and args.policy == "belady" and predictions is None:
        jobs = jobs[:1]  # the run is the bound
    results = [r.summary(expert_bytes) for r in simulate_many(trace, jobs, predictions, args.jobs)]
    total = trace.num_layers * trace.num_experts
    for r in results:
        r["cache_fraction"] = r["capacity"] / total
    out = {"trace": str(args.trace), "model": trace.model, "phase": trace.phase, "tokens": trace.num_tokens,
           "trace_tokens": full.num_tokens, "sequences": len(trace.seq_starts), "moe_layers": trace.num_layers,
           "num_experts": trace.num_experts, "top_k": trace.top_k, "batch_size": args.batch_size,
           "expert_bytes": expert_bytes, "expert_bytes_source": bytes_source}
    if args.sweep:
        order = {c: i for i, c in enumerate(capacities)}
        names = [*policies, "belady"]
        out["sweep"] = sorted(results, key=lambda r: (names.index(r["policy"]), order[r["capacity"]]))
    else:
        out["result"] = results[0]
        out["belady_bound"] = results[-1]
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
    return (f"{label:<34} {r['capacity']:>6} {100 * r['cache_fraction']:6.1f}% {r['hit_rate']:8.4f} "
            f"{r['misses_per_token']:12.2f} {traffic} {prec:>9} {on_time:>7} {recall:>7}")


def print_report(o: dict) -> None:
    with_bytes = o["expert_bytes"] is not None
    print(_header(o))
    print(f"{'':<34} {'slots':>6} {'cache':>7} {'hit rate':>8} {'misses/token':>12} "
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
    print("prefetch = precision (prefetch hits / prefetches; a hit may come visits later), on time = used by the "
          "visit predicted for; recall = prefetch hits / accesses; traffic counts misses + prefetches")
