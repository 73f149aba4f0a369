"""Routed experts computed on the host CPU, on a dedicated worker thread so the GPU keeps working meanwhile.

A layer's CPU share is a list of work items (key, precision, token_idx [n], gate_w [n]): expert `key` in
`precision` applied to the rows `token_idx` of the layer input, each output row scaled by its gate weight and
summed into out[T, D] float32. torch's CPU ops release the GIL, so the caller's thread (launching GPU work)
runs while the worker computes; the worker's matmuls use torch's intra-op thread count (`set_cpu_threads`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from expertyard.experts.cpu.store import CpuExpertStore
from expertyard.experts.policies.base import ExpertKey

# T = tokens of the layer input, D = hidden size, n = tokens routed to one expert

WorkItem = tuple[ExpertKey, str, torch.Tensor, torch.Tensor]  # (key, precision, token_idx [n] int64, gate_w [n])


class CpuExpertCompute:
    def __init__(self, store: CpuExpertStore):
        self.store = store
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-experts")

    def run(self, x_cpu: torch.Tensor, items: list[WorkItem]) -> torch.Tensor:
        """x_cpu [T, D] (model dtype or float32, on the CPU) -> out [T, D] float32 = sum over items of
        gate_w[:, None] * expert(x_cpu[token_idx]) added at rows token_idx (a token may appear in many items)."""
        if x_cpu.device.type != "cpu" or x_cpu.dim() != 2 or x_cpu.shape[1] != self.store.hidden:
            raise ValueError(f"x_cpu must be a CPU tensor [T, {self.store.hidden}], got {tuple(x_cpu.shape)} on "
                             f"{x_cpu.device}")
        out = torch.zeros(x_cpu.shape[0], x_cpu.shape[1], dtype=torch.float32)  # [T, D]
        x = x_cpu.to(self.store.dtype)  # [T, D], converted once for every item
        for key, precision, idx, w in items:
            if idx.numel() == 0:
                continue
            y = self.store.get(key, precision).forward(x.index_select(0, idx))  # [n, D] compute dtype
            out.index_add_(0, idx, y.float().mul_(w.to(torch.float32).unsqueeze(1)))  # gate-weighted rows
        return out

    def submit(self, x_cpu: torch.Tensor, items: list[WorkItem]) -> Future:
        """`run` on the worker thread; the Future's result is out [T, D] float32 (or the exception it raised).
        The caller must not modify x_cpu or the items' tensors until then."""
        return self._worker.submit(self.run, x_cpu, items)

    def close(self) -> None:
        """Finish queued work and stop the worker thread."""
        self._worker.shutdown(wait=True)
