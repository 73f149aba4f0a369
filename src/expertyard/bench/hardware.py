"""Copy-bandwidth ceilings measured on the machine the benchmark runs on."""

from __future__ import annotations

import torch


def _time_copies(dst: torch.Tensor, src: torch.Tensor, repeats: int) -> float:
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> dict:
    """GB/s of a device-to-device copy (bytes read + written, i.e. HBM traffic) and of host-to-device copies
    from pinned and from pageable memory."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    d2d = 2 * nbytes / _time_copies(b, a, repeats)
    h2d_bytes = nbytes // 4
    pinned = torch.empty(h2d_bytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(h2d_bytes, dtype=torch.uint8)
    dst = a[:h2d_bytes]
    h2d_pinned = h2d_bytes / _time_copies(dst, pinned, repeats)
    h2d_pageable = h2d_bytes / _time_copies(dst, pageable, 3)
    del a, b
    return {"d2d_GBps": d2d / 1e9, "h2d_pinned_GBps": h2d_pinned / 1e9, "h2d_pageable_GBps": h2d_pageable / 1e9}
