"""T_step, the driver's host work per decode iteration, measured with null deployments (`plan calibrate`; the
arithmetic that solves and fits it is plan/fit.py).

Every decode iteration of the disaggregated runtime has a serial part that no per-layer term of the paper's
model prices: rank 0 schedules, plans the step, broadcasts the step header over gloo, gathers the hidden states,
computes the logits and samples, and every GPU waits for it. It does not grow with the number of layers, so two
deployments of the real runtime that differ by one MoE layer separate it from the per-layer time:

    TPOT(L, B) = T_step(B) + T_layer(B) * (MoE layers among the first L)     [+ leading dense layers]

    L1 = index of the first MoE layer + 1, L2 = L1 + 1
    T_layer(B) = TPOT(L2, B) - TPOT(L1, B)
    T_step(B)  = TPOT(L1, B) - T_layer(B) = 2 TPOT(L1, B) - TPOT(L2, B)        (= 2 TPOT(1) - TPOT(2) when L1 = 1)

Each "null deployment" is the model cut to L layers with random weights, 1 attention rank + 1 expert rank,
m = 1 (`expertyard.disagg.launch.launch_local`, the job of `expertyard bench --disaggregate`): prompts are
prefilled, then TPOT = wall time of the decode steps / steps, after a warm-up pass. On CUDA the ranks run on
cuda:0 and cuda:1 with decode CUDA graphs, as the runtime serves; on CPU they run over gloo (tests).

What lands in T_step besides the host work: the embedding and final norm, and, in models with leading dense
layers (DeepSeek-V2: `first_k_dense_replace`), those L1 - 1 dense layers (the model also counts them among its
L layers, so their time is counted twice; one or a few of L layers). The LM head is priced by the performance
model (T_h), so `solve_step` subtracts the model's T_h when given it. When layer L1 itself is dense (a model
whose MoE layers are not consecutive), T_layer is that dense layer's time; `null_layer_counts` says so.

The per-B values are fitted with T_step(B) = step_overhead_us + step_overhead_per_seq_us * B (profiles.py).
"""

from __future__ import annotations

import copy
import functools
import os

import torch

from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.jobs import PREFILL_TOKENS_PER_STEP, bench_job
from expertyard.disagg.launch import launch_local
from expertyard.disagg.worker import ModelSource
from expertyard.engine.llm_engine import EngineConfig
from expertyard.errors import ConfigError
from expertyard.loader.load import model_config_from_hf

GPU_BATCHES = (16, 256, 1024)  # sequences per decode step: from latency-bound to the batches plans choose
CPU_BATCHES = (2, 8)  # CPU (tests): small, a launch of two ranks takes ~10 s already
GPU_PROMPT_LEN, GPU_DECODE_TOKENS = 32, 16
CPU_PROMPT_LEN, CPU_DECODE_TOKENS = 8, 6
DIST_TIMEOUT_S = 300.0  # first decode steps capture CUDA graphs on both ranks; a peer may wait that long


def cut(hf_config, num_layers: int):
    """A copy of `hf_config` with `num_layers` decoder layers (more than the model has is allowed: random
    weights, a timing fixture); per-layer lists are cut to match."""
    if num_layers < 1:
        raise ConfigError(f"num_layers={num_layers} must be >= 1")
    out = copy.deepcopy(hf_config)
    out.num_hidden_layers = num_layers
    types = getattr(out, "layer_types", None)
    if isinstance(types, list):
        if len(types) < num_layers:
            raise ConfigError(f"layer_types lists {len(types)} layers; cannot build a {num_layers}-layer model")
        out.layer_types = types[:num_layers]
    return out


def null_layer_counts(hf_config) -> tuple[int, int, str | None]:
    """(L1, L2, note): the layer counts of the two null deployments, and a note when the layer that L2 adds
    is not a MoE layer (then T_layer is a dense layer's time, not a MoE layer's)."""
    moe = model_config_from_hf(hf_config).moe_layers
    if not moe:
        raise ConfigError("the model has no MoE layers: there is no disaggregated step to time")
    l1 = moe[0] + 1
    l2 = l1 + 1
    note = None
    if l1 not in model_config_from_hf(cut(hf_config, l2)).moe_layers:
        note = f"layer {l1} is dense, so TPOT({l2}) - TPOT({l1}) is a dense layer's time, not a MoE layer's"
    return l1, l2, note


def _check(batches, prompt_len: int, decode_tokens: int) -> None:
    if not batches or min(batches) < 1:
        raise ConfigError(f"step batch sizes {list(batches)} must be positive integers")
    if prompt_len < 1:
        raise ConfigError(f"prompt_len={prompt_len} must be >= 1")
    if decode_tokens < 2:  # the first token comes from the prefill: at least one decode step is timed
        raise ConfigError(f"decode_tokens={decode_tokens} must be >= 2")


def null_tpots(hf_config, num_layers: int, device_type: str, dtype: torch.dtype, batches, prompt_len: int,
               decode_tokens: int, name: str = "model", dist_timeout: float = DIST_TIMEOUT_S) -> dict[int, float]:
    """{B: seconds per decode iteration} of the model cut to `num_layers` layers on the real runtime (1 attention
    + 1 expert rank, m = 1, random weights), one launch for all batch sizes."""
    batches = sorted(set(batches))
    _check(batches, prompt_len, decode_tokens)
    b_max = batches[-1]
    config = EngineConfig(max_num_seqs=b_max, max_model_len=prompt_len + decode_tokens + 1,
                          max_num_batched_tokens=min(b_max * prompt_len, PREFILL_TOKENS_PER_STEP))
    job = functools.partial(bench_job, batch_sizes=batches, prompt_len=prompt_len, decode_tokens=decode_tokens,
                            ms=[1], seed=0)
    source = ModelSource(hf_config=cut(hf_config, num_layers), name=f"{name}, cut to {num_layers} layer(s)")
    cfg = DisaggConfig(attention_ranks=1, expert_ranks=1, micro_batches=1, dist_timeout=dist_timeout)
    threads = max(1, (os.cpu_count() or 1) // cfg.world_size) if device_type == "cpu" else None
    runs = launch_local(cfg, source, config, device_type, dtype, job, threads)
    return {b: runs[b][0]["tpot_ms"] / 1e3 for b in batches}  # the one row: m = 1, async scheduling off


def measure_null_tpots(hf_config, device_type: str, dtype: torch.dtype, batches=None, prompt_len: int | None = None,
                       decode_tokens: int | None = None, name: str = "model") -> dict:
    """Both null deployments: {"layers": [L1, L2], "tpots": [[B, TPOT(L1) s, TPOT(L2) s], ...], "note": ...,
    "prompt_len": ..., "decode_tokens": ...}. Defaults per device type (GPU_* / CPU_* above)."""
    on_gpu = device_type == "cuda"
    batches = tuple(batches or (GPU_BATCHES if on_gpu else CPU_BATCHES))
    prompt_len = prompt_len or (GPU_PROMPT_LEN if on_gpu else CPU_PROMPT_LEN)
    decode_tokens = decode_tokens or (GPU_DECODE_TOKENS if on_gpu else CPU_DECODE_TOKENS)
    _check(batches, prompt_len, decode_tokens)
    l1, l2, note = null_layer_counts(hf_config)
    t1, t2 = (null_tpots(hf_config, n, device_type, dtype, batches, prompt_len, decode_tokens, name) for n in (l1, l2))
    return {"layers": [l1, l2], "tpots": [[b, t1[b], t2[b]] for b in sorted(t1)], "note": note,
            "prompt_len": prompt_len, "decode_tokens": decode_tokens}
