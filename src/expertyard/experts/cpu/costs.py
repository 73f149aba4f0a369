"""The hybrid scheduler's cost figures, measured at start-up on this machine.

- the link: bytes per second of a pinned host-to-device copy of one expert (without CUDA, a host memcpy: the
  CPU then plays both sides, and a "copy" is a memcpy);
- the CPU: seconds per expert call as a + b * tokens, per precision, fitted to the fastest of a few calls at 1,
  4 and 16 tokens, rotating over up to three experts so that repeats read from memory, not the CPU's cache;
- the GPU: seconds per resident expert call, fitted the same way (without CUDA: the CPU's full-precision fit).

Calibration runs each measured layout (1 + repeats) times at each of the 3 token counts: Mixtral-8x7B, bf16,
full + int8 + int4 and the GPU took 0.48 s in all with 3 repeats on the 16-core H200 host (torch 2.11); the
default is 5.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from expertyard.errors import ConfigError
from expertyard.experts.cpu.store import PRECISIONS, CpuExpertStore
from expertyard.experts.cpu.weights import CpuExpert, FullCpuExpert

# T = tokens, D = hidden size, I = expert intermediate size

CALIBRATION_TOKENS = (1, 4, 16)


@dataclass
class HybridCosts:
    pcie_bytes_per_s: float  # pinned host->device copy; without CUDA, a host memcpy (the stand-in)
    cpu_fit: dict[str, tuple[float, float]]  # precision -> (a seconds, b seconds per token)
    gpu_fit: tuple[float, float]  # (a seconds, b seconds per token) of one resident expert
    expert_bytes: dict[str, int] = field(default_factory=dict)  # precision -> bytes of one expert
    threads: int = 0  # torch's CPU threads when measured
    link: str = "pinned host->device"
    gpu: str = "cuda"

    def __post_init__(self):
        if not self.pcie_bytes_per_s > 0:
            raise ConfigError(f"pcie_bytes_per_s={self.pcie_bytes_per_s} must be positive")
        self.cpu_fit = {p: (float(a), float(b)) for p, (a, b) in self.cpu_fit.items()}
        self.gpu_fit = (float(self.gpu_fit[0]), float(self.gpu_fit[1]))
        for what, (a, b) in [*((f"cpu_fit[{p!r}]", f) for p, f in self.cpu_fit.items()), ("gpu_fit", self.gpu_fit)]:
            if a < 0 or b < 0 or a + b <= 0:
                raise ConfigError(f"{what}=({a}, {b}) must be (a >= 0, b >= 0) seconds with a + b > 0")

    def cpu_s(self, precision: str, tokens: int) -> float:
        """Seconds for the CPU to compute one expert over `tokens` tokens in `precision` (0 tokens: 0)."""
        if precision not in self.cpu_fit:
            raise KeyError(f"no CPU cost for precision {precision!r}; measured: {sorted(self.cpu_fit)}")
        a, b = self.cpu_fit[precision]
        return a + b * tokens if tokens > 0 else 0.0

    def gpu_s(self, tokens: int) -> float:
        """Seconds for the GPU to compute one resident expert over `tokens` tokens (0 tokens: 0)."""
        a, b = self.gpu_fit
        return a + b * tokens if tokens > 0 else 0.0

    def copy_s(self, nbytes: int) -> float:
        """Seconds to copy `nbytes` over the link."""
        return nbytes / self.pcie_bytes_per_s

    def describe(self) -> str:
        """One line per figure (for --stats)."""
        full = self.expert_bytes.get("full")
        expert = f"; one full expert ({full / 2 ** 20:.1f} MiB) in {self.copy_s(full) * 1e3:.3f} ms" if full else ""
        lines = [f"link ({self.link}): {self.pcie_bytes_per_s / 1e9:.1f} GB/s{expert}"]
        for p in sorted(self.cpu_fit, key=lambda p: PRECISIONS.index(p) if p in PRECISIONS else 99):
            a, b = self.cpu_fit[p]
            size = f", {self.expert_bytes[p] / 2 ** 20:.1f} MiB read" if p in self.expert_bytes else ""
            lines.append(f"CPU {p} ({self.threads} threads): {a * 1e3:.3f} ms + {b * 1e3:.4f} ms/token "
                         f"(1 token: {self.cpu_s(p, 1) * 1e3:.2f} ms, 16: {self.cpu_s(p, 16) * 1e3:.2f} ms{size})")
        a, b = self.gpu_fit
        lines.append(f"GPU ({self.gpu}): {a * 1e3:.3f} ms + {b * 1e3:.4f} ms/token per resident expert "
                     f"(1 token: {self.gpu_s(1) * 1e3:.3f} ms)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"pcie_bytes_per_s": self.pcie_bytes_per_s, "cpu_fit": {p: list(f) for p, f in self.cpu_fit.items()},
                "gpu_fit": list(self.gpu_fit), "expert_bytes": dict(self.expert_bytes), "threads": self.threads,
                "link": self.link, "gpu": self.gpu}

    @classmethod
    def from_dict(cls, d: dict) -> HybridCosts:
        return cls(pcie_bytes_per_s=float(d["pcie_bytes_per_s"]),
                   cpu_fit={p: tuple(f) for p, f in d["cpu_fit"].items()}, gpu_fit=tuple(d["gpu_fit"]),
                   expert_bytes={p: int(n) for p, n in d.get("expert_bytes", {}).items()},
                   threads=int(d.get("threads", 0)), link=d.get("link", "pinned host->device"),
                   gpu=d.get("gpu", "cuda"))


def fit_linear(tokens: Iterable[int], seconds: Iterable[float]) -> tuple[float, float]:
    """Least-squares (a, b) of seconds ~ a + b * tokens, constrained to a, b >= 0 (so costs never fall as tokens
    grow): a negative slope (noise) becomes the flat mean, a negative intercept a line through the origin."""
    ts, ss = [float(t) for t in tokens], [float(s) for s in seconds]
    n = len(ts)
    mt, ms = sum(ts) / n, sum(ss) / n
    var = sum((t - mt) ** 2 for t in ts)
    b = sum((t - mt) * (s - ms) for t, s in zip(ts, ss)) / var if var > 0 else 0.0
    if b <= 0:
        return ms, 0.0
    a = ms - b * mt
    if a < 0:
        return 0.0, sum(t * s for t, s in zip(ts, ss)) / sum(t * t for t in ts)
    return a, b


def _fastest(call: Callable[[int], None], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls call(r), after one warm-up call."""
    call(0)
    best = float("inf")
    for r in range(1, repeats + 1):
        t = time.perf_counter()
        call(r)
        best = min(best, time.perf_counter() - t)
    return best


