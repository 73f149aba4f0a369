"""Host copies of every routed expert: one contiguous buffer per expert, so that one copy moves an expert.

Layout of an expert's buffer (numel = 3*I*D): [gate (I x D) | up (I x D) | down (D x I)], i.e. w13 then w2,
the layout of a GPU cache slot. Experts that fit `host_budget_bytes` live in one page-locked (pinned) pool,
registered with CUDA so that host-to-device copies run at full PCIe speed without staging. The rest (the
disk tier) stay in the memory-mapped safetensors files and are staged through pinned buffers when loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from expertyard.device import pin_for_life_of
from expertyard.errors import CheckpointError, ConfigError
from expertyard.experts.backend import Projection
from expertyard.experts.policies.base import ExpertKey

# I = expert intermediate size, D = hidden size


@dataclass(frozen=True)
class DiskTensor:
    path: Path
    name: str


class HostExpertStore:
    def __init__(self, keys: list[ExpertKey], hidden: int, inter: int, dtype: torch.dtype,
                 host_budget_bytes: int | None, pin: bool):
        self.hidden, self.inter, self.dtype = hidden, inter, dtype
        self.numel = 3 * inter * hidden
        self.expert_bytes = self.numel * torch.empty((), dtype=dtype).element_size()
        n_host = len(keys) if host_budget_bytes is None else min(len(keys), host_budget_bytes // self.expert_bytes)
        if host_budget_bytes is not None and n_host < 1:
            raise ConfigError(f"--host-memory-budget {host_budget_bytes} B holds no expert "
                              f"(one expert is {self.expert_bytes} B)")
        self.host_keys = keys[:n_host]  # in memory; the rest on disk
        self.row = {k: i for i, k in enumerate(self.host_keys)}
        self.pool = torch.empty(n_host, self.numel, dtype=dtype)  # [N_host, 3*I*D]
        self.pinned = False
        if pin and n_host:
            self.pinned = pin_for_life_of(self, self.pool)
        self.disk: dict[ExpertKey, dict[Projection, DiskTensor]] = {k: {} for k in keys[n_host:]}
        self._files: dict[Path, object] = {}
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    # ---- filling --------------------------------------------------------------------------------------
    def view(self, key: ExpertKey, proj: Projection) -> torch.Tensor:
        buf = self.pool[self.row[key]]
        i, d = self.inter, self.hidden
        if proj == "gate":
            return buf[:i * d].view(i, d)
        if proj == "up":
            return buf[i * d:2 * i * d].view(i, d)
        return buf[2 * i * d:].view(d, i)

    def in_memory(self, key: ExpertKey) -> bool:
        return key in self.row

    def put(self, key: ExpertKey, proj: Projection, tensor: torch.Tensor) -> None:
        dst = self.view(key, proj)
        if dst.shape != tensor.shape:
            raise CheckpointError(f"expert {key[1]} {proj} of layer {key[0]}: expected shape {tuple(dst.shape)}, "
                                  f"checkpoint has {tuple(tensor.shape)}")
        dst.copy_(tensor)

    def put_on_disk(self, key: ExpertKey, proj: Projection, path: Path, name: str) -> None:
        self.disk[key][proj] = DiskTensor(path, name)

    # ---- reading --------------------------------------------------------------------------------------
    def source(self, key: ExpertKey, device: torch.device) -> torch.Tensor:
        """The expert's flat host buffer [3*I*D], ready to copy from: a row of the pinned pool, or (disk
        tier) a pinned staging buffer just filled from the safetensors file."""
        if key in self.row:
            return self.pool[self.row[key]]
        return self._stage(key, device)

    def _stage(self, key: ExpertKey, device: torch.device) -> torch.Tensor:
        if not self._staging:  # two buffers: one is read by a copy while the other is filled
            pin = device.type == "cuda"
            self._staging = [(torch.empty(self.numel, dtype=self.dtype, pin_memory=pin), None) for _ in range(2)]
        buf, done = self._staging.pop(0)
        if done is not None:
            done.synchronize()  # the copy that last read this buffer has finished
        tensors = self.disk.get(key)
        if not tensors or len(tensors) != 3:
            raise CheckpointError(f"expert {key[1]} of layer {key[0]} has no complete copy on disk")
        i, d = self.inter, self.hidden
        parts = {"gate": buf[:i * d].view(i, d), "up": buf[i * d:2 * i * d].view(i, d), "down": buf[2 * i * d:].view(d, i)}
        for proj, dt in tensors.items():
            if dt.path not in self._files:
                self._files[dt.path] = safe_open(dt.path, framework="pt", device="cpu")
            parts[proj].copy_(self._files[dt.path].get_tensor(dt.name))
        self._staging.append((buf, None))
        return buf

    def mark_staging_read(self, buf: torch.Tensor, event) -> None:
        """The copy engine read `buf` until `event`; it may be refilled after that."""
        for n, (b, _) in enumerate(self._staging):
            if b.data_ptr() == buf.data_ptr():
                self._staging[n] = (b, event)

    @property
    def memory_bytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

