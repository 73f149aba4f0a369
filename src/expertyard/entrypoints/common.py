"""Flags and set-up shared by the CLI commands: which model, which device, how to build the engine."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import torch

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.errors import ConfigError
from expertyard.loader.load import LoadedModel, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_model_path() -> Path:
    """The small MoE trained by the project and shipped inside the package."""
    return Path(str(resources.files("expertyard") / "assets" / "tiny-moe"))


def add_model_args(p: argparse.ArgumentParser, synthetic: bool = False) -> None:
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="local Hugging Face model directory (default: the bundled model)")
    if synthetic:
        from expertyard.synthetic import SYNTHETIC_MODELS

        src.add_argument("--synthetic", choices=sorted(SYNTHETIC_MODELS),
                         help="random weights with the exact shapes of a real model, built in memory")
        g.add_argument("--num-layers", type=int, help="shorten a --synthetic model to N layers")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: model's, <= 4096)")
    g.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded together")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run CUDA decode steps eagerly")
    g.add_argument("--json", action="store_true", help="print one machine-readable JSON object")


def resolve_device(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def load_from_args(args, device: torch.device, dtype: torch.dtype) -> tuple[LoadedModel, object]:
    """(model, tokenizer or None) for --model / --synthetic / the bundled default."""
    if getattr(args, "synthetic", None):
        from expertyard.synthetic import build_synthetic

        return build_synthetic(args.synthetic, args.num_layers, device, dtype), None
    path = args.model or bundled_model_path()
    loaded = load_model(path, device, dtype, progress=not args.json)
    return loaded, load_tokenizer(path)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: no usable tokenizer files ({e})") from e


def engine_from_args(args) -> LLMEngine:
    device, dtype = resolve_device(args)
    loaded, tokenizer = load_from_args(args, device, dtype)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          cuda_graphs=False if args.no_cuda_graphs else None)
    return LLMEngine(loaded, tokenizer, config)
