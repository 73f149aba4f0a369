"""What a decode graph piece sends to the host (routing, predictions, the CPU's input): packed by the graph into one
device buffer of the piece, then read back by one eager copy into a pinned twin after the replay.

The graph writes only device memory (no host addresses inside a captured graph), and the host pays one copy
launch per layer instead of one per tensor. Each part keeps its rows first, so the first B rows of a bucket of
Bb are a prefix of the part.
"""

from __future__ import annotations

import torch

_ALIGN = 16  # bytes: every part starts aligned for any dtype view


class GraphStaging:
    def __init__(self, parts: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device):
        """`parts`: (shape, dtype) of each tensor, in the order `pack` receives them."""
        self.layout, offset = [], 0
        for shape, dtype in parts:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            self.layout.append((offset, nbytes, tuple(shape), dtype))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.device_buf = torch.empty(offset, dtype=torch.uint8, device=device)
        self.host_buf = torch.empty(offset, dtype=torch.uint8, pin_memory=True)

    def _views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [buf[o:o + n].view(dtype).view(shape) for o, n, shape, dtype in self.layout]

    def pack(self, tensors: list[torch.Tensor]) -> None:
        """In the graph: copy each tensor (cast to its part's dtype) into the device buffer."""
        for dst, t in zip(self._views(self.device_buf), tensors):
            dst.copy_(t)

    def send(self) -> torch.cuda.Event:
        """Eagerly, after the replay: start the copy to the pinned buffer; the event marks its arrival."""
        self.host_buf.copy_(self.device_buf, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        return arrived

    def host_views(self, rows: int) -> list[torch.Tensor]:
        """Each part's first `rows` rows in the pinned buffer (valid once `send`'s event has passed)."""
        return [v[:rows] for v in self._views(self.host_buf)]
