"""Replay a routing trace through the engine's own expert-cache bookkeeping (`ExpertCacheState` + a
`CachePolicy`), so that a simulated hit rate is the one the offloaded engine would see on the same routing.

Each step is one visit per MoE layer, in layer order (the clock `now` counts visits). A visit makes the calls
that `OffloadedExperts.forward_routed` makes: `access(layer, experts, now)` (demand loads; the experts
protected), `end_visit(layer, experts)`, then `prefetch(predicted keys, now)` (later layers, nearest first);
when the step's (token, expert) pairs exceed the cache, its load-first path: predictions released if the
experts would not fit, the experts accessed in groups that fit. With batch size 1 a step is one token; with
batch size B, B sequences advance together (continuous batching: a finished sequence's place goes to the next
one) and a visit uses the union of their experts.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from expertyard.errors import ConfigError, ExpertyardError
from expertyard.experts.cache_state import ExpertCacheState, Load
from expertyard.experts.policies import make_policy
from expertyard.trace.fast_replay import KERNELS, fast_replay
from expertyard.trace.format import Trace

# T = tokens, L = MoE layers, K = experts per token, d = prefetch depth

BLOCK = 2048  # tokens converted to Python lists at a time


class SimulationError(ExpertyardError):
    """The simulated cache cannot run these visits (e.g. too few slots for one visit's experts)."""


@dataclass
class Predictions:
    """Expert ids predicted at each (token, layer) for the MoE layer `j` ahead: ids[j] [T, L, K'] (-1: none).
    `oracle` instead reads the true experts of the next layers from the trace."""

    depth: int
    ids: dict[int, np.ndarray] | None = None  # None: oracle

    @classmethod
    def oracle(cls, depth: int) -> Predictions:
        return cls(depth)


@dataclass
class SimResult:
    policy: str
    capacity: int
    predictor: str
    depth: int
    batch_size: int
    tokens: int
    visits: int
    hits: int
    misses: int
    prefetches: int
    prefetch_hits: int
    wasted_prefetches: int
    prefetch_hits_on_time: int = 0  # prefetched experts used by the very visit they were predicted for
    prefetch_releases: int = 0  # load-first visits that released the predictions to fit their experts

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    def summary(self, expert_bytes: int | None = None) -> dict:
        n, acc = self.tokens, self.accesses
        out = asdict(self) | {
            "accesses": acc, "hit_rate": self.hits / acc, "miss_rate": self.misses / acc,
            "misses_per_token": self.misses / n, "loads_per_token": (self.misses + self.prefetches) / n,
            "prefetch_precision": self.prefetch_hits / self.prefetches if self.prefetches else None,
            "prefetch_precision_on_time": self.prefetch_hits_on_time / self.prefetches if self.prefetches else None,
            "prefetch_recall": self.prefetch_hits / acc}
        if expert_bytes is not None:
            out["bytes_per_token"] = out["loads_per_token"] * expert_bytes
        return out


def predict_trace(predictor, trace: Trace, moe_layers: list[int], chunk: int = 4096) -> Predictions:
    """Run an engine `Predictor` over the trace's recorded hidden states (the input of each MoE layer), as the
    engine would at each visit: ids[j][t, li] = its prediction at layer li for layer li + j."""
    import torch

    from expertyard.trace.format import TraceError

    if trace.hidden is None:
        raise TraceError("trace key 'hidden' is missing: record the trace with `expertyard trace --save-hidden` "
                         "to replay a predictor")
    index = {layer: li for li, layer in enumerate(moe_layers)}
    t, depth = trace.num_tokens, predictor.depth
    ids: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for li, layer in enumerate(moe_layers):
            for c0 in range(0, t, chunk):
                x = torch.from_numpy(np.ascontiguousarray(trace.hidden[c0:c0 + chunk, li]))  # [n, D] float16
                for target, pred in predictor.predict(layer, x):  # pred [n, K'] ids of MoE layer `target`
                    j = index[target] - li
                    assert 1 <= j <= depth, f"predictor at layer {layer} predicted layer {target}"
                    if j not in ids:
                        ids[j] = np.full((t, trace.num_layers, pred.shape[1]), -1, dtype=np.int16)
                    ids[j][c0:c0 + chunk, li] = pred.cpu().numpy()
    for j in range(1, depth + 1):
        ids.setdefault(j, np.full((t, trace.num_layers, 1), -1, dtype=np.int16))
    return Predictions(depth, ids)


def capacity_for(trace: Trace, cache_experts: int | None = None, cache_fraction: float | None = None) -> int:
    """Cache slots: `cache_experts`, or `cache_fraction` of all L x num_experts routed experts (rounded)."""
    if (cache_experts is None) == (cache_fraction is None):
        raise ConfigError("give exactly one of --cache-experts and --cache-fraction")
    total = trace.num_layers * trace.num_experts
    if cache_fraction is not None:
        if not 0 < cache_fraction <= 1:
            raise ConfigError(f"--cache-fraction {cache_fraction} must be in (0, 1]")
        cache_experts = max(1, round(cache_fraction * total))
    if not 1 <= cache_experts <= total:
        raise ConfigError(f"--cache-experts {cache_experts} must be in 1..{total} (L={trace.num_layers} x "
                          f"{trace.num_experts} experts)")
    return cache_experts


def schedule(trace: Trace, batch_size: int) -> Iterator[list[int]]:
    """The tokens of each step: one token at a time, or `batch_size` sequences advancing together."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    if batch_size == 1:
        yield from ([t] for t in range(trace.num_tokens))
        return
    pending = iter(trace.sequences())
    slots: list[list[int]] = []  # [next token, end] of each running sequence
    for _ in range(batch_size):
        if (seq := next(pending, None)) is not None:
            slots.append(list(seq))
    while slots:
        yield [s[0] for s in slots]
        running = []
        for s in slots:
            s[0] += 1
            if s[0] < s[1]:
                running.append(s)
            elif (seq := next(pending, None)) is not None:
                running.append(list(seq))
        slots = running


def _union(lists) -> list[int]:
    if len(lists) == 1:
        return lists[0]
    return list(dict.fromkeys(e for lst in lists for e in lst))


def visits(trace: Trace, batch_size: int, predictions: Predictions | None = None
           ) -> Iterator[tuple[int, list[int], list[tuple[int, int]], int]]:
    """Every visit in order: (layer, experts it uses, predicted (layer, expert) keys to prefetch, tokens)."""
    num_layers = trace.num_layers
    blocks: dict[int, list[list]] = {}  # block index -> per-token Python lists (see `_lists`)
    for tokens in schedule(trace, batch_size):
        rows = []
        for t in tokens:
            b = t // BLOCK
            if b not in blocks:
                done = min(tokens) // BLOCK  # tokens only move forward: earlier blocks are not needed again
                for old in [k for k in blocks if k < done]:
                    del blocks[old]
                blocks[b] = _lists(trace, predictions, b * BLOCK, (b + 1) * BLOCK)
            rows.append(blocks[b][t - b * BLOCK])
        for li in range(num_layers):
            experts = _union([r[0][li] for r in rows])
            predicted = []
            if predictions is not None:
                for j in range(1, predictions.depth + 1):
                    if li + j < num_layers:
                        predicted += [(li + j, e) for e in _union([r[j][li] for r in rows]) if e >= 0]
            yield li, experts, predicted, len(rows)


def _lists(trace: Trace, predictions: Predictions | None, start: int, end: int) -> list[list]:
    """Per token in [start, end): [experts [L][K], then for each depth j: predicted ids [L][K'] for li + j]."""
    end = min(end, trace.num_tokens)
    experts = trace.experts[start:end].tolist()
    if predictions is None:
        return [[e] for e in experts]
    rows = []
    if predictions.ids is None:  # oracle: the true experts of layer li + j of the same token
        for e in experts:
            rows.append([e] + [e[j:] for j in range(1, predictions.depth + 1)])
        return rows
    pred = [predictions.ids[j][start:end].tolist() for j in range(1, predictions.depth + 1)]
    return [[e, *(p[i] for p in pred)] for i, e in enumerate(experts)]


def visit(state: ExpertCacheState, layer: int, experts: list[int], predicted: list[tuple[int, int]],
          now: int, pairs: int, top_k: int) -> tuple[bool, list[Load]]:
    """One MoE layer visit, as `OffloadedExperts.forward_routed` makes it (`pairs` = tokens x top_k): the
    experts accessed, the visit ended, the predictions prefetched; when the pairs exceed the cache, its
    load-first path (predictions released if the experts would not fit, experts accessed in groups that fit).
    Returns whether that path released the predictions, and the prefetch loads."""
    released = False
    room = len(experts)
    if pairs > state.capacity:
        released = len(experts) > state.capacity - len(state.protected)
        if released:
            state.release_prefetched()
        room = max(top_k, state.capacity - len(state.protected))
    for start in range(0, len(experts), room):
        group = experts[start:start + room]
        state.access(layer, group, now)
        state.end_visit(layer, group)
    return released, state.prefetch(predicted, now) if predicted else []


def sequence_start_steps(trace: Trace, batch_size: int) -> set[int]:
    """Steps of `schedule` whose tokens include the first token of a sequence: where the simulator calls
    `CachePolicy.on_sequence_start` (batch size 1: at every sequence start)."""
    firsts = set(trace.seq_starts.tolist())
    if batch_size == 1:
        return firsts
    return {i for i, tokens in enumerate(schedule(trace, batch_size)) if firsts.intersection(tokens)}


def by_layer(predicted: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """Predicted keys grouped per layer, nearest layer first (the order `visits` yields them in)."""
    groups: dict[int, list[int]] = {}
    for layer, e in predicted:
        groups.setdefault(layer, []).append(e)
    return list(groups.items())


def can_replay_fast(policy: str, predictions: Predictions | None = None, policy_kwargs: dict | None = None,
                    adaptive: bool = False) -> bool:
    """Whether `simulate` can use the compiled replay (`trace.fast_replay`): a policy with a kernel, no
    prefetch, no policy parameters."""
    return policy in KERNELS and predictions is None and not adaptive and not policy_kwargs


def simulate(trace: Trace, policy: str, capacity: int, predictions: Predictions | None = None,
             batch_size: int = 1, predictor_name: str | None = None, policy_kwargs: dict | None = None,
             adaptive: bool = False, fast: bool | None = None) -> SimResult:
    """Replay `trace` through an `ExpertCacheState` of `capacity` slots with `policy` (lru, lfu, hobbit, belady;
    `policy_kwargs` e.g. hobbit's weights). `adaptive`: HOBBIT's adaptive prefetch (`mixed_cache.adaptive_prefetch`:
    a deeper layer's predictions only while the nearer ones were all cached) instead of every predicted layer.
    `fast`: the compiled replay, with the same results (None: whenever `can_replay_fast`; False: the Python
    classes, the reference)."""
    if capacity < trace.top_k:
        raise SimulationError(f"a cache of {capacity} slots cannot hold the {trace.top_k} experts of one token")
    eligible = can_replay_fast(policy, predictions, policy_kwargs, adaptive)
    if fast and not eligible:
        raise ConfigError(f"the compiled replay runs {', '.join(KERNELS)} without prefetch or policy parameters, "
                          f"not {policy!r} with these options; replay it in Python (fast=False)")
    if eligible and fast is not False:
        hits, misses, releases, n = fast_replay(trace, policy, capacity, batch_size, schedule)
        return SimResult(policy, capacity, predictor_name or "none", 0, batch_size, trace.num_tokens, n, hits,
                         misses, 0, 0, 0, 0, releases)
    if adaptive:
        from expertyard.experts.mixed_cache import adaptive_prefetch  # imports torch (precision levels)
    kwargs = dict(policy_kwargs or {})
    if policy == "belady":
        kwargs["future"] = ((layer, experts) for layer, experts, _, _ in visits(trace, batch_size))
    state = ExpertCacheState(capacity, make_policy(policy, **kwargs))
    starts = sequence_start_steps(trace, batch_size)
    now, releases, on_time, k, num_layers = -1, 0, 0, trace.top_k, trace.num_layers
    waiting: dict[int, set[int]] = {}  # layer -> experts prefetched for its next visit
    for now, (layer, experts, predicted, tokens) in enumerate(visits(trace, batch_size, predictions)):
        if layer == 0 and now // num_layers in starts:
            state.policy.on_sequence_start()
        if layer in waiting:
            on_time += len(waiting.pop(layer).intersection(experts))
        if adaptive and predicted:
            released, _ = visit(state, layer, experts, [], now, tokens * k, k)
            loads = adaptive_prefetch(state, by_layer(predicted), now)
        else:
            released, loads = visit(state, layer, experts, predicted, now, tokens * k, k)
        releases += released
        for load in loads:
            waiting.setdefault(load.key[0], set()).add(load.key[1])
    c = state.counters
    name = predictor_name or ("none" if predictions is None else "oracle" if predictions.ids is None else "?")
    return SimResult(policy, capacity, name, predictions.depth if predictions else 0, batch_size,
                     trace.num_tokens, now + 1, c.hits, c.misses, c.prefetches, c.prefetch_hits,
                     c.wasted_prefetches, on_time, releases)


_JOB_STATE: dict = {}


def _run_job(job: dict) -> SimResult:
    return simulate(_JOB_STATE["trace"], predictions=_JOB_STATE["predictions"] if job.pop("predict") else None,
                    **job)


def simulate_many(trace: Trace, jobs: list[dict], predictions: Predictions | None = None,
                  processes: int = 1) -> list[SimResult]:
    """Run `simulate(trace, **job)` for each job (key `predict`: use `predictions`), in `processes` forked
    processes when > 1 (the trace is shared, not copied)."""
    _JOB_STATE.update(trace=trace, predictions=predictions)
    try:
        if processes <= 1 or len(jobs) <= 1:
            return [_run_job(dict(j)) for j in jobs]
        with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("fork")) as ex:
            return list(ex.map(_run_job, [dict(j) for j in jobs]))
    finally:
        _JOB_STATE.clear()
