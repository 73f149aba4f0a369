"""Profile a window of a rank's steps with torch.profiler (debugging a slow deployment).

    EXPERTYARD_PROFILE_STEPS=40:45 expertyard bench --disaggregate ...

Every rank profiles its steps 40..44 (host and device) and prints its heaviest operators by host time and by
device time when the window closes. Off (and free) unless the variable is set.
"""

from __future__ import annotations

import os
import sys

import torch


class StepProfiler:
    def __init__(self, rank: int, role: str):
        self.rank, self.role, self.steps = rank, role, 0
        self.window = _parse(os.environ.get("EXPERTYARD_PROFILE_STEPS", ""))
        self._prof = None

    def step(self) -> None:
        """Call once at the start of every step."""
        if self.window is None:
            return
        first, end = self.window
        self.steps += 1
        if self.steps == first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
        elif self.steps == end and self._prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            table = self._prof.key_averages()
            out = [f"== rank {self.rank} ({self.role}): steps {first}..{end - 1}, by host time",
                   table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48)]
            if torch.cuda.is_available():
                out += [f"== rank {self.rank} ({self.role}): by device time",
                        table.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=48)]
            print("\n".join(out), file=sys.stderr, flush=True)
            self._prof = None


def _parse(spec: str) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        a, b = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"EXPERTYARD_PROFILE_STEPS={spec!r}: give FIRST:END step numbers, e.g. 40:45") from None
    return (a, b) if 0 < a < b else None
