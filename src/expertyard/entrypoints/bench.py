"""`expertyard bench`: prefill and decode throughput, achieved memory bandwidth, and transformers side by side."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch

from expertyard.bench.hardware import measure_copy_bandwidth
from expertyard.bench.offload import belady_miss_sets, resident_decode_ms
from expertyard.bench.transformers_baseline import TransformersBaseline
from expertyard.bench.weights import active_bytes_per_token
from expertyard.engine.collector import freeze_long_lived
from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.engine.sampling_params import SamplingParams
from expertyard.entrypoints.common import (add_model_args, add_offload_args, async_scheduling, engine_from_args,
                                          load_from_args, resolve_device)
from expertyard.entrypoints.disagg_flags import add_disagg_args
from expertyard.errors import ConfigError
from expertyard.experts.offload.build import build_offloaded_experts, plan_budget
from expertyard.loader.load import LoadedModel


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput benchmark (prefill, decode, batched), optionally vs transformers",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, synthetic=True)
    add_offload_args(p)
    add_disagg_args(p, bench=True)
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per sequence")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    p.add_argument("--compare", choices=["transformers", "accelerate"], default=None,
                   help="also run transformers' generate on the same weights, in the same process "
                        "(accelerate: with --offload, transformers + accelerate offload under the same GPU budget)")
    p.add_argument("--compare-decode-tokens", type=int, default=8, help="tokens the accelerate baseline decodes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids (and of sampling)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy decode; > 0: sample (seeded by --seed), so that random weights do not collapse "
                        "onto a few tokens and a few experts")
    p.add_argument("--hybrid-sweep", nargs="?", const="all", default=None, metavar="CONFIGS",
                   help="with --offload: measure side by side, on the same host copies and budget: copy-only, "
                        "CPU-only (every miss on the CPU), hybrid, hybrid-int4 (int4 CPU copies) and int4-both "
                        "(int4 device cache and int4 CPU compute from the same copies); a comma-separated subset "
                        "of those names, or all of them")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    p.set_defaults(func=run)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_engine(engine: LLMEngine, prompts: list[list[int]], decode_tokens: int, after_prefill=None,
                 temperature: float = 0.0, seed: int = 0) -> dict:
    """One batch: time of the prefill step, then of the decode steps. Greedy (or sampled), EOS ignored."""
    params = SamplingParams(temperature=temperature, max_tokens=decode_tokens, ignore_eos=True,
                            seed=seed if temperature > 0 else None)
    seqs = [engine.add_request(p, params) for p in prompts]
    _sync(engine.device)
    t0 = time.perf_counter()
    engine.step()  # all prompts fit in one step's token budget
    _sync(engine.device)
    if after_prefill is not None:
        after_prefill()
    t1 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    _sync(engine.device)
    t2 = time.perf_counter()
    assert all(len(s.output_token_ids) == decode_tokens for s in seqs)
    b, n = len(prompts), len(prompts[0])
    return {"prefill_tokens_per_s": b * n / (t1 - t0), "decode_tokens_per_s": b * (decode_tokens - 1) / (t2 - t1),
            "decode_ms_per_step": 1e3 * (t2 - t1) / (decode_tokens - 1)}


def run(args) -> int:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if min(batch_sizes) < 1 or args.prompt_len < 1 or args.decode_tokens < 2:
        raise ConfigError("--batch-sizes, --prompt-len must be >= 1 and --decode-tokens >= 2")
    if args.hybrid_sweep is not None:
        if not args.offload:
            raise ConfigError("--hybrid-sweep compares offloading configurations: add --offload")
        sweep_configs(args.hybrid_sweep)  # names checked before anything loads
    if args.disaggregate:  # decode tok/s, per GPU and TPOT for each m (docs/disaggregation.md)
        from expertyard.entrypoints.disagg_cmd import bench, print_bench_table

        return _emit(bench(args, batch_sizes), args, print_bench_table)
    if args.offload:
        return run_offloaded(args, batch_sizes)
    device, dtype = resolve_device(args)
    loaded, _ = load_from_args(args, device, dtype)
    max_len = args.prompt_len + args.decode_tokens + 1
    engine = LLMEngine(loaded, None, EngineConfig(
        max_num_seqs=max(batch_sizes), max_model_len=max_len, max_num_batched_tokens=max(batch_sizes) * args.prompt_len,
        cuda_graphs=False if args.no_cuda_graphs else None, async_scheduling=async_scheduling(args)[0]),
        eos_token_ids=set())
    freeze_long_lived()
    gen = torch.Generator().manual_seed(args.seed)
    vocab = loaded.config.vocab_size
    result = {"model": args.synthetic or str(args.model or "bundled"), "num_layers": loaded.config.num_layers,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "prompt_len": args.prompt_len,
              "decode_tokens": args.decode_tokens, "cuda_graphs": engine.runner.graphs is not None,
              "active_bytes_per_token": active_bytes_per_token(loaded.model), "runs": []}
    if device.type == "cuda":
        result["copy_bandwidth"] = measure_copy_bandwidth(device)

    baseline = TransformersBaseline(loaded, device, dtype) if args.compare == "transformers" else None
    for b in batch_sizes:
        prompts = torch.randint(0, vocab, (b, args.prompt_len), generator=gen).tolist()
        bench_engine(engine, prompts, args.decode_tokens)  # warm-up: captures this batch's CUDA graphs
        row = {"batch": b, "expertyard": bench_engine(engine, prompts, args.decode_tokens)}
        if baseline is not None:
            row["transformers"] = baseline.bench(prompts, args.decode_tokens)
            row["decode_speedup"] = row["expertyard"]["decode_tokens_per_s"] / row["transformers"]["decode_tokens_per_s"]
            row["prefill_speedup"] = row["expertyard"]["prefill_tokens_per_s"] / row["transformers"]["prefill_tokens_per_s"]
        result["runs"].append(row)
    first = result["runs"][0]
    if first["batch"] == 1:
        result["batch1_achieved_GBps"] = result["active_bytes_per_token"] * first["expertyard"]["decode_tokens_per_s"] / 1e9
    if device.type == "cuda":
        result["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return _emit(result, args, print_table)


def _emit(result: dict, args, print_fn) -> int:
    """Write the result to --out, and print it as JSON or as a table."""
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
    else:
        print_fn(result)
    return 0


HYBRID_SWEEP = {"copy-only": {"cpu_compute": "off"}, "CPU-only": {"cpu_compute": "on"},
                "hybrid": {"cpu_compute": "auto"}, "hybrid-int4": {"cpu_compute": "auto", "cpu_precision": "int4"},
                "int4-both": {"cpu_compute": "auto", "cpu_precision": "int4", "precision": "low",
                              "low_precision_bits": 4}}


def sweep_configs(names: str) -> list[str]:
    """The --hybrid-sweep rows asked for ("all", or a comma-separated subset of HYBRID_SWEEP's names)."""
    if names == "all":
        return list(HYBRID_SWEEP)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in chosen if n not in HYBRID_SWEEP]
    if bad or not chosen:
        raise ConfigError(f"--hybrid-sweep {names!r}: choose from {', '.join(HYBRID_SWEEP)} (comma-separated), or "
                          "give no value for all of them")
    return chosen