def _fit_layouts(layouts: list[CpuExpert], hidden: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    secs = []
    for t in CALIBRATION_TOKENS:
        x = torch.randn(t, hidden).to(dtype)  # [T, D]
        secs.append(_fastest(lambda r: layouts[r % len(layouts)].forward(x), repeats))
    return fit_linear(CALIBRATION_TOKENS, secs)


def _fit_gpu(w13: torch.Tensor, w2: torch.Tensor, device: torch.device, repeats: int) -> tuple[float, float]:
    w13, w2 = w13.to(device), w2.to(device)  # [2I, D], [D, I]
    i = w2.shape[1]
    secs = []
    for t in CALIBRATION_TOKENS:
        x = torch.randn(t, w13.shape[1], device=device, dtype=w13.dtype)  # [T, D]

        def call(_):
            h = F.linear(x, w13)  # [T, 2I]
            F.linear(F.silu(h[:, :i]) * h[:, i:], w2)  # [T, D]
            torch.cuda.synchronize(device)

        secs.append(_fastest(call, repeats))
    return fit_linear(CALIBRATION_TOKENS, secs)


def _link_bytes_per_s(src: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Bytes per second copying the flat host buffer `src` to `device` (CPU: into another host buffer). On CUDA
    each copy is timed by events on the device, the best of at least 10 (host timing of a 17 MB copy was seen
    4x slow now and then, which sent every miss to the CPU)."""
    src = src.view(-1)
    dst = torch.empty_like(src, device=device)
    nbytes = src.numel() * src.element_size()
    if device.type != "cuda":
        return nbytes / _fastest(lambda _: dst.copy_(src), repeats)
    times = []
    for _ in range(1 + max(repeats, 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / min(times[1:])  # the first is a warm-up


def measure_costs(store: CpuExpertStore, device: torch.device, precisions: Iterable[str] | None = None,
                  repeats: int = 5) -> HybridCosts:
    """Measure the link, the CPU per precision (default: the store's) and the GPU on up to three of the store's
    experts (those in memory first). `device` is where resident experts run (CUDA, or the CPU standing in)."""
    precisions = sorted(set(precisions or store.precisions), key=PRECISIONS.index)
    keys = sorted(store.keys, key=lambda k: not store.host.in_memory(k))[:3]
    if not keys:
        raise ConfigError("cannot measure CPU expert costs: the CPU expert store holds no expert")
    full = [store.get(k, "full") for k in keys]
    cuda = device.type == "cuda"
    cpu_fit = {p: _fit_layouts(full if p == "full" else [store.get(k, p) for k in keys], store.hidden, store.dtype,
                               repeats) for p in precisions}
    if cuda:
        gpu_fit = _fit_gpu(full[0].w13, full[0].w2, device, repeats)
    else:
        gpu_fit = cpu_fit["full"] if "full" in cpu_fit else _fit_layouts(full, store.hidden, store.dtype, repeats)
    src = store.host.source(keys[0], torch.device("cpu")) if store.host.in_memory(keys[0]) else None
    if src is None or (cuda and not store.host.pinned):  # the engine copies from pinned rows (or pinned staging)
        src = torch.empty(store.host.numel, dtype=store.dtype, pin_memory=cuda)
        src.view(torch.uint8).fill_(1)
    return HybridCosts(pcie_bytes_per_s=_link_bytes_per_s(src, device, repeats), cpu_fit=cpu_fit, gpu_fit=gpu_fit,
                       expert_bytes={p: store.nbytes(p) for p in ("full", *precisions)},
                       threads=torch.get_num_threads(),
                       link="pinned host->device" if cuda else "host memcpy, standing in for the link (no CUDA)",
                       gpu=torch.cuda.get_device_name(device) if cuda else "the CPU standing in, full precision")
