"""Where the host time of an engine step goes, at almost no cost (no profiler): phases timed with perf_counter.

    EXPERTYARD_STEP_TIMES=1 expertyard bench --disaggregate ...

The engine marks the end of each phase of a step (schedule, the runner's own phases, sampling with its one
host sync, post-processing); at exit the process prints, per kind of step (decode-only or with prefill), the
mean milliseconds of each phase. A runner may also time a span of device work with `device_span` (CUDA events,
read one step later so that nothing waits): the median device time of that span is printed beside the host phases,
and a step's host time minus it is what the device sat idle waiting for the host. Off (and free) unless the
variable is set.
"""

from __future__ import annotations

import atexit
import os
import statistics
import sys
import time
from collections import defaultdict

import torch


class StepTimer:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.kind = ""
        self.times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.steps: dict[str, int] = defaultdict(int)
        self._last = 0.0
        self._span: tuple[str, torch.cuda.Event, torch.cuda.Event] | None = None

    def start(self) -> None:
        """A step begins."""
        if not self.enabled:
            return
        self._read_span()
        self._last = time.perf_counter()

    def kind_of_step(self, kind: str) -> None:
        """What the step that began is (e.g. "decode", "prefill"): its phases are reported under that kind."""
        if self.enabled:
            self.kind = kind
            self.steps[kind] += 1

    def mark(self, phase: str) -> None:
        """The phase that ran since the previous mark (or the start) ends now."""
        if not self.enabled:
            return
        now = time.perf_counter()
        self.times[self.kind][phase].append(now - self._last)
        self._last = now

    def device_span(self, begin: torch.cuda.Event, end: torch.cuda.Event) -> None:
        """Events recorded around this step's device work; read at the next step's start."""
        if self.enabled:
            self._span = (self.kind, begin, end)

    def _read_span(self) -> None:
        if self._span is not None:
            kind, begin, end = self._span
            end.synchronize()
            self.times[kind]["(device span)"].append(begin.elapsed_time(end) / 1000.0)
            self._span = None

    def report(self) -> str:
        lines = []
        for kind, phases in self.times.items():
            host = sum(statistics.median(v) for k, v in phases.items() if not k.startswith("("))
            lines.append(f"step times ({kind}, {self.steps[kind]} steps, medians): host {host * 1e3:.3f} ms")
            lines += [f"  {phase:>24} {statistics.median(v) * 1e3:9.3f} ms" for phase, v in phases.items()]
        return "\n".join(lines)


STEP_TIMER = StepTimer(os.environ.get("EXPERTYARD_STEP_TIMES", "") not in ("", "0"))


@atexit.register
def _print_report() -> None:
    if STEP_TIMER.enabled and STEP_TIMER.steps:
        print(STEP_TIMER.report(), file=sys.stderr, flush=True)