_SWEPT = {"cpu_compute": "auto", "cpu_precision": "full", "precision": None, "low_precision_bits": None}


def run_offloaded(args, batch_sizes: list[int]) -> int:
    """Offloaded decode: tokens/s, cache, transfer and CPU statistics, and the physical bound beside them."""
    engine = engine_from_args(args, max_num_seqs=max(batch_sizes),
                              max_model_len=args.prompt_len + args.decode_tokens + 1,
                              max_num_batched_tokens=max(batch_sizes) * args.prompt_len)
    cfg, device, plan = engine.model_config, engine.device, engine.offload_plan
    backend = engine.model.experts
    result = {"model": args.synthetic or str(args.model or "bundled"), "num_layers": cfg.num_layers,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(engine.dtype).removeprefix("torch."), "prompt_len": args.prompt_len,
              "decode_tokens": args.decode_tokens, "policy": backend.state.policy.name,
              "predictor": backend.predictor.name, "prefetch_depth": args.prefetch_depth,
              "routing": f"forced from {args.routing_trace}" if args.routing_trace else (
                  f"sampled at temperature {args.temperature}" if args.temperature > 0 else "greedy"),
              "budget": plan.describe(), "cache_slots": plan.slots, "expert_bytes": plan.expert_bytes,
              "cache_fraction": plan.slots / plan.total_experts, "runs": []}
    if device.type == "cuda":
        result["copy_bandwidth"] = measure_copy_bandwidth(device)
        torch.cuda.reset_peak_memory_stats(device)
    same_budget = {"gpu_memory_budget": plan.budget, "expert_cache_fraction": None}  # int4 slots: more of them
    configs = [(label, dataclasses.replace(engine.config.offload, **(_SWEPT | same_budget | HYBRID_SWEEP[label])))
               for label in sweep_configs(args.hybrid_sweep)] if args.hybrid_sweep else [(None, engine.config.offload)]
    resident_ms: dict[int, float | None] = {}
    for label, offload in configs:
        if offload is not engine.config.offload:
            previous = engine.model.experts.host
            engine.model.set_expert_backend(previous)  # the previous cache goes before the next one is allocated
            gc.collect()  # with its host copies (low-precision CPU copies are tens of GiB at Mixtral's size)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            engine.offload_plan = plan_budget(engine.model, offload, plan.kv_cache_bytes, engine.max_model_len,
                                              engine.config.max_num_batched_tokens, engine.dtype, device)
            engine.model.set_expert_backend(build_offloaded_experts(engine.model, offload, engine.offload_plan,
                                                                    engine.model_path))
        for b in batch_sizes:
            row = bench_offloaded_batch(engine, args, b, resident_ms, result.get("copy_bandwidth"))
            if engine.offload_plan.describe() != plan.describe():
                row["budget"] = engine.offload_plan.describe()
            result["runs"].append(({"config": label} if label else {}) | row)
    if args.timeline and engine.model.experts.timeline is not None:
        engine.model.experts.timeline.write(args.timeline)
    if args.compare == "accelerate" and device.type == "cuda":
        result["accelerate"] = compare_accelerate(engine, plan, args, result["runs"][0])
    return _emit(result, args, print_offload_table)


