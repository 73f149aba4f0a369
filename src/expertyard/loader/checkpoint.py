"""Find and open the safetensors files of a Hugging Face model directory, with errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from expertyard.errors import CheckpointError


def read_hf_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: cannot be read by transformers: {e}") from e


AUXILIARY_PREFIXES = ("pregate", "experts.")  # files expertyard writes beside a model: not model weights


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The shard files: from model.safetensors.index.json when present, else model.safetensors, else every
    *.safetensors that is not one of expertyard's own files (a trained predictor, quantized experts)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = [f for f in sorted(model_dir.glob("*.safetensors")) if not f.name.startswith(AUXILIARY_PREFIXES)]
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files (expertyard loads safetensors checkpoints only)")
    return files


@contextmanager
def open_shard(path: Path) -> Iterator:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        if "safetensor" in type(e).__name__.lower() or isinstance(e, (OSError, ValueError)):
            raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from e
        raise


def iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, Callable[[], torch.Tensor]]]:
    """(file, name, read) for every tensor; `read()` returns it (memory-mapped; nothing else is held), so a
    caller that keeps a tensor on disk never reads it."""
    for path in files:
        with open_shard(path) as f:
            for name in f.keys():
                def read(f=f, name=name, path=path) -> torch.Tensor:
                    try:
                        return f.get_tensor(name)
                    except Exception as e:
                        raise CheckpointError(f"{path}: tensor {name!r} cannot be read, file truncated? ({e})") from e
                yield path, name, read
