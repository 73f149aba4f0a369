"""One-way time of an NCCL send/recv between two local GPUs over message sizes (two spawned processes).

Used by `plan calibrate` when at least two GPUs are visible; the fitted line T_c(bytes) = latency +
bytes / bandwidth becomes the profile's intra-host link figures.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

DEFAULT_SIZES = tuple(1 << k for k in range(16, 27, 2))  # 64 KiB .. 64 MiB


def _worker(rank: int, init_file: str, out_file: str, sizes: list[int], repeats: int) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2)
    peer = 1 - rank
    results = []
    for size in sizes:
        buf = torch.empty(size, dtype=torch.uint8, device="cuda")

        def round_trip():
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)

        for _ in range(3):
            round_trip()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            round_trip()
        end.record()
        end.synchronize()
        results.append([size, start.elapsed_time(end) / 1e3 / (2 * repeats)])  # one direction, seconds
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def measure_send_recv(sizes=DEFAULT_SIZES, repeats: int = 20) -> list[tuple[int, float]] | None:
    """[(bytes, one-way seconds)] between cuda:0 and cuda:1, or None with fewer than two GPUs."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(init, out, list(sizes), repeats), nprocs=2, join=True)
        return [(int(s), float(t)) for s, t in json.loads(Path(out).read_text())]
