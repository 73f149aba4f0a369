"""Start a deployment's ranks on this host with torchrun's launcher (`elastic_launch`), or join one started
by `torchrun` on several hosts (every process then calls `run_rank` with the launcher's environment).

    one host:   expertyard serve --disaggregate --attention-ranks 2 --expert-ranks 2 ...
    many hosts: torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 \
                  --rdzv-id JOB -m expertyard.entrypoints.cli serve --disaggregate ...   (same flags on every host)
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import uuid
from typing import Any, Callable

import torch

from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.worker import ModelSource, run_rank
from expertyard.engine.llm_engine import EngineConfig
from expertyard.errors import ConfigError, DeploymentDownError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} needs GPU {local_rank}, but this host has "
                              f"{torch.cuda.device_count()}: start fewer ranks per host")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank_main(cfg: DisaggConfig, source: ModelSource, engine_config: EngineConfig, device_type: str,
              dtype: torch.dtype, job: Callable, torch_threads: int | None = None) -> Any:
    """The entry point of every launched process: rank and world size come from the launcher's environment."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    dump_every = float(os.environ.get("EXPERTYARD_DUMP_STACKS_S", 0) or 0)
    if dump_every > 0:  # debugging a hang: every rank prints all its threads' Python stacks periodically
        faulthandler.dump_traceback_later(dump_every, repeat=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device(device_type, int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return run_rank(cfg, source, engine_config, rank, world, device, dtype, job)
    except DeploymentDownError:
        exit_now(1)


def exit_now(status: int) -> None:
    """Leave at once: the communicators' threads still wait on the dead peer, and an orderly interpreter
    shutdown would abort on them (run_rank has printed the error)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def launch_local(cfg: DisaggConfig, source: ModelSource, engine_config: EngineConfig, device_type: str,
                 dtype: torch.dtype, job: Callable, torch_threads: int | None = None,
                 max_restarts: int = 0) -> Any:
    """All ranks on this host through `elastic_launch`; returns rank 0's `job(engine)`. `job` must be a
    module-level function (it is pickled into each process)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = _free_port()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.world_size, run_id=f"expertyard-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=max_restarts,
                          monitor_interval=0.5, start_method="spawn")
    try:
        results = elastic_launch(config, rank_main)(cfg, source, engine_config, device_type, dtype, job, torch_threads)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
        raise DeploymentDownError(f"rank {rank} ended with {how}") from None
    return results[0]

