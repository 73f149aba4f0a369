"""Cache policies by name: `make_policy("lru")`."""

from __future__ import annotations

from expertyard.errors import ConfigError
from expertyard.experts.policies.base import CachePolicy, ExpertKey
from expertyard.experts.policies.lru import LRUPolicy

POLICIES: dict[str, type[CachePolicy]] = {LRUPolicy.name: LRUPolicy}


def make_policy(name: str, **kwargs) -> CachePolicy:
    if name not in POLICIES:
        raise ConfigError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)


__all__ = ["CachePolicy", "ExpertKey", "POLICIES", "make_policy"]