def bench_offloaded_batch(engine: LLMEngine, args, b: int, resident_ms: dict, copy_bandwidth: dict | None) -> dict:
    """One batch size on the engine's current backend; `resident_ms` caches the all-resident step per batch."""
    backend, cfg, plan = engine.model.experts, engine.model_config, engine.offload_plan
    gen = torch.Generator().manual_seed(args.seed + b)
    prompts = torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=gen).tolist()
    sample = {"temperature": args.temperature, "seed": args.seed}
    backend.visits = []  # from the warm-up on, so that the Belady replay starts from the same cache history
    bench_engine(engine, prompts, min(args.decode_tokens, 4), **sample)  # warm-up: Triton compilation
    marks = {}

    def after_prefill():
        backend.reset_stats(record_visits=True)
        marks["decode_from"] = len(backend.visits)

    row = {"batch": b, "expertyard": bench_engine(engine, prompts, args.decode_tokens, after_prefill, **sample)}
    steps = args.decode_tokens - 1
    tokens = b * steps  # decode tokens timed (the prefill step makes the first)
    row["offload"] = backend.report(tokens)
    visits, backend.visits = backend.visits, None
    belady = belady_miss_sets(visits, plan.slots, marks["decode_from"])
    row["belady_bytes_per_token"] = sum(map(len, belady)) * plan.expert_bytes / tokens
    if engine.device.type != "cuda":
        return row
    row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(engine.device)
    if b not in resident_ms:
        resident_ms[b] = resident_decode_ms(engine, prompts, args.decode_tokens,
                                            lambda e, p, n: bench_engine(e, p, n, **sample))
    if resident_ms[b] is None:
        return row
    row["resident_ms_per_step"] = resident_ms[b]
    link_ms = 1e3 * row["belady_bytes_per_token"] * b / (copy_bandwidth["h2d_pinned_GBps"] * 1e9)
    hybrid = backend.hybrid
    if hybrid is not None:  # the best per-layer split of the run's own misses, and of Belady's
        row["bound_ms_per_step"] = resident_ms[b] + 1e3 * hybrid.stats.bound_s / steps
        if len(hybrid.stats.visits) == len(belady):
            at_belady = [(counts, [e for _, e in miss]) for (counts, _), miss in zip(hybrid.stats.visits, belady)]
            row["belady_bound_ms_per_step"] = resident_ms[b] + 1e3 * hybrid.bound_s(at_belady) / steps
    else:  # copy-only: Belady's misses over the link
        row["bound_ms_per_step"] = resident_ms[b] + link_ms
    row["vs_bound"] = row["expertyard"]["decode_ms_per_step"] / row["bound_ms_per_step"]
    row["achieved_h2d_GBps"] = row["offload"]["bytes_per_token"] * row["expertyard"]["decode_tokens_per_s"] / 1e9
    return row


