"""One rank of a deployment: join the job, load what its role needs, then drive (rank 0) or follow."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from expertyard.config import ModelConfig
from expertyard.disagg.colocated import ColocatedExperts
from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.decode_pieces import DecodePieces
from expertyard.disagg.driver import AttentionRank, DistributedRunner, follow
from expertyard.disagg.expert_shard import ExpertShard, NoExperts
from expertyard.disagg.expert_worker import ExpertWorker
from expertyard.disagg.groups import init_distributed
from expertyard.disagg.m2n import RowLayout
from expertyard.disagg.placement import ExpertPlacement
from expertyard.disagg.remote_experts import RemoteExperts
from expertyard.disagg.step_plan import kv_rows_per_rank
from expertyard.disagg.transport import Exchanger
from expertyard.engine.collector import freeze_long_lived
from expertyard.engine.kv_cache import allocate_kv_cache
from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.errors import ConfigError, DeploymentDownError
from expertyard.experts.resident import ResidentExperts
from expertyard.loader.bundled import load_tokenizer
from expertyard.loader.checkpoint import read_hf_config
from expertyard.loader.load import LoadedModel, build_model, load_model, model_config_from_hf
from expertyard.synthetic import init_random_weights


@dataclass
class ModelSource:
    """A checkpoint directory, or random weights for a transformers config (`--synthetic`, test shapes)."""

    model_dir: Path | None = None
    hf_config: Any = None
    seed: int = 0
    std: float = 0.02  # of the random weights
    name: str = "model"

    def config(self) -> ModelConfig:
        if self.hf_config is not None:
            return model_config_from_hf(self.hf_config)
        return model_config_from_hf(read_hf_config(self.model_dir))

    def load(self, device: torch.device, dtype: torch.dtype, factory) -> LoadedModel:
        """Random weights are drawn for the whole model in one order (so every rank and the single-process
        reference agree) and carved afterwards; a checkpoint goes straight into `factory`'s backend."""
        if self.hf_config is not None:
            cfg = self.config()
            model = build_model(cfg, device, dtype, ResidentExperts)
            init_random_weights(model, self.seed, self.std)
            return LoadedModel(model=model, config=cfg, path=None)
        return load_model(self.model_dir, device, dtype, backend_factory=factory, progress=False)

    def tokenizer(self):
        if self.model_dir is None:
            return None
        return load_tokenizer(self.model_dir)


def run_rank(cfg: DisaggConfig, source: ModelSource, engine_config: EngineConfig, rank: int, world_size: int,
             device: torch.device, dtype: torch.dtype, job: Callable[[LLMEngine], Any]) -> Any:
    """Everything one process does; returns `job(engine)` on rank 0, None elsewhere. `engine_config` is rank 0's
    engine configuration; its `max_num_seqs` and `max_model_len` size every attention rank's KV cache, and its
    `cuda_graphs` says whether attention and expert ranks replay decode steps from CUDA graphs (None: on CUDA;
    True off CUDA runs the same pieces and static buffers eagerly, as the tests of the piece split do). A dead or
    silent peer ends this rank with a DeploymentDownError naming it (followers print it and exit with status 1)."""
    groups = init_distributed(cfg, rank, world_size, device)
    mcfg = source.config()
    if not mcfg.moe_layers:
        raise ConfigError("the model has no MoE layers: nothing to disaggregate")
    role = cfg.role(rank)
    placement = ExpertPlacement.balanced(mcfg.moe_layers, mcfg.moe.num_experts, cfg.expert_ranks, cfg.replicate)
    layout = RowLayout(mcfg.hidden_size, mcfg.moe.top_k, dtype)
    dispatch = Exchanger(groups.dispatch, device, "dispatch (attention -> experts)")
    combine = Exchanger(groups.combine, device, "combine (experts -> attention)")
    index = cfg.expert_rank_ids.index(rank) if role != "attention" else -1
    if role == "attention":
        factory = lambda c, d, t: NoExperts(c)  # noqa: E731
    else:
        factory = lambda c, d, t: ExpertShard(c, placement, index, d, t)  # noqa: E731
    loaded = source.load(device, dtype, factory)
    model = loaded.model
    shard = None
    if role != "attention":  # a random-weight model was drawn whole: keep this rank's share only
        shard = model.experts if isinstance(model.experts, ExpertShard) else \
            ExpertShard.from_resident(model.experts, mcfg, placement, index)
        model.set_expert_backend(NoExperts(mcfg))
    dist.barrier()  # every rank has loaded (start-up timeout); from here on waits are bounded by dist_timeout
    try:
        if role == "expert":
            worker = ExpertWorker(shard, list(mcfg.moe_layers), cfg.attention_rank_ids, layout, dispatch, combine, device)
            del model, loaded  # an expert rank keeps only its experts
            _free(device)
            freeze_long_lived()
            follow(groups, None, worker)
            result = None
        else:
            if role == "attention":
                exchange = RemoteExperts(placement, cfg.expert_rank_ids, layout, dispatch, combine, device)
            else:
                exchange = ColocatedExperts(shard, placement, layout, cfg.expert_ranks, dispatch, combine, device)
            model.set_expert_backend(exchange)  # drops the full expert stacks of a random-weight model
            _free(device)
            max_len = engine_config.resolved_max_model_len(mcfg.max_position_embeddings)
            rows = kv_rows_per_rank(cfg, engine_config.max_num_seqs)
            kv = allocate_kv_cache(model, rows, max_len, device, dtype)
            graphs = engine_config.cuda_graphs if engine_config.cuda_graphs is not None else device.type == "cuda"
            pieces = DecodePieces(model, kv, exchange, rows - 1, max_len, device.type == "cuda") if graphs else None
            attention = AttentionRank(model, kv, exchange, groups, cfg, device, pieces)
            if rank == 0:
                result = _drive(cfg, source, engine_config, loaded, attention, groups, job)
            else:
                freeze_long_lived()
                follow(groups, attention, None)
                result = None
    except DeploymentDownError as e:
        print(f"expertyard: rank {rank} ({role}): deployment down: {e}", file=sys.stderr, flush=True)
        raise  # no destroy_process_group: it would wait on the dead peer (callers leave with os._exit)
    dist.destroy_process_group()
    return result


def _drive(cfg, source, config: EngineConfig, loaded, attention, groups, job):
    tokenizer = source.tokenizer()
    runner = DistributedRunner(attention, groups, cfg, config.max_num_seqs)
    engine = LLMEngine(loaded, tokenizer, config, runner=runner,
                       **({"eos_token_ids": set()} if tokenizer is None else {}))
    freeze_long_lived()
    try:
        return job(engine)
    finally:
        runner.shutdown()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
