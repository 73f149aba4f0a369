"""The loading target of an offloaded model: the checkpoint loader streams every routed expert into host memory
(`HostExpertStore`); the engine then builds the backend that computes, sized by its GPU budget plan
(`experts/offload/build.py`)."""

from __future__ import annotations

from pathlib import Path

import torch

from expertyard.config import ModelConfig
from expertyard.errors import ConfigError
from expertyard.experts.backend import ExpertBackend, Projection
from expertyard.experts.host_store import HostExpertStore


class HostLoadedExperts(ExpertBackend):
    graph_safe = False

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 host_budget_bytes: int | None = None):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.keys = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.moe.num_experts)]
        self.store = HostExpertStore(self.keys, cfg.hidden_size, cfg.moe.intermediate_size, dtype,
                                     host_budget_bytes, pin=self.device.type == "cuda")

    @classmethod
    def factory(cls, host_budget_bytes: int | None = None):
        """A `backend_factory` for `load_model` / `build_synthetic`."""
        return lambda cfg, device, dtype: cls(cfg, device, dtype, host_budget_bytes)

    def load_expert_weight(self, layer: int, expert: int, proj: Projection, tensor: torch.Tensor) -> None:
        self.store.put((layer, expert), proj, tensor)

    def wants_disk(self, layer: int, expert: int) -> bool:
        return not self.store.in_memory((layer, expert))

    def load_expert_from_disk(self, layer: int, expert: int, proj: Projection, path: Path, name: str) -> None:
        self.store.put_on_disk((layer, expert), proj, path, name)

    def expected_weights(self) -> set[tuple[int, int, str]]:
        return {(l, e, p) for l, e in self.keys for p in ("gate", "up", "down")}

    def forward(self, layer, x, topk_ids, topk_w):
        raise ConfigError("the experts are in host memory but no expert cache was built: create the engine with "
                          "EngineConfig(offload=OffloadConfig(...))")
