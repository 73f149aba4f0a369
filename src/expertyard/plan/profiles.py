"""Hardware profiles: the numbers the performance model needs about one GPU type and its links.

Units everywhere in `expertyard.plan`: seconds, bytes, GB = 1e9 bytes, GB/s = 1e9 bytes/s, TFLOPS = 1e12 FLOP/s.

A profile is either `datasheet` (built in below: peak figures from the vendor's datasheet, times efficiency
factors that are stated assumptions) or `calibrated` (written by `expertyard plan calibrate`, whose effective
figures come from timing the project's own kernels; see bench/plan_calibrate.py). The performance model reads only the
effective figures (`weight_gbps`, `kv_gbps`, `attn_tflops`, `expert_tflops`, the overheads and the links);
the peak figures are kept for reference and for the efficiency columns of reports.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from expertyard.errors import ConfigError


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu: str  # marketing name, e.g. "NVIDIA H200 SXM"
    kind: Literal["datasheet", "calibrated"]
    memory_gb: float  # device memory per GPU, GB (datasheet "GB" read as 1e9 bytes: conservative)
    hbm_gbps: float  # peak memory bandwidth (datasheet)
    peak_tflops: float  # peak dense bf16 tensor-core TFLOPS (datasheet, without sparsity)
    weight_gbps: float  # effective bandwidth at which decode matmuls stream their weights
    kv_gbps: float  # effective bandwidth at which decode attention reads the KV cache
    attn_tflops: float  # effective matmul throughput of the attention side (projections, router, dense FFN)
    expert_tflops: float  # effective grouped-GEMM throughput of the expert FFN (fused_moe)
    attn_overhead_us: float  # fixed time of one layer's attention step for one micro-batch (launches, norms)
    expert_overhead_us: float  # fixed time of one layer's expert step for one micro-batch
    intra_host_gbps: float  # per-GPU, one-direction bandwidth to a GPU of the same host (NVLink or PCIe)
    inter_host_gbps: float  # per-GPU, one-direction network bandwidth to another host (its NIC share)
    link_latency_us: float  # fixed time of one dispatch or combine message
    # host work of the driver rank per decode iteration, which every GPU waits for (scheduling, step planning,
    # the step header, sampling): step_overhead_us + step_overhead_per_seq_us * B; not in the paper's model
    step_overhead_us: float = 0.0
    step_overhead_per_seq_us: float = 0.0
    # the runtime's per-layer work of one exchange that the kernel fits do not time (norm, router, packing,
    # unpacking, combining, launch gaps): exchange_overhead_us + exchange_overhead_per_token_us * b per MoE
    # layer and micro-batch of b tokens, half on each side (perf_model.py); not in the paper's model
    exchange_overhead_us: float = 0.0
    exchange_overhead_per_token_us: float = 0.0
    gpus_per_host: int = 8  # tensor parallelism stays inside a host; units up to this size use intra-host links
    usable_memory_fraction: float = 0.9  # of memory_gb, for weights + KV cache (the rest: activations, context)
    price_per_hour: float | None = None  # USD per GPU-hour, for throughput per cost (None: not ranked by cost)
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # where each figure comes from
    fits: list[dict] = field(default_factory=list, compare=False)  # calibrated: the measured lines and points

    def __post_init__(self):
        if self.kind not in ("datasheet", "calibrated"):
            raise ConfigError(f"profile {self.name!r}: kind={self.kind!r} must be 'datasheet' or 'calibrated'")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("_gb", "_gbps", "_tflops")) and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"profile {self.name!r}: {f.name}={v!r} must be a positive number")
            if f.name.endswith("_us") and not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"profile {self.name!r}: {f.name}={v!r} must be a number >= 0")
        if not 0 < self.usable_memory_fraction <= 1:
            raise ConfigError(f"profile {self.name!r}: usable_memory_fraction={self.usable_memory_fraction} "
                              "must be in (0, 1]")
        if self.gpus_per_host < 1:
            raise ConfigError(f"profile {self.name!r}: gpus_per_host={self.gpus_per_host} must be >= 1")
        if self.price_per_hour is not None and self.price_per_hour <= 0:
            raise ConfigError(f"profile {self.name!r}: price_per_hour={self.price_per_hour} must be > 0 (or null)")

    @property
    def usable_bytes(self) -> float:
        return self.memory_gb * 1e9 * self.usable_memory_fraction

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def with_price(self, price: float | None) -> HardwareProfile:
        return self if price is None else replace(self, price_per_hour=price)

    def with_step_overhead(self, ms: float | None) -> HardwareProfile:
        if ms is None:
            return self
        if ms < 0:
            raise ConfigError(f"--step-overhead-ms {ms} must be >= 0")
        return replace(self, step_overhead_us=ms * 1e3)


# Efficiency factors applied to the datasheet peaks of every built-in profile (assumptions, not measurements;
# calibrate to replace them). WEIGHT: expertyard's fused_moe streamed Mixtral experts at 3,631 GB/s on an H200
# (docs/benchmarks/fused_moe.md), 0.76 of its 4,800 GB/s. KV: the decode attention gathers each sequence's
# cache rows before SDPA, so it reads the cache about twice (assumed). FLOPS: grouped bf16 GEMMs at decode
# batch sizes (assumed). Overheads: a layer's attention step is ~10 kernels, its expert step ~4 (assumed).
WEIGHT_EFF, KV_EFF, FLOPS_EFF = 0.75, 0.35, 0.6
ATTN_OVERHEAD_US, EXPERT_OVERHEAD_US, LINK_LATENCY_US = 30.0, 15.0, 15.0
_ASSUMED = ("assumed efficiency factor (profiles.py WEIGHT_EFF/KV_EFF/FLOPS_EFF) times the datasheet peak; "
            "calibrate to measure")
_PRICE = "assumed indicative on-demand USD per GPU-hour, not from a datasheet; set your own with --price"


def _datasheet(name: str, gpu: str, memory_gb: float, hbm_gbps: float, tflops: float, intra: float, inter: float,
               price: float, datasheet: str, intra_src: str, inter_src: str) -> HardwareProfile:
    return HardwareProfile(
        name=name, gpu=gpu, kind="datasheet", memory_gb=memory_gb, hbm_gbps=hbm_gbps, peak_tflops=tflops,
        weight_gbps=WEIGHT_EFF * hbm_gbps, kv_gbps=KV_EFF * hbm_gbps, attn_tflops=FLOPS_EFF * tflops,
        expert_tflops=FLOPS_EFF * tflops, attn_overhead_us=ATTN_OVERHEAD_US, expert_overhead_us=EXPERT_OVERHEAD_US,
        intra_host_gbps=intra, inter_host_gbps=inter, link_latency_us=LINK_LATENCY_US, price_per_hour=price,
        sources={"memory_gb, hbm_gbps, peak_tflops": datasheet, "intra_host_gbps": intra_src,
                 "inter_host_gbps": inter_src, "weight_gbps, kv_gbps, attn_tflops, expert_tflops": _ASSUMED,
                 "overheads, link_latency_us": "assumed (profiles.py); calibrate to measure",
                 "price_per_hour": _PRICE})


_NIC_400 = "assumed one 400 Gb/s NIC per GPU (8 per HGX host): 50 GB/s"
_NIC_200 = "assumed one 200 Gb/s NIC per GPU: 25 GB/s"
BUILTIN: dict[str, HardwareProfile] = {p.name: p for p in [
    _datasheet("h200", "NVIDIA H200 SXM", 141, 4800, 989, 450, 50, 4.0,
               "NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 4.8 TB/s, BF16 1,979 TFLOPS with sparsity "
               "(989 dense)", "NVLink 4: 900 GB/s per GPU, both directions together (450 each way)", _NIC_400),
    _datasheet("h100", "NVIDIA H100 SXM5 80GB", 80, 3350, 989, 450, 50, 3.0,
               "NVIDIA H100 Tensor Core GPU datasheet (SXM): 80 GB HBM3, 3.35 TB/s, BF16 1,979 TFLOPS with "
               "sparsity (989 dense)", "NVLink 4: 900 GB/s per GPU, both directions (450 each way)", _NIC_400),
    _datasheet("a100", "NVIDIA A100 SXM4 80GB", 80, 2039, 312, 300, 25, 1.8,
               "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS",
               "NVLink 3: 600 GB/s per GPU, both directions (300 each way)", _NIC_200),
    _datasheet("l40s", "NVIDIA L40S", 48, 864, 362, 32, 25, 1.0,
               "NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 733 TFLOPS with sparsity (362 dense)",
               "no NVLink: PCIe Gen4 x16, 64 GB/s both directions (32 each way)", _NIC_200),
    _datasheet("h20", "NVIDIA H20", 96, 4000, 148, 450, 50, 1.3,
               "NVIDIA H20 datasheet (product brief): 96 GB HBM3, 4.0 TB/s, BF16 148 TFLOPS dense",
               "NVLink 4: 900 GB/s per GPU, both directions (450 each way)", _NIC_400),
]}


def load_profile(spec: str | Path) -> HardwareProfile:
    """A built-in profile by name (h200, h100, a100, l40s, h20) or a JSON file written by `plan calibrate`."""
    key = str(spec).lower()
    if key in BUILTIN:
        return BUILTIN[key]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"unknown GPU profile {str(spec)!r}: use a built-in one ({', '.join(BUILTIN)}) or a JSON "
                          "file written by `expertyard plan calibrate --out PROFILE.json`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a JSON profile ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a hardware profile (a JSON object is expected)")
    names = {f.name for f in fields(HardwareProfile)}
    unknown = set(data) - names
    missing = {f.name for f in fields(HardwareProfile) if f.name not in data
               and f.default is MISSING and f.default_factory is MISSING}
    if unknown or missing:
        raise ConfigError(f"{path}: not a hardware profile (unknown keys {sorted(unknown)}, missing {sorted(missing)})")
    return HardwareProfile(**data)
