"""Files shipped inside the package (the bundled model, a held-out text), and where commands write files derived
from a model (a fitted predictor) when the model's own folder is not the user's to write into."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def bundled_model_path() -> Path:
    """The small MoE trained by the project and shipped inside the package (docs/bundled-model.md)."""
    return Path(str(resources.files("expertyard") / "assets" / "tiny-moe"))


def heldout_text_path() -> Path:
    """TinyStories stories the bundled model was not trained on (assets/heldout/README.md): `eval`'s default."""
    return Path(str(resources.files("expertyard") / "assets" / "heldout" / "tinystories-heldout.txt"))


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/expertyard, else ~/.cache/expertyard."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "expertyard"


def derived_files_dir(model_dir: Path) -> Path:
    """Where files fitted for the model in `model_dir` go: the folder itself for a user's own model; for the
    bundled model (inside the installed package) and a Hugging Face hub snapshot (a shared, content-addressed
    cache), a folder of the user's cache, cache_dir()/models/<name>."""
    model_dir = Path(model_dir).resolve()
    package = Path(str(resources.files("expertyard"))).resolve()
    if model_dir == package or package in model_dir.parents:
        return cache_dir() / "models" / model_dir.name
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return cache_dir() / "models" / model_dir.parent.parent.name.removeprefix("models--")
    return model_dir
