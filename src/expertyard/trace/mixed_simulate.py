"""Replay a routing trace through HOBBIT's two-pool cache (`MixedPrecisionCache`): each (token, expert) pair gets
the precision level its gate weights give it (`precision.levels`), and a miss loads a full copy, a low-precision
copy, or nothing (skipped).

Budget, in full-precision experts: B slots (`--cache-fraction` of L x E). A fraction f (`--low-pool-fraction`) of
those bytes becomes the low-precision pool:

    high slots = floor((1 - f) * B),   low slots = floor((B - high slots) / r)

with r = low expert bytes / full expert bytes: the real packed size `ExpertLayout.build(D, I, bits, 64).nbytes /
(3 D I 2)` when the model's D and I are known (0.28125 at int4, G = 64), else (bits + 0.5) / 16 (a float16 scale
and a float16 minimum per group of 64 weights add 32 / 64 = 0.5 bits per weight). Default f = 0.25: the low pool
then holds about 0.89 B low copies next to 0.75 B full ones (1.64 B copies in all), enough for the LOW pairs
(about a third of the pairs at T1 = 0.6, T2 = 0.9) and the prefetches, while most bytes stay at full precision
(docs/simulation.md has the sweep over f).

Miss penalty (full-copy equivalents): full misses + (bits_low / bits_full) * low misses
(`PrecisionCounters.miss_penalty`), bits_full = 16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from expertyard.errors import ConfigError
from expertyard.experts.mixed_cache import MixedPrecisionCache, adaptive_prefetch
from expertyard.experts.policies import make_policy
from expertyard.experts.precision import FULL, LOW, PrecisionThresholds
from expertyard.trace.format import Trace, TraceError
from expertyard.trace.simulate import BLOCK, Predictions, SimulationError, by_layer, visits

# T = tokens, L = MoE layers, K = experts per token, E = routed experts per layer

FULL_BITS = 16
GROUP = 64
STANDIN_SIGMA = 1.7  # std of the stand-in router logits (see `standin_weights`)
STANDIN_BLOCK = 1024  # tokens per stand-in generator


def byte_ratio(bits: int, hidden: int | None = None, inter: int | None = None) -> tuple[float, str]:
    """Low-precision expert bytes / bf16 expert bytes, and where the number comes from."""
    if bits not in (2, 4, 8):
        raise ConfigError(f"--low-precision-bits {bits} must be 2, 4 or 8")
    if hidden and inter:
        try:
            from expertyard.quant.packed_expert import ExpertLayout

            layout = ExpertLayout.build(hidden, inter, bits, GROUP)
            return layout.nbytes / (3 * hidden * inter * 2), f"packed int{bits} G{GROUP} layout, D={hidden} I={inter}"
        except (ConfigError, ValueError):
            pass
    return (bits + 0.5) / FULL_BITS, f"(bits + 0.5) / 16: int{bits}, fp16 scale and minimum per {GROUP} weights"


def standin_weights(trace: Trace, seed: int = 0, sigma: float = STANDIN_SIGMA, offset: int = 0) -> np.ndarray:
    """Gate weights [T, L, K] for a trace that did not record them (an ASSUMPTION, not routing data): per
    (token, layer), E router logits drawn i.i.d. N(0, sigma^2), softmax, the top K, and these K weights given to the
    trace's K experts in a random order (the DeepSeek trace's expert lists carry no rank). sigma = 1.7 is fitted to
    the bundled model: with its E = 16, K = 4 it gives mean sorted top-4 weights 0.513 / 0.235 / 0.148 / 0.104
    against the recorded 0.508 / 0.238 / 0.149 / 0.105 (TinyStories trace), and pairs at full / low / skip
    45.3 / 39.7 / 15.0% against 45.2 / 40.8 / 14.0%. That the same logit spread holds for a 64-expert router
    is the assumption.

    The draws of token i depend only on (seed, offset + i): each block of STANDIN_BLOCK tokens of the source trace
    has its own generator, so a window (`--start-token`, `--max-tokens`) gets the weights the whole trace has."""
    t, layers, k = trace.experts.shape
    out = np.empty((t, layers, k), np.float32)
    first, last = offset // STANDIN_BLOCK, (offset + t - 1) // STANDIN_BLOCK
    for b in range(first, last + 1):
        rng = np.random.default_rng([seed, b])
        logits = rng.standard_normal((STANDIN_BLOCK, layers, trace.num_experts)) * sigma
        perm = np.argsort(rng.random((STANDIN_BLOCK, layers, k)), axis=-1)  # a random order per (token, layer)
        lo, hi = max(offset, b * STANDIN_BLOCK), min(offset + t, (b + 1) * STANDIN_BLOCK)
        sel = slice(lo - b * STANDIN_BLOCK, hi - b * STANDIN_BLOCK)
        top = -np.sort(-logits[sel], axis=-1)[..., :k]  # [n, L, K] descending
        w = np.exp(top - top[..., :1])
        w /= w.sum(-1, keepdims=True)
        out[lo - offset:hi - offset] = np.take_along_axis(w, perm[sel], axis=-1)
    return out


def trace_levels(trace: Trace, thresholds: PrecisionThresholds, seed: int = 0, offset: int = 0
                 ) -> tuple[np.ndarray, str]:
    """Per-pair precision level int8 [T, L, K] (FULL, LOW, SKIP) from the trace's gate weights, or from
    `standin_weights` when the trace has none (all NaN; `offset`: the trace's first token in its source file).
    Returns the levels and their source."""
    import torch

    from expertyard.experts.precision import levels

    w = trace.weights
    nan = np.isnan(w)
    if nan.all():
        w = standin_weights(trace, seed, offset=offset)
        source = f"stand-in weights (N(0, {STANDIN_SIGMA}^2) logits, seed {seed})"
    elif nan.any():
        raise TraceError("trace key 'weights': NaN for some pairs only; mixed precision needs every pair's weight "
                         "(or none, for the stand-in)")
    else:
        source = "trace gate weights"
    t, layers, k = w.shape
    flat = torch.from_numpy(np.ascontiguousarray(w.reshape(t * layers, k)))
    out = np.concatenate([levels(flat[i:i + 65536], thresholds).numpy().astype(np.int8)
                          for i in range(0, t * layers, 65536)])
    return out.reshape(t, layers, k), source


@dataclass
class MixedResult:
    policy: str
    high_slots: int
    low_slots: int
    low_cost: float  # penalty of a low-precision miss, in full misses
    predictor: str
    depth: int
    adaptive: bool
    tokens: int
    visits: int
    full_hits: int
    low_hits: int
    full_misses: int
    low_misses: int
    skipped: int
    prefetches: int
    prefetch_hits: int

    @property
    def requests(self) -> int:
        return self.full_hits + self.low_hits + self.full_misses + self.low_misses + self.skipped

    @property
    def penalty(self) -> float:
        return self.full_misses + self.low_cost * self.low_misses

    def summary(self, ratio: float | None = None) -> dict:
        n = self.tokens
        out = asdict(self) | {"requests": self.requests, "miss_penalty": self.penalty,
                              "penalty_per_token": self.penalty / n, "full_misses_per_token": self.full_misses / n,
                              "low_misses_per_token": self.low_misses / n, "skipped_per_token": self.skipped / n}
        if ratio is not None:  # bytes moved, in full-expert equivalents (low copies at their real size)
            out["loads_per_token"] = (self.full_misses + ratio * (self.low_misses + self.prefetches)) / n
        return out


def _level_futures(trace: Trace, levels: np.ndarray) -> tuple[list, list]:
    """Belady's futures per pool: the visits' experts needed at FULL (full pool) and at LOW (low pool)."""
    high, low = [], []
    for c0 in range(0, trace.num_tokens, BLOCK):
        ex = trace.experts[c0:c0 + BLOCK].tolist()
        lv = levels[c0:c0 + BLOCK].tolist()
        for e_t, l_t in zip(ex, lv):
            for li, (es, ls) in enumerate(zip(e_t, l_t)):
                high.append((li, [e for e, x in zip(es, ls) if x == FULL]))
                low.append((li, [e for e, x in zip(es, ls) if x == LOW]))
    return high, low


def simulate_mixed(trace: Trace, levels: np.ndarray, policy: str, high_slots: int, low_slots: int,
                   low_cost: float, predictions: Predictions | None = None, adaptive: bool = False,
                   policy_kwargs: dict | None = None, predictor_name: str | None = None) -> MixedResult:
    """Replay `trace` one token at a time through a `MixedPrecisionCache` (both pools run `policy`), each visit's
    pairs at `levels` [T, L, K]; predictions are prefetched into the low pool (all predicted layers, or HOBBIT's
    adaptive rule). `on_sequence_start` at every sequence start. belady: each pool's MIN on its own future
    needs (FULL-level requests for the full pool, LOW-level for the low pool): a reference point, not a proven
    optimum of the two pools together."""
    if levels.shape != trace.experts.shape:
        raise SimulationError(f"levels {levels.shape} must match the trace's experts {trace.experts.shape}")
    if min(high_slots, low_slots) < trace.top_k:
        raise SimulationError(f"pools of {high_slots} / {low_slots} slots cannot hold the {trace.top_k} experts "
                              "of one token")
    kwargs = dict(policy_kwargs or {})
    if policy == "belady":
        high_future, low_future = _level_futures(trace, levels)
        cache = MixedPrecisionCache(high_slots, make_policy("belady", future=high_future), low_slots,
                                    make_policy("belady", future=low_future))
    else:
        cache = MixedPrecisionCache(high_slots, make_policy(policy, **kwargs), low_slots, make_policy(policy, **kwargs))
    starts, num_layers = set(trace.seq_starts.tolist()), trace.num_layers
    block, rows, now = -1, [], -1
    for now, (layer, experts, predicted, _) in enumerate(visits(trace, 1, predictions)):
        t = now // num_layers
        if layer == 0:
            if t in starts:
                cache.high.policy.on_sequence_start()
                cache.low.policy.on_sequence_start()
            if t // BLOCK != block:
                block = t // BLOCK
                rows = levels[block * BLOCK:(block + 1) * BLOCK].tolist()
        plan = cache.access(layer, list(zip(experts, rows[t - block * BLOCK][layer])), now)
        cache.end_visit(layer, plan)
        if predicted:
            if adaptive:
                adaptive_prefetch(cache, by_layer(predicted), now)
            else:
                cache.prefetch(predicted, now)
    c, lc = cache.counters, cache.low.counters
    name = predictor_name or ("none" if predictions is None else "oracle" if predictions.ids is None else "?")
    return MixedResult(policy, high_slots, low_slots, low_cost, name, predictions.depth if predictions else 0,
                       adaptive, trace.num_tokens, now + 1, c.full_hits, c.low_hits, c.full_misses, c.low_misses,
                       c.skipped, lc.prefetches, lc.prefetch_hits)
