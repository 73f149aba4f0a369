"""Counters and an optional Chrome-trace timeline of compute and copy spans, timed by CUDA events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TransferStats:
    copies: int = 0
    bytes_copied: int = 0
    copy_events: list = field(default_factory=list)  # (start, end) CUDA events per copy
    stall_events: list = field(default_factory=list)  # (before wait, after wait) on the compute stream
    host_sync_s: float = 0.0  # time the host waited for routing (the one sync of an offloaded layer)

    def busy_seconds(self) -> float:
        return sum(a.elapsed_time(b) for a, b in self.copy_events) / 1e3

    def stall_seconds(self) -> float:
        return sum(a.elapsed_time(b) for a, b in self.stall_events) / 1e3


class Timeline:
    """Spans recorded as CUDA event pairs on named streams; written as a chrome://tracing / Perfetto file."""

    def __init__(self):
        self.origin = torch.cuda.Event(enable_timing=True)
        self.origin.record()
        self.spans: list[tuple[str, str, torch.cuda.Event, torch.cuda.Event]] = []

    def span(self, name: str, track: str, stream: torch.cuda.Stream) -> "_Span":
        return _Span(self, name, track, stream)

    def write(self, path: Path) -> None:
        torch.cuda.synchronize()
        events = []
        for name, track, start, end in self.spans:
            ts = self.origin.elapsed_time(start) * 1e3  # us
            events.append({"name": name, "ph": "X", "ts": ts, "dur": start.elapsed_time(end) * 1e3,
                           "pid": "GPU", "tid": track})
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
