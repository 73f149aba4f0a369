"""Cache policies by name, and the one factory that builds them for the CLI, the engine and the simulator."""

from __future__ import annotations

from pathlib import Path

from expertyard.errors import ConfigError
from expertyard.experts.policies.base import CachePolicy
from expertyard.experts.policies.belady import BeladyPolicy
from expertyard.experts.policies.hobbit import HobbitPolicy
from expertyard.experts.policies.layer_distance import LayerDistancePolicy
from expertyard.experts.policies.lfu import LFUPolicy
from expertyard.experts.policies.lru import LRUPolicy
from expertyard.experts.policies.reuse import ReusePolicy
from expertyard.experts.policies.reuse_hint import ReuseHintPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    p.name: p for p in (LRUPolicy, LFUPolicy, LayerDistancePolicy, HobbitPolicy, ReusePolicy, ReuseHintPolicy,
                         BeladyPolicy)}
DEFAULT_POLICY = ReusePolicy.name
ONLINE_POLICIES = [name for name, cls in POLICIES.items() if cls.online]  # what an engine can run


def policy_class(name: str) -> type[CachePolicy]:
    if name not in POLICIES:
        raise ConfigError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name]


def make_policy(name: str, **params) -> CachePolicy:
    """The policy called `name`, built with the parameters its class declares (`CachePolicy.params`)."""
    cls = policy_class(name)
    known = {p.name for p in cls.params}
    for key in params:
        if key not in known:
            raise ConfigError(f"cache policy {name!r} takes no parameter {key!r}"
                              + (f"; its parameters: {', '.join(sorted(known))}" if known else ""))
    return cls(**params)


def policy_params_from_args(name: str, args, model_dir: Path | None = None) -> dict:
    """The parameters of policy `name` set by CLI flags (`Param.flag`), or read from the file a parameter
    names beside the model; a flag of another policy is an error naming the policy it belongs to."""
    cls = policy_class(name)
    own = {p.flag for p in cls.params if p.flag}
    for other in POLICIES.values():
        for p in other.params:
            if p.flag and p.flag not in own and getattr(args, p.flag, None) is not None:
                raise ConfigError(f"--{p.flag.replace('_', '-')} is for --policy {other.name}, not {name}")
    params = {}
    for p in cls.params:
        if not p.flag:
            continue
        value = getattr(args, p.flag, None)
        if value is None and p.beside_model and model_dir is not None and (Path(model_dir) / p.beside_model).is_file():
            value = Path(model_dir) / p.beside_model
        if value is not None:
            params[p.name] = value
    return params


def policy_from_args(args, model_dir: Path | None = None, name: str | None = None) -> CachePolicy:
    """`--policy` (or `name`) with its flags: what `expertyard generate/bench/serve` run."""
    name = name or args.policy
    return make_policy(name, **policy_params_from_args(name, args, model_dir))
