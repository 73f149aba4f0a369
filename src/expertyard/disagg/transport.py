"""Asynchronous exchanges on torch.distributed: batched P2P (M2N, N2M) and equal-split all-to-all (colocated).

On CUDA every exchange is launched from a dedicated communication stream that first waits on an event
recorded on the compute stream (so the buffers are ready), and `Pending.wait()` makes the *current* stream wait
for the transfer: the host never blocks in the layer loop. On CPU (gloo) the same calls return work handles
that run in gloo's threads, and `wait()` blocks the host until the transfer is done.
Any failure of a peer (closed connection, timeout) surfaces as `DeploymentDownError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from expertyard.errors import DeploymentDownError


@dataclass
class Pending:
    works: list
    keep: list = field(default_factory=list)  # buffers that must live until the transfer is done
    what: str = ""

    def wait(self) -> None:
        try:
            for w in self.works:
                w.wait()
        except Exception as e:  # noqa: BLE001 (gloo and NCCL raise RuntimeError or DistBackendError)
            raise DeploymentDownError(f"rank {dist.get_rank()}: {self.what} failed: a peer rank died or "
                                      f"timed out ({type(e).__name__}: {e})") from e
        self.works, self.keep = [], []


class Exchanger:
    """Launches exchanges of one communicator (process group) from its own CUDA stream."""

    def __init__(self, group, device: torch.device, name: str):
        self.group, self.device, self.name = group, device, name
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _launch(self, fn, keep: list, what: str) -> Pending:
        try:
            if self.stream is None:
                return Pending(fn(), keep, what)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                return Pending(fn(), keep, what)
        except DeploymentDownError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DeploymentDownError(f"rank {dist.get_rank()}: {what} could not start: a peer rank died or "
                                      f"timed out ({type(e).__name__}: {e})") from e

    def p2p(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> Pending:
        """Send and receive whole tensors to and from global ranks, as one batch."""
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group) for peer, t in recvs]
        keep = [t for _, t in sends] + [t for _, t in recvs]
        if not ops:
            return Pending([], keep, self.name)
        return self._launch(lambda: dist.batch_isend_irecv(ops), keep, self.name)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor) -> Pending:
        """Equal splits: chunk i of `inp` goes to group rank i, chunk j of `out` comes from group rank j."""
        return self._launch(lambda: [dist.all_to_all_single(out, inp, group=self.group, async_op=True)],
                            [out, inp], self.name)
