"""Offloaded decode measured against its physical bound.

bound per token = bytes that must cross PCIe per token / measured pinned host-to-device peak
                  + the time the same decode step takes with every expert resident.
"Must cross" = the misses of Belady's offline-optimal policy on the very routing of the run (replayed through
the engine's own cache bookkeeping, same capacity, no prediction): no policy moves fewer full-precision
experts.
"""

from __future__ import annotations

import torch

from expertyard.engine.cuda_graph import DecodeGraphs
from expertyard.engine.llm_engine import LLMEngine
from expertyard.experts.cache_state import ExpertCacheState
from expertyard.experts.policies.belady import BeladyPolicy
from expertyard.experts.resident import ResidentExperts


def belady_misses(visits: list[tuple[int, list[int]]], capacity: int, count_from: int) -> int:
    """Misses of the offline optimum over `visits[count_from:]`, the cache warmed by the visits before."""
    state = ExpertCacheState(capacity, BeladyPolicy(visits))
    misses_before = 0
    for now, (layer, experts) in enumerate(visits):
        if now == count_from:
            misses_before = state.counters.misses
        state.access(layer, experts, now)
        state.end_visit(layer, experts)
    return state.counters.misses - misses_before


def resident_decode_ms(engine: LLMEngine, prompts: list[list[int]], decode_tokens: int, bench) -> float | None:
    """ms per decode step with every expert on the GPU (same engine, same eager mode), or None if they do
    not fit next to the offloaded run's allocations."""
    offloaded = engine.model.experts
    store, cfg = offloaded.store, engine.model_config
    need = len(offloaded.keys) * offloaded.expert_bytes
    free, _ = torch.cuda.mem_get_info(engine.device)
    if need * 1.05 > free or store.disk:
        return None
    resident = ResidentExperts(cfg, engine.device, engine.dtype)
    i = cfg.moe.intermediate_size
    for key in offloaded.keys:
        flat = store.source(key, engine.device)
        resident.w13[key[0]][key[1]].copy_(flat[:2 * i * cfg.hidden_size].view(2 * i, cfg.hidden_size))
        resident.w2[key[0]][key[1]].copy_(flat[2 * i * cfg.hidden_size:].view(cfg.hidden_size, i))
    graphs = engine.runner.graphs
    engine.model.set_expert_backend(resident)
    if graphs is not None:  # resident experts run whole-step graphs, at their best
        engine.runner.graphs = DecodeGraphs(engine.model, engine.runner.kv_cache, graphs.batch_buckets[-1],
                                            graphs.len_buckets[-1], graphs.scratch_slot)
    try:
        bench(engine, prompts, decode_tokens)  # warm-up
        return bench(engine, prompts, decode_tokens)["decode_ms_per_step"]
    finally:
        engine.model.set_expert_backend(offloaded)
        engine.runner.graphs = graphs
        del resident
        torch.cuda.empty_cache()
