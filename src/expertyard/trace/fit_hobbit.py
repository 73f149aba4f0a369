"""Fit HOBBIT's four cache-priority weights on a calibration trace: minimise the mixed-precision miss penalty
(full misses + bits_low/16 * low misses) of a replay, by derivative-free search over the simplex (only the ratios
of the weights matter):

1. a grid: every (w_lru, w_lfu, w_lhu, w_fld) with w_i in {0, 1/4, ..., 1} summing to 1 (35 points, the four
   single-term policies among them, so the fit is never worse than any single term on the calibration part);
2. coordinate refinement: from the best point, move 1/8 and then 1/16 of weight from one term to another (12
   moves a round), take the best move while it lowers the penalty (at most `rounds` rounds per step size).

Weights are kept as integer sixteenths, so the search is exact and deterministic; ties go to the point found
first. Each evaluation is one full replay of the calibration part.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from expertyard.errors import ConfigError
from expertyard.experts.policies.hobbit_weights import HobbitWeights
from expertyard.trace.format import Trace

UNITS = 16  # weights in sixteenths
Point = tuple[int, int, int, int]


def grid(step: int = 4) -> list[Point]:
    """Every point of the simplex in multiples of `step` sixteenths, in lexicographic order."""
    n = UNITS // step
    return [tuple(step * v for v in (a, b, c, n - a - b - c))  # type: ignore[misc]
            for a in range(n + 1) for b in range(n + 1 - a) for c in range(n + 1 - a - b)]


def moves(p: Point, delta: int) -> list[Point]:
    """Points reached by moving `delta` sixteenths from term j to term i (i != j)."""
    out = []
    for i, j in itertools.permutations(range(4), 2):
        if p[j] >= delta:
            q = list(p)
            q[i] += delta
            q[j] -= delta
            out.append(tuple(q))
    return out


def to_weights(p: Point) -> HobbitWeights:
    return HobbitWeights(*(v / UNITS for v in p))


@dataclass
class FitResult:
    best: Point
    penalty: float
    evaluated: dict[Point, float] = field(default_factory=dict)

    @property
    def weights(self) -> HobbitWeights:
        return to_weights(self.best)

    def single_terms(self) -> dict[str, float]:
        names = ("lru", "lfu", "lhu", "fld")
        return {n: self.evaluated[tuple(UNITS * (i == k) for i in range(4))] for k, n in enumerate(names)}


def fit(evaluate_many: Callable[[list[Point]], Sequence[float]], rounds: int = 4,
        deltas: tuple[int, ...] = (2, 1)) -> FitResult:
    """Grid then coordinate refinement (module docstring); `evaluate_many(points) -> penalties`."""
    seen: dict[Point, float] = {}

    def run(points: list[Point]) -> None:
        todo = [p for p in dict.fromkeys(points) if p not in seen]
        for p, v in zip(todo, evaluate_many(todo)):
            seen[p] = float(v)

    start = grid()
    run(start)
    best = min(start, key=lambda p: seen[p])  # min keeps the first of equals
    for delta in deltas:
        for _ in range(rounds):
            near = moves(best, delta)
            run(near)
            cand = min(near, key=lambda p: seen[p])
            if seen[cand] >= seen[best]:
                break
            best = cand
    return FitResult(best, seen[best], seen)


def split_at_sequence(trace: Trace, fraction: float) -> int:
    """The first token of the sequence whose start is nearest `fraction` of the tokens (never 0, never T)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--calibration-fraction {fraction} must be in (0, 1)")
    starts = trace.seq_starts[1:]
    if len(starts) == 0:
        raise ConfigError("the trace has one sequence: a calibration/held-out split needs at least two")
    target = fraction * trace.num_tokens
    return int(starts[abs(starts - target).argmin()])


