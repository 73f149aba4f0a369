"""How a device memory budget is split: resident weights, KV cache, workspace, and expert cache slots, and how
the expert cache's bytes split into a full-precision and a low-precision pool (`split_pools`, shared by the
engine and the trace simulator so that both size the pools alike)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertyard.config import ModelConfig
from expertyard.errors import ConfigError

GiB = 2**30
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "g": GiB, "gb": GiB, "gib": GiB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '1.5G', '800MB', '123456' -> bytes (binary units: 1G = 1GiB)."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in UNITS or value < 0:
        raise ConfigError(f"cannot read size {text!r}; write e.g. 24GiB, 1.5G, 800MB or a number of bytes")
    return int(value * UNITS[unit])


def workspace_bytes(cfg: ModelConfig, max_tokens: int, max_model_len: int, elt: int) -> int:
    """Upper estimate of activations for one step of `max_tokens` tokens (the caching allocator keeps them):
    hidden states and projections, the MoE intermediate of every (token, expert) pair, attention scores of a
    padded prefill, logits, the predictor's stacked gates, plus 384 MiB for cuBLAS workspaces, CUDA-graph pools
    and small buffers (measured: DeepSeek-V2-Lite decode with 64 MiB of slack peaked 140 MiB over the budget)."""
    att = cfg.attention
    t, d = max_tokens, cfg.hidden_size
    pairs = t * cfg.moe.top_k
    inter = max(cfg.moe.intermediate_size, cfg.dense_intermediate_size, cfg.moe.shared_intermediate_size)
    proj = t * (att.num_heads + 2 * att.num_kv_heads) * max(att.head_dim, att.kv_lora_rank + att.qk_rope_head_dim)
    hidden = t * d * 8 * elt + proj * elt + 2 * t * inter * elt + pairs * cfg.moe.intermediate_size * elt
    moe = t * d * 4 + pairs * 16
    scores = t * min(max_model_len, max_tokens * 4) * att.num_heads * 4
    logits = 2 * max_tokens * cfg.vocab_size * 4
    predictor = cfg.num_layers * 3 * cfg.moe.num_experts * d * 4  # stacked future gates, float32, depth <= 3
    return hidden + moe + scores + logits + predictor + 384 * 2**20  # + cuBLAS workspaces, graph pools, small buffers


@dataclass(frozen=True)
class GpuBudgetPlan:
    budget: int
    resident_bytes: int  # non-expert weights on the GPU
    kv_cache_bytes: int
    workspace_bytes: int
    expert_bytes: int  # one expert slot
    slots: int
    total_experts: int
    device_name: str = "GPU"

    def describe(self) -> str:
        mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        return (f"{self.device_name} memory budget {mib(self.budget)}: resident weights {mib(self.resident_bytes)}, "
                f"KV cache {mib(self.kv_cache_bytes)}, workspace {mib(self.workspace_bytes)}, "
                f"expert cache {self.slots} slots x {mib(self.expert_bytes)} = {mib(self.slots * self.expert_bytes)} "
                f"({100 * self.slots / self.total_experts:.1f}% of {self.total_experts} experts)")


def plan_gpu_budget(budget: int, cfg: ModelConfig, resident: int, kv_cache: int, workspace: int,
                    expert_bytes: int, device_name: str = "GPU") -> GpuBudgetPlan:
    total = len(cfg.moe_layers) * cfg.moe.num_experts
    min_slots = cfg.moe.top_k  # one token's experts of one layer must fit at once
    fixed = resident + kv_cache + workspace
    slots = min(total, max(0, (budget - fixed) // expert_bytes))
    if slots < min_slots:
        need = fixed + min_slots * expert_bytes
        raise ConfigError(
            f"a {device_name} memory budget of {budget / GiB:.2f} GiB is too small: resident weights {resident / GiB:.2f} GiB + "
            f"KV cache {kv_cache / GiB:.2f} GiB + workspace {workspace / GiB:.2f} GiB + {min_slots} experts "
            f"({min_slots} x {expert_bytes / 2**20:.0f} MiB) need at least {need / GiB:.2f} GiB; raise the budget, "
            f"or lower --max-model-len / --max-num-seqs")
    return GpuBudgetPlan(budget, resident, kv_cache, workspace, expert_bytes, int(slots), total, device_name)


def budget_for_fraction(fraction: float, cfg: ModelConfig, resident: int, kv_cache: int, workspace: int,
                        expert_bytes: int) -> int:
    """The budget whose expert cache holds `fraction` of all experts beside the fixed allocations."""
    slots = math.ceil(fraction * len(cfg.moe_layers) * cfg.moe.num_experts)
    return resident + kv_cache + workspace + slots * expert_bytes


def split_pools(slots: int, low_ratio: float, low_fraction: float, top_k: int) -> tuple[int, int]:
    """(full-precision slots, low-precision slots) from an expert cache of `slots` full-precision experts:
    a share `low_fraction` of its bytes goes to low-precision copies, each `low_ratio` of a full expert's bytes.

        high = floor((1 - f) * slots),   low = floor((slots - high) / r)
    """
    if not 0 < low_fraction < 1:
        raise ConfigError(f"--low-pool-fraction {low_fraction} must be in (0, 1)")
    if not 0 < low_ratio <= 1:
        raise ConfigError(f"low-precision expert size ratio {low_ratio} must be in (0, 1]")
    high = math.floor((1 - low_fraction) * slots)
    low = math.floor((slots - high) / low_ratio + 1e-9)
    if high < top_k or low < top_k:
        raise ConfigError(f"an expert cache of {slots} full-precision slots split {1 - low_fraction:.2f}/"
                          f"{low_fraction:.2f} gives {high} full-precision and {low} low-precision slots; each pool "
                          f"must hold the {top_k} experts of one token: raise the budget (--gpu-memory-budget / "
                          "--expert-cache-fraction), change --low-pool-fraction, or use --precision full")
    return high, low
