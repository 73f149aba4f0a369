"""Builds an offloaded model's expert backend from its `OffloadConfig`: plans the device budget (resident weights,
KV cache, workspace, expert slots per pool) before anything is allocated, then builds every part whole."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from expertyard.config import ModelConfig
from expertyard.errors import ConfigError
from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.cpu import CpuExpertCompute, CpuExpertStore, measure_costs, set_cpu_threads
from expertyard.experts.mixed_cache import MixedPrecisionCache
from expertyard.experts.offload.backend import OffloadedExperts
from expertyard.experts.offload.budget import GpuBudgetPlan, budget_for_fraction, plan_gpu_budget, split_pools, \
    workspace_bytes
from expertyard.experts.offload.config import OffloadConfig
from expertyard.experts.offload.host_loader import HostLoadedExperts
from expertyard.experts.offload.hybrid import HybridExecutor
from expertyard.experts.offload.shared_int4 import (CpuInt4Source, SharedInt4Pool, conversion_workspace_bytes,
                                                    shared_layout)
from expertyard.experts.offload.slot_pool import FullPrecisionPool, LowPrecisionPool
from expertyard.experts.offload.transfer import TransferEngine
from expertyard.experts.policies import DEFAULT_POLICY, CachePolicy, policy_from_args
from expertyard.experts.precision import PrecisionThresholds
from expertyard.experts.predictors import make_predictor
from expertyard.experts.predictors.base import Predictor
from expertyard.quant.low_store import LowPrecisionStore
from expertyard.quant.packed_expert import ExpertLayout
from expertyard.quant.store import file_name

DEFAULT_PREDICTOR = "none"  # measured: prediction on a busy link delays demand copies (docs/offloading.md)


def plan_budget(model: nn.Module, cfg: OffloadConfig, kv: int, max_model_len: int, max_num_batched_tokens: int,
                dtype: torch.dtype, device: torch.device) -> GpuBudgetPlan:
    """Split the device budget: resident weights, the KV cache's `kv` bytes, workspace, expert slots."""
    mcfg: ModelConfig = model.cfg
    elt = torch.empty((), dtype=dtype).element_size()
    expert_bytes = mcfg.expert_bytes(elt)
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    workspace = workspace_bytes(mcfg, max_num_batched_tokens, max_model_len, elt)
    if cfg.shares_int4_copies:  # int4 slots, and the staging buffer + temporaries of the on-device conversion
        layout = shared_layout(mcfg.hidden_size, mcfg.moe.intermediate_size, cfg.group_size)
        expert_bytes = layout.nbytes
        workspace += conversion_workspace_bytes(layout)
    budget = cfg.gpu_memory_budget
    if budget is None:
        budget = budget_for_fraction(cfg.expert_cache_fraction, mcfg, resident, kv, workspace, expert_bytes)
    name = "GPU" if device.type == "cuda" else "device"
    return plan_gpu_budget(budget, mcfg, resident, kv, workspace, expert_bytes, name)


def build_offloaded_experts(model: nn.Module, cfg: OffloadConfig, plan: GpuBudgetPlan,
                            model_dir: Path | None) -> OffloadedExperts:
    """The backend for `model`, whose experts were loaded into host memory (`HostLoadedExperts`)."""
    host = _host_experts(model)
    predictor = predictor_for(cfg, model, model_dir)
    if cfg.shares_int4_copies:
        return shared_int4_backend(model, plan.slots, cfg, policy_for(cfg, model_dir), predictor)
    if cfg.precision_mode == "full":
        hybrid = build_hybrid(host, cfg) if cfg.cpu_compute != "off" else None
        return full_precision_backend(model, plan.slots, policy_for(cfg, model_dir), predictor, cfg.timeline,
                                      hybrid)
    low_store = _low_precision_store(model, host, cfg, model_dir)
    high_slots, low_slots = split_pools(plan.slots, low_store.expert_bytes / host.store.expert_bytes,
                                        cfg.low_pool_fraction, model.cfg.moe.top_k)
    return mixed_precision_backend(model, high_slots, low_slots, policy_for(cfg, model_dir),
                                   policy_for(cfg, model_dir), low_store, cfg.precision_mode,
                                   PrecisionThresholds(*cfg.precision_thresholds), predictor, cfg.timeline)


def full_precision_backend(model: nn.Module, slots: int, policy: CachePolicy, predictor: Predictor | None = None,
                           timeline: bool = False, hybrid: HybridExecutor | None = None) -> OffloadedExperts:
    """An expert cache of `slots` full-precision experts over the host store `model` was loaded into."""
    host, mcfg = _host_experts(model), model.cfg
    if slots < mcfg.moe.top_k:
        raise ConfigError(f"an expert cache of {slots} slots cannot hold the {mcfg.moe.top_k} experts of one token")
    high = FullPrecisionPool(mcfg, ExpertCacheState(slots, policy), host.store, host.device)
    return OffloadedExperts(mcfg, host, high, TransferEngine(host.device, timeline), predictor, hybrid=hybrid)


