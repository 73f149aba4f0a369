"""The model shipped inside the package, and the tokenizer of a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from expertyard.assets import bundled_model_path
from expertyard.errors import ConfigError

__all__ = ["bundled_model_path", "load_tokenizer"]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: no usable tokenizer files ({e})") from e
