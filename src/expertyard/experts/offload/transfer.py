"""The transfer engine: copies experts from host memory into device slots on a dedicated copy stream, ordered
after the last kernel that read the slot, and keeps the transfer statistics and the optional timeline."""

from __future__ import annotations

import torch

from expertyard.experts.cache_state import Load
from expertyard.experts.offload.slot_pool import SlotPool
from expertyard.experts.telemetry import Timeline, TransferStats


class TransferEngine:
    def __init__(self, device: torch.device, timeline: bool = False):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.timeline = Timeline(self.cuda) if timeline else None
        self.stats = TransferStats()
        self._last_copy: torch.cuda.Event | None = None

    def copy(self, pool: SlotPool, loads: list[Load]) -> None:
        """Copy each loaded expert into its slot of `pool` (after the slot's last reader, on CUDA), and point the
        pool's device table at the new residents."""
        pool.set_table(loads)
        for ld in loads:
            src, nbytes = pool.source(ld.key)
            self.stats.copies += 1
            self.stats.bytes_copied += nbytes
            if not self.cuda:
                pool.write(ld.slot, src)
                continue
            if ld.slot in pool.last_read:
                self.stream.wait_event(pool.last_read.pop(ld.slot))
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            with torch.cuda.stream(self.stream):
                pool.write(ld.slot, src)
            done.record(self.stream)
            pool.ready[ld.slot] = self._last_copy = done
            self.stats.add_copy(start, done)
            if self.timeline is not None:
                kind = ("prefetch" if ld.prefetch else "miss") + ("" if pool.name == "full" else f" {pool.name}")
                self.timeline.spans.append((f"{kind} L{ld.key[0]} E{ld.key[1]}", "copy", start, done))
            pool.copied(src, done)

    def link_idle(self) -> bool:
        """No copy is queued or running (a non-blocking query)."""
        return self._last_copy is None or self._last_copy.query()

    def wait(self, stream, events: list) -> None:
        """Make `stream` wait for `events` (copies), recording the stall it may cause."""
        if not events:
            return
        before = torch.cuda.Event(enable_timing=True)
        before.record(stream)
        for ev in events:
            stream.wait_event(ev)
        after = torch.cuda.Event(enable_timing=True)
        after.record(stream)
        self.stats.add_stall(before, after)

    def span(self, name: str, stream):
        """A timeline span on `stream` (a no-op context without a timeline or a device clock)."""
        return self.timeline.span(name, "compute", stream) if self.timeline is not None and self.cuda else _NO_SPAN

    def host_span(self, name: str):
        """A timeline span of host work, e.g. CPU expert compute (a no-op context without a timeline)."""
        return self.timeline.host_span(name, "CPU experts") if self.timeline is not None else _NO_SPAN


class _NoSpan:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()
