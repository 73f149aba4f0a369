"""The model shipped inside the package, and the tokenizer of a checkpoint directory."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from expertyard.errors import ConfigError


def bundled_model_path() -> Path:
    """The small MoE trained by the project and shipped inside the package."""
    return Path(str(resources.files("expertyard") / "assets" / "tiny-moe"))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: no usable tokenizer files ({e})") from e