def slice_trace(trace: Trace, start: int, end: int) -> Trace:
    """Tokens [start, end) as a trace of their own; `start` must be a sequence start."""
    s = trace.seq_starts
    if start not in set(s.tolist()):
        after = s[s > start]
        hint = f"; the next sequence starts at {int(after[0])}" if len(after) else ""
        raise ConfigError(f"--start-token {start} is not the first token of a sequence{hint}")
    keep = s[(s >= start) & (s < end)] - start
    return Trace(trace.experts[start:end], trace.weights[start:end], keep, trace.num_experts, trace.model,
                 trace.source, trace.phase, None if trace.hidden is None else trace.hidden[start:end])


_STATE: dict = {}


def _call(item):
    return _STATE["fn"](item)


def pmap(fn: Callable, items: list, jobs: int = 1) -> list:
    """[fn(x) for x in items], in `jobs` forked processes when > 1 (closures and the trace are shared, not
    pickled)."""
    if jobs <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    _STATE["fn"] = fn
    try:
        with ProcessPoolExecutor(min(jobs, len(items)), mp_context=multiprocessing.get_context("fork")) as ex:
            return list(ex.map(_call, items))
    finally:
        _STATE.clear()


@dataclass
class MixedSetup:
    """What a mixed-precision replay needs besides the trace: per-pair levels [T, L, K], pool sizes, the penalty
    of a low-precision miss (bits_low / 16) and the low/full byte ratio (for traffic)."""
    levels: object  # np.ndarray int8 [T, L, K]
    high_slots: int
    low_slots: int
    low_cost: float
    ratio: float


def fit_and_compare(trace: Trace, setup: MixedSetup, budget: int, calibration_fraction: float, jobs: int = 1,
                    rounds: int = 4) -> tuple[FitResult, dict]:
    """Fit on the sequences before the split (`calibration_fraction` of the tokens), then replay the held-out
    rest with lru, lfu, the fitted hobbit and belady, mixed precision (penalty) and full precision at the same
    budget (misses). Returns the fit and a report dict."""
    from expertyard.trace.mixed_simulate import simulate_mixed
    from expertyard.trace.simulate import simulate

    split = split_at_sequence(trace, calibration_fraction)
    cal, held = slice_trace(trace, 0, split), slice_trace(trace, split, trace.num_tokens)
    lv_cal, lv_held = setup.levels[:split], setup.levels[split:]

    def penalty(p: Point) -> float:
        return simulate_mixed(cal, lv_cal, "hobbit", setup.high_slots, setup.low_slots, setup.low_cost,
                              policy_kwargs={"weights": to_weights(p)}).penalty

    result = fit(lambda points: pmap(penalty, points, jobs), rounds=rounds)
    fitted = {"weights": result.weights}
    policies = [("lru", {}), ("lfu", {}), ("hobbit", fitted), ("belady", {})]

    def held_out(job):
        mode, name, kwargs = job
        if mode == "mixed":
            r = simulate_mixed(held, lv_held, name, setup.high_slots, setup.low_slots, setup.low_cost,
                               policy_kwargs=kwargs)
            return r.summary(setup.ratio)
        return simulate(held, name, budget, policy_kwargs=kwargs).summary()

    jobs_ = [(m, n, k) for m in ("mixed", "full") for n, k in policies]
    runs = pmap(held_out, jobs_, jobs)
    n_cal, n_held = cal.num_tokens, held.num_tokens
    report = {
        "calibration_tokens": [0, split], "held_out_tokens": [split, trace.num_tokens],
        "calibration": {"hobbit_fitted": result.penalty / n_cal,
                        "single_term": {k: v / n_cal for k, v in result.single_terms().items()},
                        "evaluations": len(result.evaluated)},
        "held_out": {n: r["penalty_per_token"] for (m, n, _), r in zip(jobs_, runs) if m == "mixed"},
        "held_out_full_precision_misses_per_token": {n: r["misses_per_token"]
                                                     for (m, n, _), r in zip(jobs_, runs) if m == "full"},
        "held_out_runs": [dict(r, mode=m) for (m, _, _), r in zip(jobs_, runs)],
        "units": "penalty per token: full misses + low_cost * low misses, per token of the part",
        "held_out_tokens_count": n_held,
    }
    return result, report
