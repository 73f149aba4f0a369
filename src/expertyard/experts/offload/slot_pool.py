"""One precision's expert cache on the device: the slot tensor, the device table layer x expert -> slot, and the
per-slot events that order copies after the kernels reading a slot and kernels after the copy filling it.

`FullPrecisionPool` holds copies in the model's dtype (the `fused_moe` kernel reads them); `LowPrecisionPool`
holds packed int2/int4/int8 copies (the dequantizing kernel reads them; on the CPU they are dequantized once per
load). The residency bookkeeping itself is the pool's `ExpertCacheState` (pure Python, shared with the simulator).
"""

from __future__ import annotations

import torch

from expertyard.config import ModelConfig
from expertyard.experts.cache_state import ExpertCacheState, Load
from expertyard.experts.host_store import HostExpertStore
from expertyard.kernels.fused_moe import fused_moe
from expertyard.quant.ffn import fused_moe_quantized
from expertyard.quant.low_store import LowPrecisionStore
from expertyard.quant.packed_expert import dequantize_expert, new_pool

# S = slots, L = decoder layers, E = experts per layer, D = hidden, I = expert intermediate, T = tokens, K = top-k


class SlotPool:
    name: str

    def __init__(self, cfg: ModelConfig, state: ExpertCacheState, device: torch.device):
        self.state, self.device = state, device
        self.cuda = device.type == "cuda"
        self.table = torch.full((cfg.num_layers, cfg.moe.num_experts), -1, dtype=torch.int32,
                                device=device)  # [L, E]: slot of each resident expert, else -1
        self.ready: dict[int, torch.cuda.Event] = {}  # slot -> its last copy has landed
        self.last_read: dict[int, torch.cuda.Event] = {}  # slot -> the last kernel reading it is done

    @property
    def capacity(self) -> int:
        return self.state.capacity

    # ---- what a subclass provides ---------------------------------------------------------------------
    def source(self, key) -> tuple[torch.Tensor, int]:
        """The host buffer to copy `key` from, and its bytes."""
        raise NotImplementedError

    def write(self, slot: int, src: torch.Tensor) -> None:
        raise NotImplementedError

    def copied(self, src: torch.Tensor, done) -> None:
        """The copy engine read `src` until `done` (a staging buffer may be refilled after that)."""

    def ffn(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y [T, D] over the (token, k) pairs with a slot >= 0 in this pool; -1 pairs contribute nothing."""
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------------
    def set_table(self, loads: list[Load]) -> None:
        """Mirror residency changes into the device table, in compute-stream order."""
        if not loads:
            return
        rows, cols, vals = [], [], []
        for ld in loads:
            if ld.evicted is not None:
                rows.append(ld.evicted[0]), cols.append(ld.evicted[1]), vals.append(-1)
            rows.append(ld.key[0]), cols.append(ld.key[1]), vals.append(ld.slot)
        idx = torch.tensor([rows, cols, vals], dtype=torch.long)
        if self.cuda:
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        self.table[idx[0], idx[1]] = idx[2].to(torch.int32)

    def ready_events(self, loads: list[Load]) -> list:
        return [self.ready[ld.slot] for ld in loads] if self.cuda else []

    def mark_read(self, stream, layer: int, experts: list[int]) -> None:
        """The kernels just launched on `stream` read these experts' slots: a copy into them waits for this."""
        if not self.cuda or not experts:
            return
        done = torch.cuda.Event()
        done.record(stream)
        for e in experts:
            slot = self.state.slot_of((layer, e))
            if slot is not None:
                self.last_read[slot] = done


class FullPrecisionPool(SlotPool):
    name = "full"

    def __init__(self, cfg: ModelConfig, state: ExpertCacheState, store: HostExpertStore, device: torch.device):
        super().__init__(cfg, state, device)
        self.store = store
        s, i, d = state.capacity, cfg.moe.intermediate_size, cfg.hidden_size
        self.weights = torch.zeros(s, 3 * i * d, dtype=store.dtype, device=device)  # [S, 3*I*D]; zeros: never NaN
        self.w13 = self.weights[:, :2 * i * d].view(s, 2 * i, d)  # [S, 2I, D]
        self.w2 = self.weights[:, 2 * i * d:].view(s, d, i)  # [S, D, I]
        self.expert_bytes = store.expert_bytes

    def source(self, key) -> tuple[torch.Tensor, int]:
        return self.store.source(key, self.device), self.expert_bytes

    def write(self, slot: int, src: torch.Tensor) -> None:
        self.weights[slot].copy_(src, non_blocking=self.cuda)

    def copied(self, src: torch.Tensor, done) -> None:
        self.store.mark_staging_read(src, done)  # a no-op for rows of the pinned pool

    def ffn(self, x, slots, weights):
        if not self.cuda:  # the CPU kernel wants valid ids: slot -1 becomes weight 0
            return fused_moe(x, self.w13, self.w2, slots.clamp(min=0), weights * (slots >= 0))
        return fused_moe(x, self.w13, self.w2, slots, weights)


class LowPrecisionPool(SlotPool):
    name = "low"

    def __init__(self, cfg: ModelConfig, state: ExpertCacheState, store: LowPrecisionStore, device: torch.device,
                 dtype: torch.dtype):
        super().__init__(cfg, state, device)
        self.store, self.layout, self.dtype = store, store.layout, dtype
        self.expert_bytes = self.layout.nbytes
        self.weights = new_pool(state.capacity, self.layout, device)  # [S, nbytes] uint8
        if not self.cuda:  # CPU: dequantize once per load, not per visit (what the GPU kernel does in registers)
            s, i, d = state.capacity, cfg.moe.intermediate_size, cfg.hidden_size
            self.w13 = torch.zeros(s, 2 * i, d, dtype=dtype)  # [S, 2I, D]
            self.w2 = torch.zeros(s, d, i, dtype=dtype)  # [S, D, I]

    def source(self, key) -> tuple[torch.Tensor, int]:
        return self.store.source(key), self.expert_bytes

    def write(self, slot: int, src: torch.Tensor) -> None:
        self.weights[slot].copy_(src, non_blocking=self.cuda)
        if not self.cuda:
            self._dequantize_slot(slot)

    def _dequantize_slot(self, slot: int) -> None:
        w13, w2 = dequantize_expert(self.weights[slot], self.layout, self.dtype)
        self.w13[slot].copy_(w13), self.w2[slot].copy_(w2)

    def ffn(self, x, slots, weights):
        if not self.cuda:
            return fused_moe(x, self.w13, self.w2, slots.clamp(min=0), weights * (slots >= 0))
        return fused_moe_quantized(x, self.weights, self.layout, slots, weights)
