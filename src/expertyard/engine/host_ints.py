"""Host lists of numbers (slots, positions, token ids, sampling parameters) as device tensors, without stalling
the host."""

from __future__ import annotations

import torch


def long_tensor(values, device: torch.device) -> torch.Tensor:
    """`values` (a list or a numpy array of ints) as an int64 tensor on `device`. On CUDA the values are staged
    in pinned memory (torch's caching host allocator, which keeps the block until the copy is done), so the copy
    is queued on the stream and the host goes on: from pageable memory cudaMemcpyAsync waits until the stream
    has drained (1.7 ms per copy on average in a profile of the disaggregated step on an H200)."""
    return host_tensor(values, torch.long, device)


def host_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list or a numpy array) as a `dtype` tensor on `device`, staged like `long_tensor`."""
    t = torch.as_tensor(values, dtype=dtype)  # a numpy array of that dtype is shared, not copied
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
