"""Process groups of a deployment: one CPU (gloo) group for step headers, and one device communicator for each
direction of expert traffic plus one that brings the final hidden states to rank 0."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from expertyard.disagg.config import DisaggConfig
from expertyard.errors import ConfigError


STARTUP_TIMEOUT_S = 1800.0


@dataclass
class Groups:
    control: object  # gloo, every rank: StepHeader broadcasts from rank 0
    dispatch: object  # device backend: attention -> experts
    combine: object  # device backend: experts -> attention
    results: object  # device backend: attention ranks -> rank 0 (final hidden states)


def init_distributed(cfg: DisaggConfig, rank: int, world_size: int, device: torch.device) -> Groups:
    """Join the job (MASTER_ADDR/MASTER_PORT from the launcher's environment) and build the groups."""
    if world_size != cfg.world_size:
        raise ConfigError(f"the launcher started {world_size} ranks; {cfg.mode} with {cfg.attention_ranks} attention "
                          f"and {cfg.expert_ranks} expert ranks needs {cfg.world_size}")
    timeout = timedelta(seconds=cfg.dist_timeout)
    # the default group only serves start-up (rendezvous, the barrier after loading): loading a large
    # checkpoint may take longer than a step may
    startup = timedelta(seconds=max(cfg.dist_timeout, STARTUP_TIMEOUT_S))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world_size, timeout=startup,
                                device_id=device)
        device_backend = "nccl"
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=startup)
        device_backend = "gloo"
    ranks = list(range(world_size))
    groups = Groups(control=dist.new_group(ranks, timeout=timeout, backend="gloo"),
                    dispatch=dist.new_group(ranks, timeout=timeout, backend=device_backend),
                    combine=dist.new_group(ranks, timeout=timeout, backend=device_backend),
                    results=dist.new_group(ranks, timeout=timeout, backend=device_backend))
    warm = torch.zeros(1, device=device)
    for g in (groups.dispatch, groups.combine, groups.results):  # first use of a communicator is collective
        dist.all_reduce(warm, group=g)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return groups
