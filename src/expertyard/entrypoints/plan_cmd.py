"""`expertyard plan`: deployment plans for disaggregated expert parallelism (MegaScale-Infer, Algorithm 1).

  expertyard plan --synthetic mixtral-8x22b --gpus 64 [--slo-tpot 150] [--gpu h100 --expert-gpu h20]
  expertyard plan predict --synthetic mixtral-8x7b --attention-ranks 1 --expert-ranks 1 --micro-batches 3 --batch 96
  expertyard plan calibrate --synthetic mixtral-8x7b --device cuda --out h200.json
  expertyard plan table --gpus 8,16,...,1024 --markdown
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from expertyard.bench.plan_calibrate import calibrate
from expertyard.entrypoints.common import DTYPES, resolve_device
from expertyard.errors import ConfigError
from expertyard.plan.colocated import best_colocated, predict_colocated
from expertyard.plan.model_costs import model_costs
from expertyard.plan.model_specs import model_config_for, model_label, plan_model_names
from expertyard.plan.perf_model import Deployment, PerfModel, Workload, predict
from expertyard.plan.profiles import BUILTIN, load_profile
from expertyard.plan.report import CANDIDATE_HEADERS, candidate_rows, describe_prediction, table
from expertyard.plan.search import Constraints, best_plan, search

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PAPER_TABLE_MODELS = ("mixtral-8x22b", "dbrx", "scaled-moe-317b")
TABLE_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="local Hugging Face model directory (only config.json is read); "
                                                "default: the bundled model")
    src.add_argument("--synthetic", choices=plan_model_names(), help="a model shape by name (no weights)")
    p.add_argument("--num-layers", type=int, default=None, help="shorten a --synthetic model to N layers")


def _hardware_args(p: argparse.ArgumentParser, workload: bool = True) -> None:
    p.add_argument("--gpu", "--profile", dest="gpu", default="h200",
                   help="GPU profile of the attention nodes (and of the expert nodes without --expert-gpu): "
                        "h200, h100, a100, l40s, h20, or a JSON file from `plan calibrate`")
    p.add_argument("--expert-gpu", "--expert-profile", dest="expert_gpu", default=None,
                   help="GPU profile of the expert nodes (heterogeneous deployment); default: --gpu")
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour of the attention GPUs (overrides)")
    p.add_argument("--expert-price", type=float, default=None, help="USD per GPU-hour of the expert GPUs")
    p.add_argument("--step-overhead-ms", type=float, default=None,
                   help="the driver rank's host work per decode iteration, which every GPU waits for (scheduling, "
                        "planning, the step header, sampling); overrides the profile's (0 in built-in profiles; "
                        "~3 ms measured on 4 x H200, docs/plan.md)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="the deployment runs with --async-scheduling: the driver's host work overlaps the GPUs' "
                        "(an iteration takes the longer of the two instead of their sum)")
    if workload:
        p.add_argument("--context-len", type=int, default=2048, help="mean cached tokens per decoding sequence")
        p.add_argument("--max-len", type=int, default=None,
                       help="KV-cache tokens reserved per sequence (memory); default: --context-len")
        p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16", help="weights and KV cache")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slo-tpot", type=float, default=None, help="time per output token bound, milliseconds")
    p.add_argument("--balance-tolerance", type=float, default=0.2, help="|T_a - T_e| <= this fraction of T_f")
    p.add_argument("--max-micro-batches", type=int, default=8, help="m is searched over 2..this")
    p.add_argument("--objective", choices=["throughput", "per-cost"], default="throughput",
                   help="rank by total decode tokens/s of the N GPUs, or by tokens per USD")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="deployment plans for disaggregated attention/expert serving "
                                    "(plan [search] | predict | calibrate | table)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Without a subcommand: search the best deployment of a model on --gpus N GPUs.")
    _model_args(p)
    p.add_argument("--gpus", type=int, default=None, help="GPUs available (total, attention + expert)")
    p.add_argument("--top", type=int, default=10, help="candidates listed")
    _search_args(p)
    _hardware_args(p)
    p.set_defaults(func=run_search)
    ps = p.add_subparsers(dest="plan_command")

    pr = ps.add_parser("predict", help="predicted decode TPOT and throughput of one given deployment",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_args(pr)
    pr.add_argument("--attention-ranks", type=int, required=True, help="GPUs running attention (n_a * tp_a)")
    pr.add_argument("--expert-ranks", type=int, required=True, help="GPUs running experts (n_e * tp_e)")
    pr.add_argument("--micro-batches", type=int, required=True, help="m, micro-batches per attention node")
    pr.add_argument("--batch", type=int, required=True, help="global batch B: sequences decoded together")
    pr.add_argument("--tp-attention", type=int, default=1, help="tp_a, GPUs per attention node")
    pr.add_argument("--tp-expert", type=int, default=1, help="tp_e, GPUs per expert node")
    pr.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated",
                    help="colocated: every one of the attention + expert ranks runs both (bench --mode colocated); "
                         "m = 1, no tensor parallelism")
    _hardware_args(pr)
    pr.set_defaults(func=run_predict)

    pc = ps.add_parser("calibrate", help="time the attention step, fused_moe and NCCL send/recv; write a profile",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_args(pc)
    pc.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    pc.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    pc.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")
    pc.add_argument("--base-profile", default=None,
                    help="built-in profile for what is not measured (network, peaks, price); default: matched "
                         "from the GPU's name, else h200")
    pc.add_argument("--name", default=None, help="profile name (default: BASE-calibrated)")
    pc.add_argument("--context-len", type=int, default=None, help="KV length of the attention timing "
                                                                   "(default 2048 on CUDA, 128 on CPU; also /4)")
    pc.add_argument("--batch-sizes", default=None, help="comma-separated attention micro-batch sizes")
    pc.add_argument("--pairs", default=None, help="comma-separated (token, expert) row counts for fused_moe")
    pc.add_argument("--repeats", type=int, default=None, help="timed calls per point")
    pc.add_argument("--no-cuda-graphs", action="store_true", help="time eagerly instead of CUDA-graph replays")
    pc.add_argument("--no-comm", action="store_true", help="skip the NCCL send/recv measurement")
    step = pc.add_mutually_exclusive_group()
    step.add_argument("--step-term", dest="step", action="store_true", default=None,
                      help="measure T_step, the driver's host work per decode iteration, with two null deployments "
                           "(1 attention + 1 expert rank, the model cut to its first MoE layer and one more); "
                           "default: on CUDA when two GPUs are visible; this forces it on CPU (gloo)")
    step.add_argument("--no-step-term", dest="step", action="store_false", default=None,
                      help="skip the T_step measurement (the profile keeps the base profile's, 0)")
    pc.add_argument("--step-batch-sizes", default=None,
                    help="comma-separated decode batches of the T_step measurement (default 16,256,1024 on CUDA, "
                         "2,8 on CPU)")
    pc.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    pc.set_defaults(func=run_calibrate)

    pt = ps.add_parser("table", help="best plans of several models over GPU counts (docs/plan.md)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pt.add_argument("--synthetic", default=",".join(PAPER_TABLE_MODELS), help="comma-separated model names")
    pt.add_argument("--gpus", default=",".join(map(str, TABLE_GPUS)), help="comma-separated GPU counts")
    pt.add_argument("--markdown", action="store_true", help="a Markdown table")
    _search_args(pt)
    _hardware_args(pt)
    pt.set_defaults(func=run_table)


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not vals or min(vals) < 1:
        raise ConfigError(f"{flag} {text!r}: expected positive integers")
    return vals


def _perf_model(args, synthetic: str | None = None, model: Path | None = None, num_layers: int | None = None):
    # the step overhead goes into both profiles: equal profiles mean one GPU type (PerfModel.link_gbps)
    attn = load_profile(args.gpu).with_price(args.price).with_step_overhead(args.step_overhead_ms)
    expert = load_profile(args.expert_gpu or args.gpu).with_price(args.expert_price if args.expert_gpu else
                                                                 (args.expert_price or args.price))
    expert = expert.with_step_overhead(args.step_overhead_ms)
    cfg = model_config_for(synthetic, model, num_layers)
    return PerfModel(model_costs(cfg, DTYPE_BYTES[args.dtype]), attn, expert, Workload(args.context_len, args.max_len),
                     async_scheduling=args.async_scheduling)


def _constraints(args):
    return Constraints(slo_tpot_s=None if args.slo_tpot is None else args.slo_tpot / 1e3,
                       balance_tolerance=args.balance_tolerance, max_micro_batches=args.max_micro_batches,
                       objective=args.objective)


def _hardware_label(pm) -> str:
    a, e = pm.ha, pm.he
    return f"{a.name} ({a.kind})" if a == e else f"{a.name} ({a.kind}) for attention, {e.name} ({e.kind}) for experts"


def _versus_colocated(co, gpus: int, tpot_s: float, throughput: float, what: str, price: float | None) -> str:
    """One line: `co`, the best colocated-EP deployment of the same GPUs with a TPOT no longer than `tpot_s` (the
    SLO, or the plan's own TPOT), its tokens per USD at `price` per GPU-hour, and the plan's throughput over it."""
    if co is None:
        return f"  colocated EP on {gpus} GPUs: no batch fits memory within TPOT {tpot_s * 1e3:.2f} ms"
    per_usd = f", {co.total_throughput * 3600 / (co.unit * co.replicas * price):,.0f} tokens per USD" if price else ""
    return (f"  colocated EP on the same {gpus} GPUs within TPOT {tpot_s * 1e3:.2f} ms (its best batch: {co.batch} "
            f"per unit of {co.unit} GPUs x {co.replicas}): TPOT {co.tpot * 1e3:.2f} ms, {co.total_throughput:,.0f} "
            f"tok/s{per_usd}; {what} is {throughput / co.total_throughput:.2f}x colocated")


def run_search(args) -> int:
    if args.gpus is None:
        raise ConfigError("expertyard plan needs --gpus N (or a subcommand: predict, calibrate, table)")
    pm = _perf_model(args, args.synthetic, args.model, args.num_layers)
    label = model_label(args.synthetic, args.model, args.num_layers)
    cons = _constraints(args)
    best = best_plan(pm, args.gpus, cons, label)
    plans = search(pm, args.gpus, cons)[: args.top]
    same_tpot = cons.slo_tpot_s or best.prediction.tpot
    co = best_colocated(pm, args.gpus, same_tpot) if pm.ha == pm.he else None  # colocated runs on one GPU type
    if args.json:
        print(json.dumps({"model": label, "gpus": args.gpus, "attention_profile": pm.ha.name,
                          "expert_profile": pm.he.name, "context_len": args.context_len, "slo_tpot_ms": args.slo_tpot,
                          "best": best.to_dict(), "candidates": [p.to_dict() for p in plans],
                          "colocated": co.to_dict() if co else None}))
        return 0
    slo = f", TPOT SLO {args.slo_tpot:g} ms" if args.slo_tpot else ""
    print(f"best plan for {label} on {args.gpus} GPUs, {_hardware_label(pm)}, context {args.context_len}{slo}:")
    print(f"  {best.replicas} replica(s) of the unit below: {best.gpus_used} of {args.gpus} GPUs, "
          f"{best.total_throughput:,.0f} decode tok/s in total")
    print("\n".join(describe_prediction(best.prediction, pm.ha.usable_bytes, pm.he.usable_bytes, pm.async_scheduling)))
    if pm.ha == pm.he:
        print(_versus_colocated(co, args.gpus, same_tpot, best.total_throughput, "the best plan",
                                pm.ha.price_per_hour))
    print(f"\ntop {len(plans)} candidates (the best n_a for each tp_a, tp_e, n_e, m; times per layer):")
    print(table(CANDIDATE_HEADERS, candidate_rows(plans)))
    return 0


def run_predict(args) -> int:
    if args.mode == "colocated":
        return _predict_colocated(args)
    for flag, ranks, tp in (("--attention-ranks", args.attention_ranks, args.tp_attention),
                            ("--expert-ranks", args.expert_ranks, args.tp_expert)):
        if ranks < 1 or tp < 1 or ranks % tp:
            raise ConfigError(f"{flag} {ranks} must be a positive multiple of its tensor-parallel size {tp}")
    n_a, n_e, m = args.attention_ranks // args.tp_attention, args.expert_ranks // args.tp_expert, args.micro_batches
    if m < 1 or args.batch < 1 or args.batch % (n_a * m):
        raise ConfigError(f"--batch {args.batch} must be a positive multiple of attention nodes x micro-batches = "
                          f"{n_a} x {m} = {n_a * m} (each micro-batch of each attention node holds batch/{n_a * m})")
    pm = _perf_model(args, args.synthetic, args.model, args.num_layers)
    label = model_label(args.synthetic, args.model, args.num_layers)
    q = predict(pm, Deployment(args.tp_attention, args.tp_expert, n_a, n_e, m, args.batch // (n_a * m)))
    gpus = q.deployment.gpus
    co = predict_colocated(pm, gpus, args.batch) if pm.c.num_experts % gpus == 0 and pm.ha == pm.he else None
    if args.json:
        print(json.dumps({"model": label, "attention_profile": pm.ha.name, "expert_profile": pm.he.name,
                          "context_len": args.context_len, **q.to_dict(), "tpot_ms": q.tpot * 1e3,
                          "colocated": co.to_dict() if co else None}))
        return 0
    print(f"predicted decode of {label} on {_hardware_label(pm)}, context {args.context_len}:")
    print("\n".join(describe_prediction(q, pm.ha.usable_bytes, pm.he.usable_bytes, pm.async_scheduling)))
    if co is not None:
        print(f"  colocated EP on the same {gpus} GPUs at batch {args.batch}: TPOT {co.tpot * 1e3:.2f} ms, "
              f"{co.per_gpu:,.0f} tok/s per GPU{'' if co.fits_memory else ' (DOES NOT FIT)'}; this deployment is "
              f"{q.per_gpu / co.per_gpu:.2f}x colocated")
    return 0


def _predict_colocated(args) -> int:
    gpus = args.attention_ranks + args.expert_ranks
    if args.attention_ranks < 0 or args.expert_ranks < 0 or gpus < 1:
        raise ConfigError(f"--attention-ranks {args.attention_ranks} + --expert-ranks {args.expert_ranks}: colocated "
                          "ranks must add up to at least 1")
    if args.micro_batches != 1 or args.tp_attention != 1 or args.tp_expert != 1:
        raise ConfigError("--mode colocated models m = 1 without tensor parallelism: pass --micro-batches 1 and "
                          "drop --tp-attention/--tp-expert")
    if args.batch % gpus:
        raise ConfigError(f"--batch {args.batch} must be a multiple of the {gpus} colocated ranks")
    pm = _perf_model(args, args.synthetic, args.model, args.num_layers)
    if pm.c.num_experts % gpus:
        raise ConfigError(f"{gpus} colocated ranks cannot split {pm.c.num_experts} experts evenly; use a divisor")
    label = model_label(args.synthetic, args.model, args.num_layers)
    co = predict_colocated(pm, gpus, args.batch)
    if args.json:
        print(json.dumps({"model": label, "attention_profile": pm.ha.name, "context_len": args.context_len,
                          **co.to_dict(), "tpot_ms": co.tpot * 1e3}))
        return 0
    host = "overlapping the GPUs (async scheduling)" if pm.async_scheduling else "serial with the GPUs"
    print(f"predicted decode of {label} on {_hardware_label(pm)}, context {args.context_len}, colocated EP:")
    print(f"  {gpus} GPUs, each attention for {args.batch // gpus} sequences and {pm.c.num_experts // gpus} experts "
          f"per MoE layer, all-to-all dispatch and combine")
    print(f"  per layer: T_a {co.t_a * 1e3:.3f} ms, T_e {co.t_e * 1e3:.3f} ms, T_c {co.t_c * 1e3:.3f} ms (serial); "
          f"LM head {co.t_h * 1e3:.3f} ms; driver host work {co.t_step * 1e3:.3f} ms per iteration, {host}")
    print(f"  memory per GPU: {co.mem_bytes / 1e9:.1f} GB of {pm.ha.usable_bytes / 1e9:.1f} usable"
          f"{'' if co.fits_memory else ' (DOES NOT FIT)'}")
    print(f"  TPOT {co.tpot * 1e3:.2f} ms; decode throughput {co.throughput:,.0f} tok/s, "
          f"{co.per_gpu:,.0f} tok/s per GPU")
    return 0


def run_calibrate(args) -> int:
    import torch

    device, dtype = resolve_device(args)
    base = args.base_profile
    if base is None:
        gpu = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else ""
        base = next((name for name in BUILTIN if name in gpu), "h200")
    label = model_label(args.synthetic, args.model, args.num_layers)
    step_batches = _ints(args.step_batch_sizes, "--step-batch-sizes") if args.step_batch_sizes else None
    if step_batches and args.step is False:
        raise ConfigError("--step-batch-sizes was given with --no-step-term: drop one")
    profile = calibrate(model_config_for(args.synthetic, args.model, args.num_layers), label, device,
                        DTYPES[args.dtype] if args.dtype else dtype, load_profile(base), name=args.name,
                        context_len=args.context_len,
                        batches=_ints(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None,
                        pairs=_ints(args.pairs, "--pairs") if args.pairs else None, repeats=args.repeats,
                        graphs=not args.no_cuda_graphs, comm=not args.no_comm, step=args.step,
                        step_batches=step_batches)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(profile.to_json() + "\n")
    if args.json:
        print(profile.to_json().replace("\n", " "))
        return 0
    print(f"wrote {args.out}: {profile.name} ({profile.gpu})")
    for f in profile.fits:
        what = ", ".join(f"{k}={f[k]}" for k in ("experts", "context_len") if k in f)
        if "null_layers" in f:
            what = "layers=" + ",".join(map(str, f["null_layers"]))
        print(f"  {f['module']:<9} {what:<16} t = {f['k_slope'] * 1e6:.4f} us * x + {f['k_intercept'] * 1e6:.1f} us"
              f"   (x = {f['x']}; max relative error {f['max_rel_err']:.1%})")
    print(f"  effective: weights {profile.weight_gbps:,.1f} GB/s, KV {profile.kv_gbps:,.1f} GB/s, attention "
          f"{profile.attn_tflops:,.2f} TFLOPS, experts {profile.expert_tflops:,.2f} TFLOPS, overheads "
          f"{profile.attn_overhead_us:.1f} / {profile.expert_overhead_us:.1f} us, link "
          f"{profile.intra_host_gbps:,.1f} GB/s + {profile.link_latency_us:.1f} us")
    print(f"  step term: T_step(B) = {profile.step_overhead_us / 1e3:.3f} ms + "
          f"{profile.step_overhead_per_seq_us:.3f} us * B per decode iteration")
    print(f"  exchange term: T_x(b) = {profile.exchange_overhead_us:.1f} us + "
          f"{profile.exchange_overhead_per_token_us:.3f} us * b per MoE layer and micro-batch")
    for f in profile.fits:
        if f["module"] == "step":
            _print_null_deployments(f)
    for key, source in profile.sources.items():
        if key != "calibration":
            print(f"  {key}: {source}")
    return 0


def _print_null_deployments(f: dict) -> None:
    l1, l2 = f["null_layers"]
    steps = dict(f["points"])
    for (b, t1, t2), (_, head) in zip(f["null_tpots"], f["lm_head"]):
        print(f"    B={b:<5} TPOT({l1}) {t1 * 1e3:.3f} ms, TPOT({l2}) {t2 * 1e3:.3f} ms, LM head {head * 1e3:.3f} ms"
              f" -> T_step {steps[b] * 1e3:.3f} ms")


def run_table(args) -> int:
    models = [m.strip() for m in args.synthetic.split(",") if m.strip()]
    gpus = _ints(args.gpus, "--gpus")
    cons = _constraints(args)
    headers = ["model", "GPUs", "tp_a x n_a", "tp_e x n_e", "m", "b_a", "batch/unit", "unit x reps", "TPOT ms",
               "tok/s", "tok/s/GPU", "tok/USD", "x colocated"]
    rows, records = [], []
    for name in models:
        pm = _perf_model(args, name)
        for n in gpus:
            try:
                plan = best_plan(pm, n, cons, name)
            except ConfigError as e:
                rows.append([name, str(n), *["-"] * 10, ""])
                records.append({"model": name, "gpus": n, "error": str(e)})
                if not args.json:
                    print(f"# {name} on {n} GPUs: {e}", file=sys.stderr)
                continue
            q, d = plan.prediction, plan.prediction.deployment
            co = best_colocated(pm, n, cons.slo_tpot_s or q.tpot) if pm.ha == pm.he else None  # at the same TPOT
            rows.append([name, str(n), f"{d.tp_a} x {d.n_a}", f"{d.tp_e} x {d.n_e}", str(d.m), str(d.b_a),
                         str(d.global_batch), f"{d.gpus} x {plan.replicas}", f"{q.tpot * 1e3:.1f}",
                         f"{plan.total_throughput:,.0f}", f"{q.per_gpu:,.0f}",
                         "-" if q.per_dollar is None else f"{q.per_dollar:,.0f}",
                         "-" if co is None else f"{plan.total_throughput / co.total_throughput:.2f}"])
            records.append({"model": name, "gpus": n, **plan.to_dict(), "colocated": co.to_dict() if co else None})
    if args.json:
        print(json.dumps({"profile": args.gpu, "expert_profile": args.expert_gpu or args.gpu, "plans": records}))
    else:
        print(table(headers, rows, markdown=args.markdown))
    return 0
