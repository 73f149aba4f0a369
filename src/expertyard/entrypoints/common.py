"""Flags and set-up shared by the CLI commands: which model, which device, how to build the engine."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from expertyard import assets
from expertyard.engine.collector import freeze_long_lived
from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.errors import ConfigError
from expertyard.experts.resident import ResidentExperts
from expertyard.loader.load import LoadedModel, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_model_path() -> Path:
    """The small MoE trained by the project and shipped inside the package."""
    return assets.bundled_model_path()


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
                   help="keep experts in host memory behind a GPU expert cache (for models bigger than the GPU)")
    g.add_argument("--gpu-memory-budget", default=None,
                   help="all device bytes: weights, KV cache, workspace and expert cache, e.g. 24GiB")
    g.add_argument("--expert-cache-fraction", type=float, default=None,
                   help="instead of --gpu-memory-budget: the budget that fits this fraction of all experts "
                        "beside the resident weights, KV cache and workspace (printed)")
    g.add_argument("--host-memory-budget", default=None,
                   help="host bytes for expert copies; the rest stay in the safetensors files (disk tier)")
    g.add_argument("--policy", default="lru", help="expert cache eviction policy: lru, lfu, ...")
    g.add_argument("--predictor", default="next-gate",
                   help="pre-gate predictor: none, next-gate, trained, oracle (with --routing-trace)")
    g.add_argument("--predictor-path", type=Path, default=None, help="trained predictor file (default: beside model)")
    g.add_argument("--prefetch-depth", type=int, default=1, help="layers predicted ahead (1..3)")
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
    g.add_argument("--stats", action="store_true", help="print expert cache and transfer statistics")
    g.add_argument("--timeline", type=Path, default=None, help="write a Chrome trace of compute and copy spans")


def resolve_device(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def load_from_args(args, device: torch.device, dtype: torch.dtype) -> tuple[LoadedModel, object]:
    """(model, tokenizer or None) for --model / --synthetic / the bundled default; with --offload the experts
    go to the host store (the expert cache is configured later, by `configure_offload`)."""
    factory = ResidentExperts
    if getattr(args, "offload", False):
        from expertyard.experts.budget import parse_size
        from expertyard.experts.offloaded import OffloadedExperts

        host = parse_size(args.host_memory_budget) if args.host_memory_budget else None
        factory = lambda cfg, dev, dt: OffloadedExperts(cfg, dev, dt, host)  # noqa: E731
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


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: no usable tokenizer files ({e})") from e


def async_scheduling(args, sweep: bool = False) -> list[bool]:
    """--async-scheduling as the settings to run: [False], [True], or both when `sweep` allows it."""
    choice = getattr(args, "async_scheduling", "off")
    if choice == "both" and not sweep:
        raise ConfigError("--async-scheduling both is for `expertyard bench --disaggregate` (it measures off and on "
                          "side by side); here pick on or off")
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def engine_from_args(args, **config) -> LLMEngine:
    device, dtype = resolve_device(args)
    loaded, tokenizer = load_from_args(args, device, dtype)
    offload = getattr(args, "offload", False)
    config = EngineConfig(**{"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                             "cuda_graphs": False if args.no_cuda_graphs else None,
                             "async_scheduling": async_scheduling(args)[0], **config})
    engine = LLMEngine(loaded, tokenizer, config, **({"eos_token_ids": set()} if tokenizer is None else {}))
    if offload:
        configure_offload(engine, args)
    freeze_long_lived()  # start-up is over: full collections skip the model and libraries from here on
    return engine


def configure_offload(engine: LLMEngine, args) -> None:
    """Split the GPU budget, allocate the expert cache and pick policy and predictor."""
    from expertyard.engine.kv_cache import kv_cache_bytes
    from expertyard.experts.budget import parse_size, plan_gpu_budget, workspace_bytes

    if bool(args.gpu_memory_budget) == (args.expert_cache_fraction is not None):
        raise ConfigError("--offload needs one of --gpu-memory-budget SIZE (e.g. 24GiB) or --expert-cache-fraction F")
    model, cfg, backend = engine.model, engine.model_config, engine.model.experts
    elt = torch.empty((), dtype=engine.dtype).element_size()
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = kv_cache_bytes(model, engine.config.max_num_seqs + 1, engine.max_model_len, engine.dtype)
    workspace = workspace_bytes(cfg, engine.config.max_num_batched_tokens, engine.max_model_len, elt)
    if args.expert_cache_fraction is not None:
        if not 0 < args.expert_cache_fraction <= 1:
            raise ConfigError(f"--expert-cache-fraction {args.expert_cache_fraction} must be in (0, 1]")
        slots = math.ceil(args.expert_cache_fraction * len(backend.keys))
        budget = resident + kv + workspace + slots * backend.expert_bytes
    else:
        budget = parse_size(args.gpu_memory_budget)
    plan = plan_gpu_budget(budget, cfg, resident, kv, workspace, backend.expert_bytes)
    if not args.json:
        print(plan.describe(), file=sys.stderr)
    predictor = make_predictor(args, model)
    model_dir = model_dir_of(args)
    precision = args.precision or ("mixed" if args.low_precision else "full")
    if precision != "full" and not args.low_precision:
        raise ConfigError(f"--precision {precision} needs low-precision copies: add --low-precision int4 (or int2, int8)")
    if precision == "full":
        backend.configure(plan.slots, make_cache_policy(args, model_dir), predictor,
                          timeline=args.timeline is not None)
    else:
        configure_low_precision(engine, args, plan, predictor, model_dir, precision)
    engine.offload_plan = plan


def make_cache_policy(args, model_dir: Path | None):
    from expertyard.experts.policies import make_policy

    if args.policy != "hobbit":
        if args.policy_weights is not None:
            raise ConfigError(f"--policy-weights is for --policy hobbit, not {args.policy}")
        return make_policy(args.policy)
    from expertyard.experts.policies.hobbit_weights import load_hobbit_weights

    path = args.policy_weights
    if path is None and model_dir is not None and (Path(model_dir) / "hobbit-weights.json").is_file():
        path = Path(model_dir) / "hobbit-weights.json"
    return make_policy("hobbit", weights=load_hobbit_weights(path)) if path else make_policy("hobbit")


def configure_low_precision(engine: LLMEngine, args, plan, predictor, model_dir: Path | None, mode: str) -> None:
    """Split the expert cache's bytes into a full-precision and a low-precision pool, and build (or read) the
    low-precision host copies."""
    from expertyard.experts.precision import PrecisionThresholds
    from expertyard.quant.low_store import LowPrecisionStore, parse_low_precision
    from expertyard.quant.packed_expert import ExpertLayout
    from expertyard.quant.store import file_name

    model, cfg, backend = engine.model, engine.model_config, engine.model.experts
    bits = parse_low_precision(args.low_precision)
    thresholds = PrecisionThresholds.parse(args.precision_thresholds)
    if not 0 < args.low_pool_fraction < 1:
        raise ConfigError(f"--low-pool-fraction {args.low_pool_fraction} must be in (0, 1)")
    files = args.low_precision_dir
    if files is None and model_dir is not None and (Path(model_dir) / file_name(bits)).is_file():
        files = Path(model_dir)
    pin = engine.device.type == "cuda"
    if files is not None:
        low = LowPrecisionStore.from_files(files, backend.keys, bits, model, cfg.hidden_size,
                                           cfg.moe.intermediate_size, pin)
    else:
        ExpertLayout.build(cfg.hidden_size, cfg.moe.intermediate_size, bits, args.group_size)  # errors first
        low = LowPrecisionStore.quantize(backend.store, backend.keys, bits, args.group_size, engine.device, pin,
                                         progress=not args.json)
    cache_bytes = plan.slots * backend.expert_bytes
    high_slots = max(cfg.moe.top_k, round((1 - args.low_pool_fraction) * plan.slots))
    low_slots = (cache_bytes - high_slots * backend.expert_bytes) // low.expert_bytes
    if high_slots > plan.slots or low_slots < cfg.moe.top_k:
        raise ConfigError(f"an expert cache of {plan.slots} full-precision slots is too small to split into a "
                          f"full-precision and a low-precision pool of at least {cfg.moe.top_k} experts each; "
                          "raise --gpu-memory-budget / --expert-cache-fraction, or use --precision full")
    if not args.json:
        print(f"expert cache split: {high_slots} full-precision slots + {low_slots} int{bits} slots "
              f"({low.expert_bytes / 2**20:,.2f} MiB each), {mode} precision", file=sys.stderr)
    backend.configure(high_slots, make_cache_policy(args, model_dir), predictor, timeline=args.timeline is not None)
    backend.configure_low_precision(low, int(low_slots), make_cache_policy(args, model_dir), mode, thresholds)


def make_predictor(args, model):
    from expertyard.experts.predictors import load_predictor
    from expertyard.experts.predictors.base import TraceOraclePredictor

    name, depth = args.predictor, args.prefetch_depth
    if name == "oracle":
        if model.forced_routing is None:
            raise ConfigError("--predictor oracle reads the future of a --routing-trace; give one")
        return TraceOraclePredictor(model.forced_routing, list(model.cfg.moe_layers), depth)
    return load_predictor(name, model, model_dir_of(args), depth, args.predictor_path)


def model_dir_of(args) -> Path | None:
    """The checkpoint directory a command runs (None for --synthetic): files beside it (pre-gate predictor,
    hobbit weights, quantized experts) are found there."""
    return None if getattr(args, "synthetic", None) else model_path(args)
