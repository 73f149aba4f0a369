"""HF `architectures` name -> ArchitectureSpec."""

from __future__ import annotations

from expertyard.errors import UnsupportedArchitectureError
from expertyard.models import deepseek_v2, mixtral, olmoe, qwen2_moe, qwen3_moe
from expertyard.models.spec import ArchitectureSpec

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec for spec in (mixtral.SPEC, qwen2_moe.SPEC, qwen3_moe.SPEC, olmoe.SPEC, deepseek_v2.SPEC)
}


def get_architecture(hf_config) -> ArchitectureSpec:
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"architecture {names or '(none given in config.json)'} is not supported; expertyard runs: "
        f"{', '.join(sorted(ARCHITECTURES))}")
