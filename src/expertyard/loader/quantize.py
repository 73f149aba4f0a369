"""Quantize every routed expert of a checkpoint once, to files that later runs load (quant/store.py).

The checkpoint is read by the project's own loader (every architecture and both expert layouts) with an
ExpertBackend that packs each expert as soon as its three projections have arrived, for every precision
asked for, and streams it to disk: peak memory is the non-expert weights plus one expert.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from expertyard.errors import CheckpointError, ConfigError
from expertyard.experts.backend import ExpertBackend, Projection
from expertyard.loader.checkpoint import read_hf_config
from expertyard.loader.load import load_model, model_config_from_hf
from expertyard.quant.packed_expert import ExpertLayout, pack_expert
from expertyard.quant.store import (FORMAT, VERSION, PackedExpertWriter, file_name, model_metadata, router_hash,
                                    tensor_name)

# D = hidden size, I = expert intermediate size


class QuantizingExperts(ExpertBackend):
    """Receives expert weights from `load_model` and hands each complete expert (gate, up, down) to `sink`.
    It cannot run a forward pass."""

    graph_safe = False

    def __init__(self, cfg, sink):
        self.cfg, self.sink = cfg, sink
        self.pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        e = cfg.moe.num_experts
        self._expected = {(layer, x, p) for layer in cfg.moe_layers for x in range(e) for p in ("gate", "up", "down")}

    def forward(self, layer, x, topk_ids, topk_w):
        raise RuntimeError("QuantizingExperts only packs experts while a checkpoint loads; it runs no forward")

    def load_expert_weight(self, layer: int, expert: int, proj: Projection, tensor: torch.Tensor) -> None:
        i, d = self.cfg.moe.intermediate_size, self.cfg.hidden_size
        want = (d, i) if proj == "down" else (i, d)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"expert {expert} {proj} of layer {layer}: expected shape {want}, "
                                  f"checkpoint has {tuple(tensor.shape)}")
        parts = self.pending.setdefault((layer, expert), {})
        parts[proj] = tensor
        if len(parts) == 3:
            del self.pending[(layer, expert)]
            self.sink(layer, expert, parts["gate"], parts["up"], parts["down"])

    def expected_weights(self) -> set[tuple[int, int, str]]:
        return self._expected


def parse_bits(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--bits {text!r}: give a comma-separated list of 8, 4 and 2, e.g. 4,2") from None
    bad = [b for b in bits if b not in (8, 4, 2)]
    if not bits or bad or len(set(bits)) != len(bits):
        raise ConfigError(f"--bits {text!r}: give distinct values among 8, 4 and 2, e.g. 4,2")
    return bits


def quantize_model(model_dir: Path, bits_list: list[int], group_size: int, out_dir: Path,
                   device: torch.device | str = "cpu", progress: bool = True, clip_search: bool = False) -> dict:
    """Write out_dir/experts.int{b}.safetensors for each b; returns a summary (sizes, times, router hash)."""
    cfg = model_config_from_hf(read_hf_config(model_dir))
    d, i = cfg.hidden_size, cfg.moe.intermediate_size
    layouts = {b: ExpertLayout.build(d, i, b, group_size) for b in bits_list}  # shape errors before any work
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigError(f"--out {out_dir} is the model directory, whose every *.safetensors file the loader reads "
                          "as a checkpoint shard; write the packed experts to another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.moe.num_experts)]
    names = [tensor_name(*k) for k in keys]
    writers = {}
    for b, layout in layouts.items():
        meta = {"format": FORMAT, "version": VERSION, "bits": str(b), "group_size": str(group_size),
                "layout": layout.to_json(), "scale_format": "float16 scale, float16 minimum (w = min + q * scale)",
                "rounding": "nearest, clip search" if clip_search else "nearest, min-max range",
                "source": model_dir.name, **model_metadata(cfg)}
        writers[b] = PackedExpertWriter(out_dir / file_name(b), names, layout.nbytes, meta)
    device = torch.device(device)
    precisions = ",".join(map(str, bits_list))
    bar = tqdm(total=len(keys), unit="expert", desc=f"quantizing {model_dir.name} to int{precisions}",
               disable=not progress)

    def sink(layer, expert, gate, up, down):
        gate, up, down = (t.to(device, torch.float32) for t in (gate, up, down))
        for b, w in writers.items():
            w.write(tensor_name(layer, expert), pack_expert(gate, up, down, b, group_size, clip_search=clip_search))
        bar.update(1)

    start = time.perf_counter()
    try:
        loaded = load_model(model_dir, "cpu", torch.bfloat16, progress=False,
                            backend_factory=lambda c, dev, dt: QuantizingExperts(c, sink))
        digest = router_hash(loaded.model)
        for w in writers.values():
            w.finish(digest)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    bf16 = 3 * d * i * 2
    return {"model": str(model_dir), "architecture": cfg.architecture, "experts": len(keys), "group_size": group_size,
            "clip_search": clip_search,
            "router_sha256": digest, "seconds": round(seconds, 2), "bf16_bytes_per_expert": bf16,
            "files": [{"bits": b, "path": str(out_dir / file_name(b)), "bytes_per_expert": layouts[b].nbytes,
                       "ratio_to_bf16": layouts[b].nbytes / bf16, "file_bytes": (out_dir / file_name(b)).stat().st_size}
                      for b in bits_list]}
