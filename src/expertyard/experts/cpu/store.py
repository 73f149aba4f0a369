"""Every routed expert in the layouts the CPU computes from: full precision as views on the host store, int8 and
int4 copies built once at construction.

Full precision costs no extra memory (the CPU reads the host store's buffer, pinned or not). Each low precision
adds its copies of every expert to host RAM (Mixtral-8x7B: int8 ~171 MiB, int4 ~90 MiB an expert), so the
store checks MemAvailable before building them. Experts of the host store's disk tier are read from their
safetensors files: once at construction for the low-precision copies, and on every `get(key, "full")` (slow;
`in_memory` tells a scheduler which experts the CPU can compute without a disk read).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from expertyard.device import pin_for_life_of
from expertyard.errors import CheckpointError, ConfigError
from expertyard.experts.cpu.weights import (FLOAT_DTYPES, CpuExpert, FullCpuExpert, check_group_size,
                                            int4_nbytes, int8_nbytes, quantize_for_cpu)
from expertyard.experts.host_store import HostExpertStore
from expertyard.experts.policies.base import ExpertKey

# D = hidden size, I = expert intermediate size

PRECISIONS = ("full", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}
_MEMINFO = Path("/proc/meminfo")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def parse_precisions(precisions) -> set[str]:
    """A non-empty subset of {"full", "int8", "int4"} (a string is one name or a comma-separated list)."""
    if isinstance(precisions, str):
        precisions = [p.strip() for p in precisions.split(",") if p.strip()]
    got = {str(p).lower() for p in precisions}
    bad = sorted(got - set(PRECISIONS))
    if bad or not got:
        raise ConfigError(f"CPU expert precision(s) {', '.join(bad) or '(none)'}: choose one or more of "
                          f"{', '.join(PRECISIONS)}")
    return got


def _size(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


class CpuExpertStore:
    def __init__(self, host_store: HostExpertStore, keys: list[ExpertKey], precisions, group_size: int | None = None,
                 progress: bool = True, int4_buffers: bool = False, pin: bool = False):
        """Build the low-precision CPU copies of every expert in `keys` (Mixtral-8x7B, 16 cores: ~0.5 s an expert
        for int4, ~0.8 s for int8 and int4). ConfigError when host RAM cannot hold them. `int4_buffers`: each
        int4 expert in one buffer (`int4_buffer`, pinned with `pin`) that the device's int4 pool copies as it is."""
        self.host = host_store
        self.int4_buffers, self.pin = int4_buffers, pin
        self.pinned_int4 = False
        self._int4_buffers: dict[ExpertKey, torch.Tensor] = {}
        self.keys = list(keys)
        self.precisions = parse_precisions(precisions)
        self.hidden, self.inter, self.dtype = host_store.hidden, host_store.inter, host_store.dtype
        if self.dtype not in FLOAT_DTYPES:
            raise ConfigError(f"CPU expert compute needs a float model dtype (bfloat16, float16, float32), "
                              f"not {self.dtype}")
        self.group_size = check_group_size(group_size, self.hidden, self.inter)
        unknown = [k for k in self.keys if not host_store.in_memory(k) and k not in host_store.disk]
        if unknown:
            raise ConfigError(f"{len(unknown)} experts (first: layer {unknown[0][0]} expert {unknown[0][1]}) are "
                              f"not in the host store")
        self._full: dict[ExpertKey, FullCpuExpert] = {}
        self._low: dict[str, dict[ExpertKey, CpuExpert]] = {p: {} for p in self.precisions if p != "full"}
        self._nbytes = {"full": host_store.expert_bytes, "int8": int8_nbytes(self.hidden, self.inter, self.dtype),
                        "int4": int4_nbytes(self.hidden, self.inter, self.group_size, self.dtype)}
        self._files: dict[Path, object] = {}
        self._disk_lock = threading.Lock()
        self._build(progress)

    # ---- building -----------------------------------------------------------------------------------------
    def _build(self, progress: bool) -> None:
        low = sorted(self._low, key=lambda p: PRECISIONS.index(p))
        if not low or not self.keys:
            return
        self._check_ram({p: self._nbytes[p] for p in low})
        if self.int4_buffers and "int4" in self._low:  # every int4 expert in a row of one allocation
            self._int4_pool = torch.empty(len(self.keys), self._nbytes["int4"], dtype=torch.uint8)
        for key in tqdm(self.keys, desc=f"CPU expert copies ({', '.join(low)})", unit="expert", disable=not progress):
            w13, w2 = self._weights(key)
            for p in low:
                self._low[p][key] = quantize_for_cpu(w13, w2, _BITS[p], self.group_size, self.dtype)
            if self.int4_buffers and "int4" in self._low:
                self._int4_buffers[key] = _into_row(self._low["int4"][key], self._int4_pool[len(self._int4_buffers)])
        if self.int4_buffers and self.pin:
            self.pinned_int4 = pin_for_life_of(self, self._int4_pool)  # one registration, not one per expert

    def _check_ram(self, per_expert: dict[str, int]) -> None:
        need_by = {p: n * len(self.keys) for p, n in per_expert.items()}
        # one expert's float32 temporaries while quantizing (rows are chunked; the int32 codes are whole)
        need = sum(need_by.values()) + 3 * self.inter * self.hidden * 4 * 2
        avail = available_memory_bytes()
        if avail is not None and need > avail:
            parts = ", ".join(f"{p}: {_size(n)}" for p, n in need_by.items())
            raise ConfigError(
                f"the CPU expert copies of {len(self.keys)} experts ({parts}) need {_size(need)} of host RAM, but "
                f"only {_size(avail)} is available (MemAvailable in /proc/meminfo); choose fewer CPU precisions "
                f"(full needs no copy), lower --host-memory-budget so fewer full-precision experts stay in RAM "
                f"(the rest are read from disk), or free host memory")

    def _weights(self, key: ExpertKey) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, D], w2 [D, I]) of `key` in the model dtype: views on the host store or read from disk."""
        e = self.get(key, "full") if self.host.in_memory(key) else self._from_disk(key)
        return e.w13, e.w2

    def _from_disk(self, key: ExpertKey) -> FullCpuExpert:
        """A fresh buffer filled from the safetensors files (not the host store's staging buffers, which the
        copy engine uses from another thread)."""
        tensors = self.host.disk.get(key, {})
        if len(tensors) != 3:
            raise CheckpointError(f"expert {key[1]} of layer {key[0]} has no complete copy on disk")
        i, d = self.inter, self.hidden
        buf = torch.empty(3 * i * d, dtype=self.dtype)  # [gate | up | down]
        parts = {"gate": buf[:i * d].view(i, d), "up": buf[i * d:2 * i * d].view(i, d),
                 "down": buf[2 * i * d:].view(d, i)}
        with self._disk_lock:
            for proj, dt in tensors.items():
                if dt.path not in self._files:
                    self._files[dt.path] = safe_open(dt.path, framework="pt", device="cpu")
                parts[proj].copy_(self._files[dt.path].get_tensor(dt.name))
        return FullCpuExpert.from_flat(buf, d, i)

    # ---- reading ------------------------------------------------------------------------------------------
    def get(self, key: ExpertKey, precision: str) -> CpuExpert:
        """The layout of `key` the CPU computes from in `precision` (full: views on the host buffer; a disk-tier
        expert is read from its files on every call)."""
        if precision == "full":
            e = self._full.get(key)
            if e is None:
                if not self.host.in_memory(key):
                    return self._from_disk(key)
                e = self._full[key] = FullCpuExpert.from_flat(self.host.source(key, torch.device("cpu")),
                                                             self.hidden, self.inter)
            return e
        if precision not in self._low:
            raise KeyError(f"precision {precision!r} was not built; this store has {sorted(self.precisions)}")
        return self._low[precision][key]

    def int4_buffer(self, key: ExpertKey) -> torch.Tensor:
        """The int4 copy of `key` as one uint8 buffer (pinned with `pin`): w13 packed, w13 scale_and_zero, w2
        packed, w2 scale_and_zero, back to back (built with `int4_buffers`)."""
        return self._int4_buffers[key]

    def in_memory(self, key: ExpertKey, precision: str) -> bool:
        """True when computing `key` in `precision` reads no file."""
        return self.host.in_memory(key) if precision == "full" else key in self._low.get(precision, {})

    def nbytes(self, precision: str) -> int:
        """Weight bytes one expert's CPU call reads in `precision` (the same for every expert)."""
        if precision != "full" and precision not in self._low:
            raise KeyError(f"precision {precision!r} was not built; this store has {sorted(self.precisions)}")
        return self._nbytes[precision]

    @property
    def memory_bytes(self) -> int:
        """Host bytes the low-precision copies hold (full precision adds none)."""
        return sum(self._nbytes[p] * len(self.keys) for p in self._low)


def _into_row(expert, row: torch.Tensor) -> torch.Tensor:
    """Move an Int4CpuExpert's four tensors into `row` [nbytes] uint8 (the expert keeps views on it)."""
    mats = (expert.w13, expert.w2)
    parts = [t for m in mats for t in (m.packed, m.scale_and_zero)]
    views, pos = [], 0
    for t in parts:
        n = t.numel() * t.element_size()
        v = row[pos:pos + n].view(t.dtype).view(t.shape)
        v.copy_(t)
        views.append(v)
        pos += n
    if pos != row.numel():
        raise AssertionError(f"an int4 expert has {pos} bytes, its row {row.numel()}")
    (mats[0].packed, mats[0].scale_and_zero, mats[1].packed, mats[1].scale_and_zero) = views
    return row
