"""Quantization error of the packed formats, on a real model's experts and real activations (docs/quantization.md).

    python -m expertyard.bench.quant_error [--model DIR] --text FILE [--max-tokens 2048] [--out errors.json]

For bits 8, 4, 2 and group sizes 64, 128, three ways to store a group's offset, all with a float16 scale, and one
way to choose the range, are compared (4, 4, 3 and 4 bytes per group):
  min         float16 minimum, w = min + q * scale (this package's format), grid over the group's [min, max]
  min+clip    the same format, each group's range shrunk to the least squared error (quantize(clip_search=True))
  int-zero    integer zero point z in [0, 2^bits), w = (q - z) * scale (GPTQ/AWQ style)
  fp16-zero   float16 zero point z = -min / scale, w = (q - z) * scale
Measured: the relative RMS error of the expert weights (the bundled model's, and N(0, 1) weights), and the
relative error of each MoE layer's output (sum over a token's experts of gate weight x expert FFN) on the
hidden states that reach the layer when the model reads the text, against full precision, in float64.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from expertyard.engine.llm_engine import LLMEngine
from expertyard.loader.bundled import bundled_model_path, load_tokenizer
from expertyard.loader.load import load_model
from expertyard.quant.groupwise import dequantize, quantize
from expertyard.trace.record import trace_text

# N = rows, K = input columns, G = group size, T = tokens, D = hidden, I = expert intermediate, E = experts

FORMATS = ("min", "min+clip", "int-zero", "fp16-zero")
BYTES_PER_GROUP = {"min": 4, "min+clip": 4, "int-zero": 3, "fp16-zero": 4}


def round_trip(w: torch.Tensor, bits: int, group: int, fmt: str) -> torch.Tensor:
    """w [N, K] -> dequantized w in float64, through one of FORMATS."""
    if fmt in ("min", "min+clip"):
        return dequantize(quantize(w, bits, group, clip_search=fmt == "min+clip"), torch.float64)
    n, k = w.shape
    qmax = (1 << bits) - 1
    wg = w.double().reshape(n, k // group, group)  # [N, K/G, G]
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((hi - lo) / qmax).half().double()
    s = torch.where(s > 0, s, torch.ones_like(s))
    if fmt == "int-zero":
        z = torch.round(-lo / s).clamp(0, qmax)
    else:
        z = (-lo / s).half().double()
    q = torch.round(wg / s + z).clamp(0, qmax)
    return ((q - z) * s).reshape(n, k)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    i = w2.shape[1]
    gu = x @ w13.T  # [T, 2I]
    return (F.silu(gu[:, :i]) * gu[:, i:]) @ w2.T  # [T, D]


def layer_outputs(x, ids, weights, w13, w2) -> torch.Tensor:
    """sum_k weights[t, k] * FFN_{ids[t, k]}(x[t]) for every token: [T, D] float64."""
    y = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        y.index_add_(0, tok, expert_ffn(x[tok], w13[e], w2[e]) * weights[tok, slot, None])
    return y


def measure(model_dir: Path, text: Path, max_tokens: int) -> dict:
    loaded = load_model(model_dir, "cpu", torch.float32, progress=False)
    engine = LLMEngine(loaded, load_tokenizer(model_dir))
    trace = trace_text(engine, text.read_text(encoding="utf-8"), model_dir.name, text.name, max_tokens,
                       save_hidden=True)
    cfg, backend = loaded.config, loaded.model.experts
    result = {"model": model_dir.name, "text": text.name, "tokens": trace.num_tokens, "rows": []}
    gauss = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))
    for bits in (8, 4, 2):
        for group in (64, 128):
            if cfg.hidden_size % group or cfg.moe.intermediate_size % group:
                continue
            for fmt in FORMATS:
                num = den = 0.0
                out_num = out_den = 0.0
                for li, layer in enumerate(cfg.moe_layers):
                    w13, w2 = backend.w13[layer].double(), backend.w2[layer].double()  # [E, 2I, D], [E, D, I]
                    q13 = torch.stack([round_trip(w, bits, group, fmt) for w in backend.w13[layer]])
                    q2 = torch.stack([round_trip(w, bits, group, fmt) for w in backend.w2[layer]])
                    num += (q13 - w13).pow(2).sum().item() + (q2 - w2).pow(2).sum().item()
                    den += w13.pow(2).sum().item() + w2.pow(2).sum().item()
                    x = torch.from_numpy(trace.hidden[:, li]).double()  # [T, D]
                    ids = torch.from_numpy(trace.experts[:, li].astype("int64"))  # [T, K]
                    weights = torch.from_numpy(trace.weights[:, li]).double()  # [T, K]
                    y = layer_outputs(x, ids, weights, w13, w2)
                    yq = layer_outputs(x, ids, weights, q13, q2)
                    out_num += (yq - y).pow(2).sum().item()
                    out_den += y.pow(2).sum().item()
                row = {"bits": bits, "group_size": group, "format": fmt,
                       "bits_per_weight": bits + 8 * BYTES_PER_GROUP[fmt] / group,
                       "weight_rel_rms": (num / den) ** 0.5, "layer_output_rel_err": (out_num / out_den) ** 0.5,
                       "gaussian_weight_rel_rms": rel(round_trip(gauss, bits, group, fmt), gauss.double())}
                result["rows"].append(row)
                print(f"int{bits} G{group} {fmt:9}  weights {row['weight_rel_rms']:.4f}  layer output "
                      f"{row['layer_output_rel_err']:.4f}  N(0,1) weights {row['gaussian_weight_rel_rms']:.4f}",
                      flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--text", type=Path, required=True, help="text whose tokens give the experts' activations")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    result = measure(args.model or bundled_model_path(), args.text, args.max_tokens)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
