"""Where the host time of an engine step goes, at almost no cost (no profiler): phases timed with perf_counter.

    EXPERTYARD_STEP_TIMES=1 expertyard bench --disaggregate ...

The engine marks the end of each phase of a step (schedule, the runner's own phases, sampling, waiting for the
tokens, post-processing); at exit the process prints, per kind of step (decode-only or with prefill), the median
milliseconds of each phase (the first decode steps capture CUDA graphs: the median ignores them). A runner may
also time a span of its device work with `device_span` (CUDA events, read once the device has passed them, so
that timing never makes the host wait): with synchronous scheduling, a step's host time minus that span is about
what the device sat idle waiting for the host. Off (and free) unless the variable is set.
"""

from __future__ import annotations

import atexit
import gc
import os
import statistics
import sys
import time
from collections import defaultdict

import torch


class StepTimer:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.label = ""  # whose steps (a deployment's ranks each print their own report)
        self.kind = ""
        self.times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.steps: dict[str, int] = defaultdict(int)
        self._last = 0.0
        self._spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # not read yet
        self.gc_pauses: dict[int, list[float]] = defaultdict(list)  # generation -> seconds of each collection
        self._gc_began = 0.0
        if enabled:
            gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        """The garbage collector stops every thread of the rank; a full collection of everything start-up made
        (not frozen: engine/collector.py) takes ~100-250 ms. Counted from the first step on."""
        if not self.steps:
            return  # start-up (imports: their full collections are not the serving path's)
        if phase == "start":
            self._gc_began = time.perf_counter()
        else:
            self.gc_pauses[info["generation"]].append(time.perf_counter() - self._gc_began)

    def start(self) -> None:
        """A step begins."""
        if not self.enabled:
            return
        self._read_spans(wait=False)
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
        """Events recorded around this step's device work; read once the device has passed them (never waited
        for before the report, so that timing does not serialize an async-scheduled engine)."""
        if self.enabled:
            self._spans.append((self.kind, begin, end))

    def _read_spans(self, wait: bool) -> None:
        pending = []
        for kind, begin, end in self._spans:
            if wait:
                end.synchronize()
            elif not end.query():
                pending.append((kind, begin, end))
                continue
            self.times[kind]["(device span)"].append(begin.elapsed_time(end) / 1000.0)
        self._spans = pending

    def report(self) -> str:
        self._read_spans(wait=True)
        lines = []
        for kind, phases in self.times.items():
            host = sum(statistics.median(v) for k, v in phases.items() if not k.startswith("("))
            who = f" of {self.label}" if self.label else ""
            lines.append(f"step times{who} ({kind}, {self.steps[kind]} steps, medians): host {host * 1e3:.3f} ms")
            lines += [f"  {phase:>24} {statistics.median(v) * 1e3:9.3f} ms" for phase, v in phases.items()]
        if self.gc_pauses:
            lines.append("  garbage collections: " + ", ".join(
                f"generation {g}: {len(v)}, {sum(v) * 1e3:.1f} ms in all, longest {max(v) * 1e3:.1f} ms"
                for g, v in sorted(self.gc_pauses.items())))
        return "\n".join(lines)


STEP_TIMER = StepTimer(os.environ.get("EXPERTYARD_STEP_TIMES", "") not in ("", "0"))


@atexit.register
def _print_report() -> None:
    if STEP_TIMER.enabled and STEP_TIMER.steps:
        print(STEP_TIMER.report(), file=sys.stderr, flush=True)