def build_hybrid(host: HostLoadedExperts, cfg: OffloadConfig, store: CpuExpertStore | None = None,
                 copy_bytes: int | None = None) -> HybridExecutor:
    """CPU expert compute from host memory (and the `cpu_precision` copies it needs, made now unless `store` has
    them), with the cost model's figures measured on this machine; a copy over the link moves `copy_bytes`
    (default: a full-precision expert)."""
    if cfg.cpu_threads is not None:
        set_cpu_threads(cfg.cpu_threads)
    if store is None:
        store = CpuExpertStore(host.store, host.keys, {"full", cfg.cpu_precision}, progress=cfg.progress)
    costs = measure_costs(store, host.device, [cfg.cpu_precision])
    return HybridExecutor(CpuExpertCompute(store), costs, cfg.cpu_compute, cfg.cpu_precision, host.device,
                          host.dtype, copy_bytes=copy_bytes)


def shared_int4_backend(model: nn.Module, slots: int, cfg: OffloadConfig, policy: CachePolicy,
                        predictor: Predictor | None = None) -> OffloadedExperts:
    """int4 on both pipes: `slots` device slots of int4 copies made from the host CPU's own int4 copies; each miss
    is copied (as int4) or computed on the CPU, by the cost model."""
    host, mcfg = _host_experts(model), model.cfg
    if slots < mcfg.moe.top_k:
        raise ConfigError(f"an expert cache of {slots} int4 slots cannot hold the {mcfg.moe.top_k} experts of one "
                          "token")
    shared_layout(mcfg.hidden_size, mcfg.moe.intermediate_size, cfg.group_size)  # shape errors before quantizing
    store = CpuExpertStore(host.store, host.keys, {"full", "int4"}, cfg.group_size, progress=cfg.progress,
                           int4_buffers=True, pin=host.device.type == "cuda")
    source = CpuInt4Source(store)
    pool = SharedInt4Pool(mcfg, ExpertCacheState(slots, policy), source, host.device, host.dtype)
    hybrid = build_hybrid(host, cfg, store, copy_bytes=source.expert_bytes)
    return OffloadedExperts(mcfg, host, pool, TransferEngine(host.device, cfg.timeline), predictor,
                            precision_mode="low", hybrid=hybrid)


def mixed_precision_backend(model: nn.Module, high_slots: int, low_slots: int, high_policy: CachePolicy,
                            low_policy: CachePolicy, low_store: LowPrecisionStore, mode: str = "mixed",
                            thresholds: PrecisionThresholds | None = None, predictor: Predictor | None = None,
                            timeline: bool = False) -> OffloadedExperts:
    """Two pools (HOBBIT): full-precision copies and low-precision copies from `low_store`. mode "mixed":
    token-level precision on a miss; "low": every pair accepts the low copy (quality baselines)."""
    host, mcfg = _host_experts(model), model.cfg
    if mode not in ("mixed", "low"):
        raise ConfigError(f"precision mode {mode!r}: choose mixed or low (full needs no low-precision pool)")
    for name, slots in (("full-precision", high_slots), ("low-precision", low_slots)):
        if slots < mcfg.moe.top_k:
            raise ConfigError(f"a {name} pool of {slots} slots cannot hold the {mcfg.moe.top_k} experts of one "
                              "token; give the expert cache more memory")
    mixed = MixedPrecisionCache(high_slots, high_policy, low_slots, low_policy)
    high = FullPrecisionPool(mcfg, mixed.high, host.store, host.device)
    low = LowPrecisionPool(mcfg, mixed.low, low_store, host.device, host.dtype)
    return OffloadedExperts(mcfg, host, high, TransferEngine(host.device, timeline), predictor, low, mixed,
                            mode, thresholds)


def _host_experts(model: nn.Module) -> HostLoadedExperts:
    host = model.experts
    if isinstance(host, OffloadedExperts):  # rebuilt (tests, benchmarks): the same host store
        host = host.host
    if not isinstance(host, HostLoadedExperts):
        raise ConfigError("an offloaded engine needs the model loaded with backend_factory="
                          "HostLoadedExperts.factory(...) (experts in host memory)")
    return host


def _low_precision_store(model: nn.Module, host: HostLoadedExperts, cfg: OffloadConfig,
                         model_dir: Path | None) -> LowPrecisionStore:
    """Low-precision host copies: read from `expertyard quantize` files, else quantized now."""
    mcfg, bits = model.cfg, cfg.low_precision_bits
    files = cfg.low_precision_dir
    if files is None and model_dir is not None and (Path(model_dir) / file_name(bits)).is_file():
        files = Path(model_dir)
    pin = host.device.type == "cuda"
    if files is not None:
        return LowPrecisionStore.from_files(files, host.keys, bits, model, mcfg.hidden_size,
                                            mcfg.moe.intermediate_size, pin)
    ExpertLayout.build(mcfg.hidden_size, mcfg.moe.intermediate_size, bits, cfg.group_size)  # errors first
    return LowPrecisionStore.quantize(host.store, host.keys, bits, cfg.group_size, host.device, pin,
                                      progress=cfg.progress)


def policy_for(cfg: OffloadConfig, model_dir: Path | None) -> CachePolicy:
    """The policy `cfg.policy` (default: the registry's), its parameters from `cfg` or files beside the model."""
    return policy_from_args(cfg, model_dir, name=cfg.policy or DEFAULT_POLICY)


def predictor_for(cfg: OffloadConfig, model: nn.Module, model_dir: Path | None) -> Predictor:
    return make_predictor(cfg.predictor or DEFAULT_PREDICTOR, model, model_dir, cfg.prefetch_depth,
                              cfg.predictor_path)
