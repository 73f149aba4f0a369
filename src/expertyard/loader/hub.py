"""`--model` as a local directory or a Hugging Face hub id (`Qwen/Qwen3-30B-A3B`), resolved like transformers and
vLLM do: through huggingface_hub's cache (HF_HOME / HF_HUB_CACHE), offline with HF_HUB_OFFLINE=1, downloading
only safetensors weights, configs and tokenizer files (never pickled weights)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from expertyard.errors import ConfigError

# what a model needs: weights (safetensors only), config, generation config, tokenizer and chat template
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


def is_hub_id(name: str) -> bool:
    """`org/name` with hub characters only (a local path that exists is never one: see resolve_model)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def hub_cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub reads them once, at import); None: its default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """A local directory as it is (it wins over a hub id of the same name); a hub id as its snapshot folder in the
    Hugging Face cache, downloaded there first unless it is already complete or the hub is offline."""
    path = Path(model)
    if path.exists():
        if revision is not None:
            raise ConfigError(f"--revision {revision} is for Hugging Face hub ids; --model {model} is a local folder")
        return path
    name = str(model)
    if not is_hub_id(name):
        return path  # the loader says what is missing
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # transformers depends on it; only a broken install lacks it
        raise ConfigError(f"--model {name}: no such folder, and huggingface_hub (for hub ids) is not installed") \
            from None
    offline, cache = hub_offline(), hub_cache_dir()
    where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS,
                                   local_files_only=offline, library_name="expertyard")
    except hf_errors.LocalEntryNotFoundError:
        raise ConfigError(f"--model {name}{_at(revision)}: not a local folder, and not in {where}; HF_HUB_OFFLINE=1 "
                          "forbids downloading it (unset HF_HUB_OFFLINE, or download it where the network is reachable "
                          f"with `hf download {name}`)" if offline else
                          f"--model {name}{_at(revision)}: not a local folder, not in {where}, and the Hugging Face "
                          "hub could not be reached to download it") from None
    except hf_errors.RevisionNotFoundError:
        raise ConfigError(f"--revision {revision}: the hub repository {name} has no such branch, tag or commit") \
            from None
    except hf_errors.GatedRepoError:
        raise ConfigError(f"--model {name}: a gated repository; accept its terms on huggingface.co and log in "
                          "(`hf auth login` or HF_TOKEN)") from None
    except hf_errors.RepositoryNotFoundError:
        raise ConfigError(f"--model {name}: no such local folder, and no such model on the Hugging Face hub (or it "
                          "is private: log in with `hf auth login` or HF_TOKEN)") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise ConfigError(f"--model {name}{_at(revision)}: download from the Hugging Face hub failed: {e}") from None
    return Path(folder)


def _at(revision: str | None) -> str:
    return f" (revision {revision})" if revision else ""
