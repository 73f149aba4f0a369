"""Threads of the CPU expert compute: how many physical cores this process may use, and setting torch's count.

torch keeps one intra-op thread count per process (`torch.set_num_threads`); every thread that enters an ATen
parallel region, the CPU expert worker included, adopts it. Set it once at start-up: the default is the number
of physical cores the process may run on (hyper-threads share a core's load units, and an expert's matmul at
batch 1 is bound by memory reads, so they add nothing).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from expertyard.errors import ConfigError

_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CPUINFO = Path("/proc/cpuinfo")


def logical_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, capped by a cgroup CPU quota)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    return max(1, min(n, quota) if quota else n)


def physical_cores() -> int:
    """Physical cores this process may run on: distinct (package, core) pairs of its allowed CPUs, read from
    /sys or /proc/cpuinfo; without either, half the logical CPUs (two hyper-threads per core, the common case)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = []
    cores = _sys_cores(cpus) or _cpuinfo_cores(cpus)
    n = len(cores) if cores else max(1, (os.cpu_count() or 1) // 2)
    return max(1, min(n, logical_cpus()))


def set_cpu_threads(n: int | None) -> int:
    """Validate `n` (None: physical cores), set torch's intra-op thread count to it, and return it."""
    limit = logical_cpus()
    if n is None:
        n = physical_cores()
    elif isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ConfigError(f"--cpu-threads {n!r} is out of range: this process may use {limit} logical CPUs "
                          f"({physical_cores()} physical cores); choose an integer in 1..{limit}, or leave it out "
                          f"for the default (the physical cores)")
    torch.set_num_threads(n)
    return n


def _sys_cores(cpus: list[int]) -> set[tuple[str, str]]:
    """(package, core) of each CPU from /sys topology (empty if any is unreadable)."""
    cores = set()
    for cpu in cpus:
        topo = _SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return set()
    return cores


def _cpuinfo_cores(cpus: list[int]) -> set[tuple[str, str]]:
    """(physical id, core id) of each CPU from /proc/cpuinfo (empty if a CPU has no such fields)."""
    try:
        blocks = _CPUINFO.read_text().split("\n\n")
    except OSError:
        return set()
    found = {}
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "processor" in fields and "core id" in fields:
            found[int(fields["processor"])] = (fields.get("physical id", "0"), fields["core id"])
    if not cpus or any(c not in found for c in cpus):
        return set()
    return {found[c] for c in cpus}


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 quota ('max' or absent: None)."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None
