"""Packed low-precision experts on disk: one safetensors file per precision, written once by
`expertyard quantize`, loaded by later runs instead of re-quantizing.

    DIR/experts.int4.safetensors    tensors `layer.{l}.expert.{e}`: the packed expert buffers [nbytes] uint8
                                    metadata: format, bits, group size, layout (offsets), architecture and
                                    shapes, and `router_sha256`, a hash of every MoE router's weights

A later run refuses a file whose router hash or shapes differ from its model's (a file made for another
model). The files are written in a stream (header first, each expert at its offset as soon as it is
quantized), so quantizing a model never holds more than one full-precision expert in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from expertyard.errors import CheckpointError, ConfigError
from expertyard.quant.packed_expert import ExpertLayout

FORMAT = "expertyard-packed-experts"
VERSION = "1"


def file_name(bits: int) -> str:
    return f"experts.int{bits}.safetensors"


def tensor_name(layer: int, expert: int) -> str:
    return f"layer.{layer}.expert.{expert}"


def router_hash(model) -> str:
    """sha256 of every MoE layer's router weight rounded to bfloat16 (the same whether the model was loaded in
    float32 or bfloat16), with the layer indices and shapes."""
    h = hashlib.sha256()
    for layer in model.cfg.moe_layers:
        w = model.layers[layer].mlp.gate.weight.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(f"{layer}:{tuple(w.shape)};".encode())
        h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def model_metadata(cfg) -> dict[str, str]:
    """What a file must agree with, from a ModelConfig."""
    return {"architecture": cfg.architecture, "hidden_size": str(cfg.hidden_size),
            "moe_intermediate_size": str(cfg.moe.intermediate_size), "num_experts": str(cfg.moe.num_experts),
            "moe_layers": json.dumps(list(cfg.moe_layers))}


class PackedExpertWriter:
    """A safetensors file of equal-size uint8 tensors, written in any order at fixed offsets.

    The header (with space padding, as the format allows) is written first with a placeholder router hash of
    the final length; `finish` rewrites it and renames `path.tmp` to `path`."""

    def __init__(self, path: Path, names: list[str], nbytes: int, metadata: dict[str, str]):
        self.path, self.tmp, self.nbytes = path, path.with_name(path.name + ".tmp"), nbytes
        self.index = {name: i for i, name in enumerate(names)}
        self.written: set[str] = set()
        self.metadata = {**metadata, "router_sha256": "0" * 64}
        header = self._header(self.metadata)
        self.header_len = (len(header) + 7) // 8 * 8  # the data section starts 8-byte aligned
        self.f = open(self.tmp, "wb")
        self._write_header(self.metadata)
        self.f.truncate(8 + self.header_len + nbytes * len(names))

    def _header(self, metadata: dict[str, str]) -> bytes:
        entries = {"__metadata__": metadata}
        for name, i in self.index.items():
            entries[name] = {"dtype": "U8", "shape": [self.nbytes],
                             "data_offsets": [i * self.nbytes, (i + 1) * self.nbytes]}
        return json.dumps(entries, separators=(",", ":")).encode()

    def _write_header(self, metadata: dict[str, str]) -> None:
        header = self._header(metadata)
        assert len(header) <= self.header_len
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.header_len) + header + b" " * (self.header_len - len(header)))

    def write(self, name: str, buf: torch.Tensor) -> None:
        assert buf.dtype == torch.uint8 and buf.numel() == self.nbytes
        self.f.seek(8 + self.header_len + self.index[name] * self.nbytes)
        self.f.write(buf.contiguous().cpu().numpy().tobytes())
        self.written.add(name)

    def finish(self, router_sha256: str) -> None:
        missing = sorted(set(self.index) - self.written)
        assert not missing, f"tensors never written: {missing[:4]}"
        self.metadata["router_sha256"] = router_sha256
        self._write_header(self.metadata)
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


class QuantizedExperts(dict):
    """(layer, expert) -> packed expert buffer [layout.nbytes] uint8, with the file's `layout` and `metadata`."""

    layout: ExpertLayout
    metadata: dict[str, str]


def read_metadata(directory: str | Path, bits: int) -> tuple[Path, dict[str, str], ExpertLayout]:
    path = Path(directory) / file_name(bits)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; write it with `expertyard quantize --bits {bits} --out "
                              f"{directory}`")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: not an expertyard packed-expert file of version {VERSION} "
                              f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    try:
        layout = ExpertLayout.from_json(meta["layout"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if layout.bits != bits:
        raise CheckpointError(f"{path}: holds {layout.bits}-bit experts, not {bits}-bit")
    return path, meta, layout


def load_quantized_experts(directory: str | Path, bits: int, model=None, router_sha256: str | None = None
                           ) -> QuantizedExperts:
    """Read DIR/experts.int{bits}.safetensors -> {(layer, expert): packed buffer}. With `model` (a CausalLM)
    or `router_sha256`, refuse (CheckpointError) a file that was made for another model."""
    path, meta, layout = read_metadata(directory, bits)
    if model is not None:
        want = model_metadata(model.cfg)
        diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: file {a}, model {b}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{path} was made for another model ({detail}); re-run `expertyard quantize`")
        router_sha256 = router_sha256 or router_hash(model)
    if router_sha256 is not None and meta.get("router_sha256") != router_sha256:
        raise CheckpointError(f"{path} was made for another model: its router hash "
                              f"{meta.get('router_sha256', '?')[:12]}... differs from this model's "
                              f"{router_sha256[:12]}...; re-run `expertyard quantize`")
    out = QuantizedExperts()
    out.layout, out.metadata = layout, meta
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            _, layer, _, expert = name.split(".")
            t = f.get_tensor(name)
            if t.dtype != torch.uint8 or t.shape != (layout.nbytes,):
                raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, "
                                      f"expected uint8 ({layout.nbytes},)")
            out[int(layer), int(expert)] = t
    expected = {(l, e) for l in json.loads(meta["moe_layers"]) for e in range(int(meta["num_experts"]))}
    if set(out) != expected:
        raise CheckpointError(f"{path}: holds {len(out)} experts, expected {len(expected)}")
    return out