def compare_accelerate(engine: LLMEngine, plan, args, first_run: dict) -> dict:
    """transformers + accelerate offload (`device_map="auto"`, `max_memory` = the same GPU budget), batch 1."""
    from expertyard.bench.accelerate_baseline import accelerate_decode, accelerate_offloaded_model

    # max_memory is accelerate's planning limit, so expertyard's own allocations may stay while it runs
    loaded = LoadedModel(model=engine.model, config=engine.model_config, path=None)
    hf, device_map = accelerate_offloaded_model(loaded, plan.budget, engine.device)
    prompt = torch.randint(0, engine.model_config.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    out = accelerate_decode(hf, prompt, args.compare_decode_tokens, engine.device)
    out["modules_on_cpu"] = sum(1 for v in device_map.values() if v == "cpu")
    out["speedup"] = first_run["expertyard"]["decode_tokens_per_s"] / out["decode_tokens_per_s"]
    del hf
    torch.cuda.empty_cache()
    return out


def print_offload_table(r: dict) -> None:
    print(f"{r['model']} ({r['num_layers']} layers, {r['dtype']}) on {r['device']}, offloaded: {r['budget']}")
    print(f"policy {r['policy']}, predictor {r['predictor']} (depth {r['prefetch_depth']}); routing {r['routing']}")
    print(f"{'config':>12} {'batch':>5} {'tok/s':>8} {'ms/step':>8} {'bound ms':>9} {'x bound':>8} {'Belady ms':>10} "
          f"{'hit rate':>9} {'GB/tok':>7} {'CPU/tok':>8} {'Belady GB/tok':>14} {'routing p50':>12}")
    for row in r["runs"]:
        e, o = row["expertyard"], row["offload"]
        bound = f"{row['bound_ms_per_step']:9.2f} {row['vs_bound']:7.2f}x" if row.get("bound_ms_per_step") else " " * 18
        belady = f"{row['belady_bound_ms_per_step']:10.2f}" if "belady_bound_ms_per_step" in row else " " * 10
        cpu = f"{o['cpu_experts_per_token']:8.2f}" if "cpu_experts_per_token" in o else f"{'-':>8}"
        print(f"{row.get('config') or '':>12} {row['batch']:>5} {e['decode_tokens_per_s']:8.2f} "
              f"{e['decode_ms_per_step']:8.2f} {bound} {belady} {100 * o['hit_rate']:8.1f}% "
              f"{o['bytes_per_token'] / 1e9:7.2f} {cpu} {row['belady_bytes_per_token'] / 1e9:14.2f} "
              f"{o['routing_wait_us_p50']:9.0f} us")
    if "accelerate" in r:
        a = r["accelerate"]
        print(f"transformers + accelerate offload (same budget, batch 1): {a['decode_tokens_per_s']:.2f} tok/s "
              f"-> expertyard {a['speedup']:.1f}x")


def print_table(r: dict) -> None:
    print(f"{r['model']} ({r['num_layers']} layers, {r['dtype']}) on {r['device']}; prompt {r['prompt_len']}, "
          f"decode {r['decode_tokens']} tokens; CUDA graphs {'on' if r['cuda_graphs'] else 'off'}")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8} {'hf decode tok/s':>16} {'speedup':>8}")
    for row in r["runs"]:
        e, t = row["expertyard"], row.get("transformers")
        hf = f"{t['decode_tokens_per_s']:16.1f} {row['decode_speedup']:7.2f}x" if t else ""
        print(f"{row['batch']:>5} {e['prefill_tokens_per_s']:14.1f} {e['decode_tokens_per_s']:13.1f} "
              f"{e['decode_ms_per_step']:8.2f} {hf}")
    if "batch1_achieved_GBps" in r:
        line = f"batch-1 decode moves {r['active_bytes_per_token'] / 1e9:.3f} GB/token -> {r['batch1_achieved_GBps']:.0f} GB/s"
        if "copy_bandwidth" in r:
            line += f" (device copy peak {r['copy_bandwidth']['d2d_GBps']:.0f} GB/s read+write)"
        print(line)
