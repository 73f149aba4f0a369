"""Counters and an optional Chrome-trace timeline: device spans (compute, copies) timed by CUDA events, host
spans (CPU expert compute) timed by the host clock, both from one origin."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TransferStats:
    copies: int = 0
    bytes_copied: int = 0
    copy_events: list = field(default_factory=list)  # (start, end) CUDA events of copies not yet folded
    stall_events: list = field(default_factory=list)  # (before wait, after wait) on the compute stream, likewise
    host_sync_s: float = 0.0  # time the host waited for routing (the one sync of an offloaded layer)
    folded_s: dict = field(default_factory=lambda: {"copy": 0.0, "stall": 0.0})  # seconds of finished pairs

    FOLD_AT = 1024  # pairs kept before the finished ones are summed (a server copies for days)

    def add_copy(self, start, end) -> None:
        self._add("copy", self.copy_events, start, end)

    def add_stall(self, before, after) -> None:
        self._add("stall", self.stall_events, before, after)

    def _add(self, kind: str, pairs: list, a, b) -> None:
        pairs.append((a, b))
        if len(pairs) >= self.FOLD_AT:  # sum the pairs whose end has been reached (no wait), keep the rest
            finished = [p[1].query() for p in pairs]
            self.folded_s[kind] += sum(x.elapsed_time(y) for (x, y), f in zip(pairs, finished) if f) / 1e3
            pairs[:] = [p for p, f in zip(pairs, finished) if not f]

    def busy_seconds(self) -> float:
        return self.folded_s["copy"] + sum(a.elapsed_time(b) for a, b in self.copy_events) / 1e3

    def stall_seconds(self) -> float:
        return self.folded_s["stall"] + sum(a.elapsed_time(b) for a, b in self.stall_events) / 1e3


class Timeline:
    """Spans recorded as CUDA event pairs on named streams, and host spans; written as a chrome://tracing /
    Perfetto file."""

    def __init__(self, cuda: bool = True):
        self.cuda = cuda
        self.spans: list[tuple[str, str, torch.cuda.Event, torch.cuda.Event]] = []
        self.host_spans: list[tuple[str, str, float, float]] = []  # (name, track, start s, end s) host clock
        if cuda:
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()
            self.origin.synchronize()  # the device's origin is now: the host clock starts here too
        self.origin_host = time.perf_counter()

    def span(self, name: str, track: str, stream: torch.cuda.Stream) -> "_Span":
        return _Span(self, name, track, stream)

    @contextmanager
    def host_span(self, name: str, track: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.host_spans.append((name, track, t0, time.perf_counter()))

    def write(self, path: Path) -> None:
        events = []
        if self.cuda:
            torch.cuda.synchronize()
            for name, track, start, end in self.spans:
                ts = self.origin.elapsed_time(start) * 1e3  # us
                events.append({"name": name, "ph": "X", "ts": ts, "dur": start.elapsed_time(end) * 1e3,
                               "pid": "GPU", "tid": track})
        for name, track, t0, t1 in self.host_spans:
            events.append({"name": name, "ph": "X", "ts": (t0 - self.origin_host) * 1e6, "dur": (t1 - t0) * 1e6,
                           "pid": "host", "tid": track})
        Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


class _Span:
    def __init__(self, timeline: Timeline, name: str, track: str, stream):
        self.t, self.name, self.track, self.stream = timeline, name, track, stream

    def __enter__(self):
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record(self.stream)
        return self

    def __exit__(self, *exc):
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.stream)
        self.t.spans.append((self.name, self.track, self.start, end))
