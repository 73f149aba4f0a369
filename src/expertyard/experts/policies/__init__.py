"""Cache policies by name: `make_policy("lru")`, `make_policy("belady", future=visits)`,
`make_policy("hobbit")` (default weights) or `make_policy("hobbit", weights=HobbitWeights(...) | path)`.
`DEFAULT_POLICY` is the one the engine runs unless told otherwise."""

from __future__ import annotations

from expertyard.experts.policies.base import CachePolicy, ExpertKey, Param
from expertyard.experts.policies.belady import BeladyPolicy
from expertyard.experts.policies.hobbit import HobbitPolicy
from expertyard.experts.policies.hobbit_weights import HobbitWeights, load_hobbit_weights, save_hobbit_weights
from expertyard.experts.policies.layer_distance import LayerDistancePolicy
from expertyard.experts.policies.lfu import LFUPolicy
from expertyard.experts.policies.lru import LRUPolicy
from expertyard.experts.policies.registry import (DEFAULT_POLICY, ONLINE_POLICIES, POLICIES, make_policy,
                                                  policy_class, policy_from_args, policy_params_from_args)
from expertyard.experts.policies.reuse import ReusePolicy
from expertyard.experts.policies.reuse_hint import ReuseHintPolicy

__all__ = ["BeladyPolicy", "CachePolicy", "DEFAULT_POLICY", "ExpertKey", "HobbitPolicy", "HobbitWeights",
           "LFUPolicy", "LRUPolicy", "LayerDistancePolicy", "ONLINE_POLICIES", "POLICIES", "Param", "ReuseHintPolicy",
           "ReusePolicy", "load_hobbit_weights", "make_policy", "policy_class", "policy_from_args", "policy_params_from_args",
           "save_hobbit_weights"]
