"""Flags and set-up shared by the CLI commands: which model, which device, how to build the engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from expertyard.device import DTYPES
from expertyard.device import resolve_device as device_and_dtype
from expertyard.engine.collector import freeze_long_lived
from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.errors import ConfigError
from expertyard.experts.offload.budget import parse_size
from expertyard.experts.offload.config import OffloadConfig
from expertyard.experts.offload.host_loader import HostLoadedExperts
from expertyard.experts.resident import ResidentExperts
from expertyard.loader.bundled import bundled_model_path, load_tokenizer
from expertyard.loader.load import LoadedModel, load_model
from expertyard.quant.low_store import parse_low_precision


def model_path(args) -> Path:
    """--model as a local folder: the bundled model without one, a hub id's snapshot in the Hugging Face cache
    (loader/hub.py); resolved once per command."""
    if getattr(args, "resolved_model", None) is None:
        from expertyard.loader.hub import resolve_model

        model, revision = getattr(args, "model", None), getattr(args, "revision", None)
        if model is None and revision is not None:
            raise ConfigError(f"--revision {revision} needs --model ORG/NAME (a Hugging Face hub id)")
        args.resolved_model = bundled_model_path() if model is None else resolve_model(model, revision)
    return args.resolved_model


def add_model_args(p: argparse.ArgumentParser, synthetic: bool = False) -> None:
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path,
                     help="local Hugging Face model folder, or a hub id such as Qwen/Qwen3-30B-A3B (fetched once into "
                          "the Hugging Face cache: safetensors, config and tokenizer files; HF_HOME, HF_HUB_CACHE and "
                          "HF_HUB_OFFLINE=1 are honoured) (default: the bundled model)")
    if synthetic:
        from expertyard.synthetic import SYNTHETIC_MODELS

        src.add_argument("--synthetic", choices=sorted(SYNTHETIC_MODELS),
                         help="random weights with the exact shapes of a real model, built in memory")
        g.add_argument("--num-layers", type=int, help="shorten a --synthetic model to N layers")
    g.add_argument("--revision", default=None, help="with a hub id: branch, tag or commit (default: main)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: model's, <= 4096)")
    g.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded together")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run CUDA decode steps eagerly")
    g.add_argument("--async-scheduling", choices=["off", "on", "both"], default="off",
                   help="on: schedule and launch step t+1 before reading step t's tokens, so the host's work per "
                        "step hides behind the device's (a sequence ending on a stop token computes one extra, "
                        "discarded token); both: `bench --disaggregate` measures off and on side by side")
    g.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def add_offload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert offloading")
    g.add_argument("--offload", action="store_true",
                   help="keep experts in host memory behind a device expert cache (for models bigger than the GPU)")
    g.add_argument("--gpu-memory-budget", default=None,
                   help="all device bytes: weights, KV cache, workspace and expert cache, e.g. 24GiB")
    g.add_argument("--expert-cache-fraction", type=float, default=None,
                   help="instead of --gpu-memory-budget: the budget that fits this fraction of all experts "
                        "beside the resident weights, KV cache and workspace (printed)")
    g.add_argument("--host-memory-budget", default=None,
                   help="host bytes for expert copies; the rest stay in the safetensors files (disk tier)")
    g.add_argument("--policy", default=None, help="expert cache eviction policy: lru, lfu, hobbit, layer-distance, ... "
                                                  "(default: the engine's default policy)")
    g.add_argument("--predictor", default=None,
                   help="pre-gate predictor: none, next-gate, trained, oracle (with --routing-trace); default: "
                        "chosen by the engine")
    g.add_argument("--predictor-path", type=Path, default=None, help="trained predictor file (default: beside model)")
    g.add_argument("--prefetch-depth", type=int, default=1, help="MoE layers predicted ahead (1..3)")
    g.add_argument("--routing-trace", type=Path, default=None,
                   help="force the routers' choices from a recorded routing trace (.npz)")
    g.add_argument("--policy-weights", type=Path, default=None,
                   help="--policy hobbit: fitted weights (JSON from `expertyard simulate --fit-weights`; default: "
                        "hobbit-weights.json beside the model, else built-in)")
    g.add_argument("--low-precision", default=None, metavar="int4|int2|int8",
                   help="keep a low-precision copy of every expert beside the full one (HOBBIT): quantized at load, "
                        "or read from --low-precision-dir")
    g.add_argument("--low-precision-dir", type=Path, default=None,
                   help="directory of `expertyard quantize` files to load instead of quantizing at start-up "
                        "(default: the model directory, if it holds experts.intN.safetensors)")
    g.add_argument("--group-size", type=int, default=64, help="quantization group size when quantizing at load")
    g.add_argument("--precision", choices=["full", "mixed", "low"], default=None,
                   help="on a miss: full copies only; mixed = token-level precision (default with --low-precision); "
                        "low = every expert from its low copy (quality baseline)")
    g.add_argument("--precision-thresholds", default="0.6,0.9",
                   help="T1,T2: a miss whose gate-weight score <= T1 loads full precision, <= T2 low, else skip")
    g.add_argument("--low-pool-fraction", type=float, default=0.25,
                   help="share of the expert cache's bytes given to the low-precision pool")
    g.add_argument("--cpu-compute", choices=["auto", "on", "off"], default="auto",
                   help="compute missed experts on the host CPU from host memory: auto = per layer, where the "
                        "measured cost model says it finishes sooner than copying; on = every miss on the CPU")
    g.add_argument("--cpu-precision", choices=["full", "int8", "int4"], default="full",
                   help="weights the CPU computes misses from: full (the model's dtype), or int8 / int4 weight-only "
                        "copies made at load")
    g.add_argument("--cpu-threads", type=int, default=None,
                   help="threads for CPU expert compute (default: the physical cores)")
    g.add_argument("--stats", action="store_true", help="print expert cache, transfer and CPU statistics")
    g.add_argument("--timeline", type=Path, default=None,
                   help="write a Chrome trace of GPU compute, copies and each layer's CPU share")


OFFLOAD_ONLY_FLAGS = {name: None for name in (  # flag -> its default: anything else needs --offload
    "gpu_memory_budget", "expert_cache_fraction", "host_memory_budget", "policy", "predictor", "predictor_path",
    "policy_weights", "low_precision", "low_precision_dir", "precision", "timeline", "cpu_threads")} | {
    "cpu_compute": "auto", "cpu_precision": "full"}


def offload_config_from_args(args) -> OffloadConfig | None:
    """The OffloadConfig the flags ask for (None without --offload); every flag is checked before a model loads."""
    if not getattr(args, "offload", False):
        given = [f"--{name.replace('_', '-')}" for name, default in OFFLOAD_ONLY_FLAGS.items()
                 if getattr(args, name, default) != default]
        if given:
            raise ConfigError(f"{', '.join(given)} only act(s) on offloaded experts: add --offload (with "
                              "--gpu-memory-budget SIZE or --expert-cache-fraction F), or drop them")
        return None
    try:
        thresholds = tuple(float(v) for v in args.precision_thresholds.split(","))
    except ValueError:
        thresholds = ()
    if len(thresholds) != 2:
        raise ConfigError(f"--precision-thresholds {args.precision_thresholds!r}: write two numbers T1,T2, e.g. 0.6,0.9")
    return OffloadConfig(
        gpu_memory_budget=parse_size(args.gpu_memory_budget) if args.gpu_memory_budget else None,
        expert_cache_fraction=args.expert_cache_fraction,
        host_memory_budget=parse_size(args.host_memory_budget) if args.host_memory_budget else None,
        policy=args.policy, policy_weights=args.policy_weights, predictor=args.predictor,
        predictor_path=args.predictor_path, prefetch_depth=args.prefetch_depth,
        low_precision_bits=parse_low_precision(args.low_precision) if args.low_precision else None,
        low_precision_dir=args.low_precision_dir, group_size=args.group_size, precision=args.precision,
        precision_thresholds=thresholds, low_pool_fraction=args.low_pool_fraction, cpu_compute=args.cpu_compute,
        cpu_precision=args.cpu_precision, cpu_threads=args.cpu_threads, timeline=args.timeline is not None,
        progress=not args.json)


def resolve_device(args) -> tuple[torch.device, torch.dtype]:
    return device_and_dtype(args.device, args.dtype)


def load_from_args(args, device: torch.device, dtype: torch.dtype,
                   offload: OffloadConfig | None = None) -> tuple[LoadedModel, object]:
    """(model, tokenizer or None) for --model / --synthetic / the bundled default; with `offload` the experts
    go to host memory (the engine builds the expert cache from its budget plan)."""
    factory = HostLoadedExperts.factory(offload.host_memory_budget) if offload is not None else ResidentExperts
    if getattr(args, "synthetic", None):
        from expertyard.synthetic import build_synthetic

        loaded, tokenizer = build_synthetic(args.synthetic, args.num_layers, device, dtype, backend_factory=factory), None
    else:
        path = model_path(args)
        loaded = load_model(path, device, dtype, backend_factory=factory, progress=not args.json)
        tokenizer = load_tokenizer(path)
    if getattr(args, "routing_trace", None):
        from expertyard.layers.forced_routing import ForcedRouting

        experts = _read_trace_experts(args.routing_trace)
        loaded.model.force_routing(ForcedRouting(experts, loaded.config, device, str(args.routing_trace)))
    return loaded, tokenizer


def _read_trace_experts(path: Path):
    import numpy as np

    if not path.is_file():
        raise ConfigError(f"--routing-trace {path}: no such file")
    with np.load(path) as f:
        if "experts" not in f:
            raise ConfigError(f"{path}: not a routing trace (no 'experts' array)")
        return f["experts"]


def async_scheduling(args, sweep: bool = False) -> list[bool]:
    """--async-scheduling as the settings to run: [False], [True], or both when `sweep` allows it."""
    choice = getattr(args, "async_scheduling", "off")
    if choice == "both" and not sweep:
        raise ConfigError("--async-scheduling both is for `expertyard bench --disaggregate` (it measures off and on "
                          "side by side); here pick on or off")
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def engine_from_args(args, resident: bool = False, **config) -> LLMEngine:
    """The engine the flags ask for; `resident` ignores the offload flags (a full-precision reference)."""
    offload = None if resident else offload_config_from_args(args)
    device, dtype = resolve_device(args)
    loaded, tokenizer = load_from_args(args, device, dtype, offload)
    config = EngineConfig(**{"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                             "cuda_graphs": False if args.no_cuda_graphs else None, "offload": offload,
                             "async_scheduling": async_scheduling(args)[0], **config})
    engine = LLMEngine(loaded, tokenizer, config, **({"eos_token_ids": set()} if tokenizer is None else {}))
    if offload is not None and not args.json:
        print(engine.offload_plan.describe(), file=sys.stderr)
        print(engine.model.experts.describe(), file=sys.stderr)
    freeze_long_lived()  # start-up is over: full collections skip the model and libraries from here on
    return engine


def model_dir_of(args) -> Path | None:
    """The checkpoint directory a command runs (None for --synthetic): files beside it (pre-gate predictor,
    hobbit weights, quantized experts) are found there."""
    return None if getattr(args, "synthetic", None) else model_path(args)
