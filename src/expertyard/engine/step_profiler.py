"""Profile windows of a rank's steps with torch.profiler (debugging a slow deployment).

    EXPERTYARD_PROFILE_STEPS=40:45 expertyard bench --offload ...
    EXPERTYARD_PROFILE_STEPS=40:45 expertyard bench --disaggregate ...
    EXPERTYARD_PROFILE_STEPS=100:102,230:232 EXPERTYARD_PROFILE_DIR=/tmp/traces expertyard bench ...

The engine (on one process; each rank of a disaggregated deployment) profiles its steps 40..44 (host and
device) and prints its heaviest operators by host time and by device time when the window closes. Several
windows are separated by commas (a benchmark sweeping m runs one m after another in the same processes; a
sweep of offload configurations builds one engine per configuration, each counting its steps from 1). With EXPERTYARD_PROFILE_DIR set, each rank also writes the window's
timeline as a gzipped Chrome trace, `rank{R}_steps{A}-{B}.json.gz` (chrome://tracing, Perfetto), where the
phases of a step are marked (`expertyard.*` ranges). Off (and free) unless the variable is set.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, rank: int, role: str):
        self.rank, self.role, self.steps = rank, role, 0
        self.windows = _parse(os.environ.get("EXPERTYARD_PROFILE_STEPS", ""))
        trace_dir = os.environ.get("EXPERTYARD_PROFILE_DIR", "")
        self.trace_dir = Path(trace_dir) if trace_dir else None
        self._prof = None
        self._window: tuple[int, int] | None = None

    def step(self) -> None:
        """Call once at the start of every step."""
        if not self.windows:
            return
        self.steps += 1
        if self._prof is not None and self.steps == self._window[1]:
            self._close()
        for first, end in self.windows:
            if self.steps == first and self._prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self._prof = torch.profiler.profile(activities=acts)
                self._prof.__enter__()
                self._window = (first, end)

    def _close(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        first, end = self._window
        table = self._prof.key_averages()
        out = [f"== rank {self.rank} ({self.role}): steps {first}..{end - 1}, by host time",
               table.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48)]
        if torch.cuda.is_available():
            out += [f"== rank {self.rank} ({self.role}): by device time",
                    table.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=48)]
        if self.trace_dir is not None:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            path = self.trace_dir / f"rank{self.rank}_steps{first}-{end - 1}.json"
            self._prof.export_chrome_trace(str(path))
            with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()
            out.append(f"== rank {self.rank}: trace written to {path}.gz")
        print("\n".join(out), file=sys.stderr, flush=True)
        self._prof = self._window = None


def _parse(spec: str) -> list[tuple[int, int]]:
    windows = []
    for part in filter(None, spec.split(",")):
        try:
            a, b = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"EXPERTYARD_PROFILE_STEPS={spec!r}: give FIRST:END step numbers, e.g. 40:45, "
                             "several separated by commas") from None
        if not 0 < a < b:
            raise ValueError(f"EXPERTYARD_PROFILE_STEPS={spec!r}: a window {part!r} needs 0 < FIRST < END")
        windows.append((a, b))
    return windows
