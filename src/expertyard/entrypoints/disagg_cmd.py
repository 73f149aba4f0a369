"""`expertyard bench --disaggregate`, and the launch from flags that it shares with `serve --disaggregate`.

On one host the command starts every rank through torchrun's launcher (disagg/launch.py: launch_local). Under
`torchrun` (several hosts: `torchrun ... -m expertyard.entrypoints.cli serve --disaggregate ...`) each process is
already a rank, and runs its share directly.
"""

from __future__ import annotations

import functools
import os

import torch

from expertyard.device import resolve_device
from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.jobs import PREFILL_TOKENS_PER_STEP, bench_job
from expertyard.disagg.launch import exit_now, launch_local, rank_main
from expertyard.disagg.worker import ModelSource
from expertyard.engine.llm_engine import EngineConfig
from expertyard.entrypoints.common import async_scheduling
from expertyard.errors import ConfigError, DeploymentDownError
from expertyard.loader.bundled import bundled_model_path
from expertyard.synthetic import synthetic_hf_config


def micro_batch_list(args) -> list[int]:
    try:
        ms = [int(m) for m in str(args.micro_batches).split(",")]
    except ValueError:
        raise ConfigError(f"--micro-batches {args.micro_batches!r}: give integers in 1..4, comma-separated") from None
    for m in ms:
        DisaggConfig(micro_batches=m)  # validates
    return ms


def disagg_config(args) -> DisaggConfig:
    ms = micro_batch_list(args)
    common = {"micro_batches": ms[0], "dist_timeout": args.dist_timeout,
              "replicate": parse_replicate(args.replicate_experts)}
    if args.mode == "colocated":
        return DisaggConfig.colocated(args.attention_ranks + args.expert_ranks, **common)
    return DisaggConfig(attention_ranks=args.attention_ranks, expert_ranks=args.expert_ranks, **common)


def parse_replicate(text: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for part in filter(None, text.split(";")):
        try:
            layer, experts = part.split(":")
            out[int(layer)] = [int(e) for e in experts.split(",") if e]
        except ValueError:
            raise ConfigError(f"--replicate-experts {text!r}: expected LAYER:E,E;LAYER:E") from None
    return out


def model_source(args) -> ModelSource:
    if getattr(args, "synthetic", None):
        return ModelSource(hf_config=synthetic_hf_config(args.synthetic, args.num_layers), name=args.synthetic)
    path = args.model or bundled_model_path()
    return ModelSource(model_dir=path, name=path.name)


def device_and_dtype(args) -> tuple[str, torch.dtype]:
    """(device type, dtype): every rank takes its own device of that type (`cuda:LOCAL_RANK`)."""
    if getattr(args, "offload", False):
        raise ConfigError("--offload and --disaggregate do not combine yet")
    device, dtype = resolve_device(args.device, args.dtype)
    return device.type, dtype


def decode_graphs(args) -> bool | None:
    return False if args.eager_decode else None  # None: CUDA graphs wherever the ranks run on CUDA


def run_distributed(args, engine_config: EngineConfig, job, max_restarts: int = 0) -> object:
    """Start (or, under torchrun, join) the deployment; returns rank 0's job result on the process that has it."""
    cfg = disagg_config(args)
    source, (kind, dtype) = model_source(args), device_and_dtype(args)
    threads = max(1, (os.cpu_count() or 1) // cfg.world_size) if kind == "cpu" else None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: this process is one rank
        return rank_main(cfg, source, engine_config, kind, dtype, job, threads)
    try:
        return launch_local(cfg, source, engine_config, kind, dtype, job, threads, max_restarts)
    except DeploymentDownError as e:
        raise DeploymentDownError(f"the deployment went down: {e}") from None


# ---- bench --------------------------------------------------------------------------------------------

def bench(args, batch_sizes: list[int]) -> dict:
    ms = micro_batch_list(args)
    cfg = disagg_config(args)
    config = EngineConfig(max_num_seqs=max(batch_sizes), max_model_len=args.prompt_len + args.decode_tokens + 1,
                          max_num_batched_tokens=min(max(batch_sizes) * args.prompt_len, PREFILL_TOKENS_PER_STEP),
                          cuda_graphs=decode_graphs(args))
    job = functools.partial(bench_job, batch_sizes=batch_sizes, prompt_len=args.prompt_len,
                            decode_tokens=args.decode_tokens, ms=ms, seed=args.seed,
                            schedulings=tuple(async_scheduling(args, sweep=True)))
    runs = run_distributed(args, config, job)
    if runs is None:  # a follower rank under torchrun
        exit_now(0)
    kind, dtype = device_and_dtype(args)
    result = {"model": args.synthetic or str(args.model or "bundled"), "num_layers": args.num_layers,
              "mode": cfg.mode, "attention_ranks": cfg.attention_ranks if cfg.mode == "disaggregated" else None,
              "expert_ranks": cfg.expert_ranks if cfg.mode == "disaggregated" else None, "gpus": cfg.world_size,
              "device": kind, "dtype": str(dtype).removeprefix("torch."), "prompt_len": args.prompt_len,
              "decode_tokens": args.decode_tokens, "decode_graphs": kind == "cuda" and not args.eager_decode,
              "runs": []}
    for b, rows in runs.items():
        for r in rows:
            result["runs"].append({"batch": b, **r, "per_gpu_tokens_per_s": r["decode_tokens_per_s"] / cfg.world_size})
    return result


def print_bench_table(r: dict) -> None:
    shape = f"{r['attention_ranks']} attention + {r['expert_ranks']} expert ranks" if r["mode"] == "disaggregated" \
        else f"{r['gpus']} ranks"
    graphs = "decode from CUDA graphs" if r.get("decode_graphs") else "eager decode"
    print(f"{r['model']} ({r['dtype']}, {r['device']}): {r['mode']}, {shape}; prompt {r['prompt_len']}, "
          f"decode {r['decode_tokens']} tokens; {graphs}")
    print(f"{'batch':>5} {'m':>2} {'async':>5} {'decode tok/s':>13} {'tok/s/GPU':>10} {'TPOT ms':>8} "
          f"{'step ms p50':>11} {'max':>7}")
    for row in r["runs"]:
        flag = "on" if row.get("async_scheduling") else "off"
        print(f"{row['batch']:>5} {row['micro_batches']:>2} {flag:>5} {row['decode_tokens_per_s']:13.1f} "
              f"{row['per_gpu_tokens_per_s']:10.1f} {row['tpot_ms']:8.2f} {row.get('step_ms_median', 0):11.2f} "
              f"{row.get('step_ms_max', 0):7.2f}")
