"""Cache policies by name: `make_policy("lru")`, `make_policy("belady", future=visits)`,
`make_policy("hobbit")` (default weights) or `make_policy("hobbit", weights=HobbitWeights(...) | path)`."""

from __future__ import annotations

from expertyard.errors import ConfigError
from expertyard.experts.policies.base import CachePolicy, ExpertKey
from expertyard.experts.policies.belady import BeladyPolicy
from expertyard.experts.policies.hobbit import HobbitPolicy
from expertyard.experts.policies.hobbit_weights import HobbitWeights, load_hobbit_weights, save_hobbit_weights
from expertyard.experts.policies.layer_distance import LayerDistancePolicy
from expertyard.experts.policies.lfu import LFUPolicy
from expertyard.experts.policies.lru import LRUPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    p.name: p for p in (LRUPolicy, LFUPolicy, LayerDistancePolicy, HobbitPolicy, BeladyPolicy)}


def make_policy(name: str, **kwargs) -> CachePolicy:
    if name not in POLICIES:
        raise ConfigError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)


__all__ = ["BeladyPolicy", "CachePolicy", "ExpertKey", "HobbitPolicy", "HobbitWeights", "LFUPolicy", "LRUPolicy",
           "LayerDistancePolicy", "POLICIES", "load_hobbit_weights", "make_policy", "save_hobbit_weights"]
