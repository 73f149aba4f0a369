"""What an offloaded engine is asked for: budgets, cache policy, prediction, precisions and the host CPU's share.

`OffloadConfig` is owned by `EngineConfig` (`EngineConfig.offload`); the engine plans the GPU budget from it
before it allocates anything (`experts/offload/build.py`). Every field is checked here, before a model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from expertyard.errors import ConfigError
from expertyard.experts.cpu.threads import logical_cpus
from expertyard.experts.policies import ONLINE_POLICIES
from expertyard.experts.predictors import PREDICTOR_NAMES

PrecisionMode = Literal["full", "mixed", "low"]
CpuCompute = Literal["auto", "on", "off"]
CPU_PRECISIONS = ("full", "int8", "int4")
LOW_PRECISION_BITS = (2, 4, 8)


@dataclass
class OffloadConfig:
    gpu_memory_budget: int | None = None
    """All device bytes (weights, KV cache, workspace, expert cache). One of this or `expert_cache_fraction`."""
    expert_cache_fraction: float | None = None
    """Instead of a budget: the budget whose expert cache holds this fraction of all experts."""
    host_memory_budget: int | None = None
    """Host bytes for full-precision expert copies; the rest stay in the safetensors files (disk tier)."""
    policy: str | None = None
    """Expert cache eviction policy by name; None: the default policy."""
    policy_weights: Path | None = None
    """Fitted weights of the `hobbit` policy (JSON); default: hobbit-weights.json beside the model."""
    predictor: str | None = None
    """Pre-gate predictor by name; None: chosen by the engine (prefetch only where the link would idle)."""
    predictor_path: Path | None = None
    prefetch_depth: int = 1
    """MoE layers predicted ahead (1..3)."""
    low_precision_bits: int | None = None
    """Keep a low-precision copy (int2/int4/int8) of every expert beside the full one (HOBBIT)."""
    low_precision_dir: Path | None = None
    group_size: int = 64
    precision: PrecisionMode | None = None
    """On a GPU miss: full copies only, token-level mixed precision, or every pair from its low copy."""
    precision_thresholds: tuple[float, float] = (0.6, 0.9)
    low_pool_fraction: float = 0.25
    """Share of the expert cache's bytes given to the low-precision pool."""
    cpu_compute: CpuCompute = "auto"
    """Compute missed experts on the host CPU: auto = where the measured cost model says it finishes sooner."""
    cpu_precision: str = "full"
    """Weights the CPU computes misses from: full (the model's dtype), int8 or int4 (weight-only, made at load)."""
    cpu_threads: int | None = None
    """Threads for CPU expert compute (torch's intra-op threads, set for the process); default: torch's, which
    is the physical cores."""
    timeline: bool = False
    """Record a Chrome trace of compute, copy and CPU spans."""
    progress: bool = False
    """Show progress bars while building low-precision copies."""

    def __post_init__(self):
        if (self.gpu_memory_budget is None) == (self.expert_cache_fraction is None):
            raise ConfigError("offloading needs exactly one of --gpu-memory-budget SIZE (e.g. 24GiB) or "
                              "--expert-cache-fraction F")
        if self.gpu_memory_budget is not None and self.gpu_memory_budget <= 0:
            raise ConfigError(f"--gpu-memory-budget {self.gpu_memory_budget} B must be positive")
        if self.expert_cache_fraction is not None and not 0 < self.expert_cache_fraction <= 1:
            raise ConfigError(f"--expert-cache-fraction {self.expert_cache_fraction} must be in (0, 1]")
        if self.host_memory_budget is not None and self.host_memory_budget <= 0:
            raise ConfigError(f"--host-memory-budget {self.host_memory_budget} B must be positive")
        if not 1 <= self.prefetch_depth <= 3:
            raise ConfigError(f"--prefetch-depth {self.prefetch_depth} must be 1, 2 or 3")
        self._check_precision()
        self._check_cpu()
        self._check_names()

    def _check_precision(self) -> None:
        if self.low_precision_bits is not None and self.low_precision_bits not in LOW_PRECISION_BITS:
            raise ConfigError(f"--low-precision int{self.low_precision_bits}: choose int2, int4 or int8")
        if self.precision not in (None, "full", "mixed", "low"):
            raise ConfigError(f"--precision {self.precision!r}: choose full, mixed or low")
        if self.precision in ("mixed", "low") and self.low_precision_bits is None:
            raise ConfigError(f"--precision {self.precision} needs low-precision copies: add --low-precision int4 "
                              "(or int2, int8)")
        if self.low_precision_dir is not None and self.low_precision_bits is None:
            raise ConfigError("--low-precision-dir needs --low-precision int4 (or int2, int8): which files to read")
        t1, t2 = self.precision_thresholds
        if not 0 <= t1 <= t2 <= 1:
            raise ConfigError(f"--precision-thresholds {t1},{t2}: need 0 <= T1 <= T2 <= 1")
        if not 0 < self.low_pool_fraction < 1:
            raise ConfigError(f"--low-pool-fraction {self.low_pool_fraction} must be in (0, 1)")
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"--group-size {self.group_size} must be a power of two")

    def _check_cpu(self) -> None:
        if self.cpu_compute not in ("auto", "on", "off"):
            raise ConfigError(f"--cpu-compute {self.cpu_compute!r}: choose auto, on or off")
        if self.cpu_precision not in CPU_PRECISIONS:
            raise ConfigError(f"--cpu-precision {self.cpu_precision!r}: choose one of {', '.join(CPU_PRECISIONS)}")
        available = logical_cpus()
        if self.cpu_threads is not None and not 1 <= self.cpu_threads <= available:
            raise ConfigError(f"--cpu-threads {self.cpu_threads} is out of range: this process may use 1 to "
                              f"{available} CPUs; leave it out for the default (the physical cores)")
        if self.precision_mode == "mixed" and (self.cpu_compute == "on" or self.cpu_precision != "full"):
            raise ConfigError("the host CPU computes misses of a full-precision cache (--precision full) or, with "
                              "--precision low --cpu-precision int4, from the same int4 copies as the device "
                              "(int4 on both pipes); token-level mixed precision (--low-precision without "
                              "--precision low) keeps the CPU out: drop --cpu-compute on / --cpu-precision, or add "
                              "--precision low")
        if self.precision_mode == "low" and self.cpu_compute != "off":
            if self.cpu_compute == "on" and self.cpu_precision != "int4":
                raise ConfigError("--cpu-compute on with --precision low computes misses from the device's int4 "
                                  "copies: add --cpu-precision int4")
            if self.cpu_precision == "int8":
                raise ConfigError("--precision low shares its int4 copies with the CPU: use --cpu-precision int4")
            if self.cpu_precision == "int4" and self.low_precision_bits != 4:
                raise ConfigError(f"--cpu-precision int4 with --precision low shares one int4 copy between the "
                                  f"device and the CPU: use --low-precision int4, not int{self.low_precision_bits}")
        if self.cpu_compute == "off" and (self.cpu_threads is not None or self.cpu_precision != "full"):
            raise ConfigError("--cpu-threads / --cpu-precision set the host CPU's expert compute, which "
                              "--cpu-compute off turns off; drop them or use --cpu-compute auto")

    def _check_names(self) -> None:
        if self.policy is not None and self.policy not in ONLINE_POLICIES:
            raise ConfigError(f"--policy {self.policy!r}: choose one of {', '.join(sorted(ONLINE_POLICIES))} "
                              "(belady reads the future: it is for `expertyard simulate`)")
        if self.policy_weights is not None and self.policy != "hobbit":
            raise ConfigError(f"--policy-weights is for --policy hobbit, not {self.policy or 'the default'}")
        names = PREDICTOR_NAMES
        if self.predictor is not None and self.predictor not in names:
            raise ConfigError(f"--predictor {self.predictor!r}: choose one of {', '.join(names)}")

    @property
    def precision_mode(self) -> PrecisionMode:
        return self.precision or ("mixed" if self.low_precision_bits is not None else "full")

    @property
    def shares_int4_copies(self) -> bool:
        """int4 on both pipes: the device cache holds int4 copies, and misses are copied as int4 or computed from
        the same copies on the host CPU."""
        return self.precision_mode == "low" and self.cpu_compute != "off" and self.cpu_precision == "int4"
