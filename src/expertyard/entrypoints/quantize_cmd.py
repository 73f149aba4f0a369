"""`expertyard quantize`: pack every routed expert of a model at low precision, once, into safetensors files that
later runs load instead of re-quantizing (format: docs/quantization.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from expertyard.entrypoints.common import bundled_model_path
from expertyard.errors import ConfigError
from expertyard.loader.quantize import parse_bits, quantize_model


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write low-precision (int8/int4/int2) copies of every routed expert",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="local Hugging Face model directory (default: bundled)")
    p.add_argument("--bits", default="4,2", help="precisions to write, comma-separated among 8, 4, 2")
    p.add_argument("--group-size", type=int, default=64,
                   help="input columns sharing one float16 scale and minimum (must divide hidden and expert sizes)")
    p.add_argument("--clip-search", action="store_true",
                   help="per group, pick the shrunk range of least squared error (26%% less error at int2)")
    p.add_argument("--out", type=Path, required=True, help="directory for experts.int{bits}.safetensors")
    p.add_argument("--device", default="cpu", help="where to quantize: cpu | cuda[:N] (same result, faster)")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    bits = parse_bits(args.bits)
    model = args.model or bundled_model_path()
    if not model.is_dir():
        raise ConfigError(f"--model {model}: not a directory")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: exists and is not a directory")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    summary = quantize_model(model, bits, args.group_size, args.out, args.device, progress=not args.json,
                             clip_search=args.clip_search)
    if args.json:
        print(json.dumps(summary))
        return 0
    bf16 = summary["bf16_bytes_per_expert"]
    print(f"{summary['experts']} experts of {model.name} ({summary['architecture']}), group size "
          f"{summary['group_size']}{', clip search' if args.clip_search else ''}, in {summary['seconds']:.1f} s; "
          f"bf16 expert {bf16 / 2**20:.2f} MiB")
    for f in summary["files"]:
        print(f"  int{f['bits']}: {f['path']}  {f['bytes_per_expert'] / 2**20:.2f} MiB per expert "
              f"({100 * f['ratio_to_bf16']:.1f}% of bf16), file {f['file_bytes'] / 2**20:.1f} MiB")
    return 0
