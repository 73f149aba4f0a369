"""Deployment-plan search (MegaScale-Infer, Algorithm 1), over tp_a, tp_e, n_e, n_a, m and the batch.

For every tensor-parallel pair (tp_a, tp_e), expert-node count n_e (a divisor of E: each node holds E / n_e
experts) and micro-batch count m, all attention-node counts n_a are evaluated at once (numpy), each at the
largest micro-batch b_a that satisfies every constraint:

  memory   weights + KV cache of m * b_a sequences fit each attention GPU; E / n_e experts fit each expert GPU
  SLO      iteration time (TPOT) <= --slo-tpot
  balance  |T_a - T_e| <= tolerance * T_f                       (the paper's T_a ~ T_e)
  comm     T_c < T_f                                             (communication hidden under compute)
  pingpong m >= 2 (1 + T_c / T_f)                                (the ping-pong condition)

Memory and the SLO only tighten as b_a grows, so they give an upper bound b_hi. The other three are unions
of intervals whose ends are roots of linear functions of b_a (every T is linear in b_a); the largest
feasible integer is b_hi or the floor of such a root, so checking those candidates is exact. Throughput
B / TPOT grows with b_a at fixed n_a, so the largest feasible b_a is the best one.

A plan is a unit of n_a * tp_a + n_e * tp_e GPUs, replicated floor(N / unit) times (data parallel), so a
plan for N GPUs is also a plan for N + 1: the best total throughput never drops as GPUs are added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertyard.errors import ConfigError
from expertyard.plan.perf_model import Deployment, PerfModel, Prediction, iteration_time, predict

TP_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Constraints:
    slo_tpot_s: float | None = None  # None: no latency bound
    balance_tolerance: float = 0.2  # |T_a - T_e| <= tolerance * max(T_a, T_e)
    max_micro_batches: int = 8  # m searched over 2..max
    max_micro_batch: int = 1 << 16  # b_a searched over 1..max
    objective: str = "throughput"  # throughput (tokens/s of all N GPUs) | per-cost (tokens per USD)

    def __post_init__(self):
        if self.slo_tpot_s is not None and self.slo_tpot_s <= 0:
            raise ConfigError(f"--slo-tpot {self.slo_tpot_s * 1e3:g} ms must be > 0")
        if not 0 < self.balance_tolerance < 1:
            raise ConfigError(f"--balance-tolerance {self.balance_tolerance} must be in (0, 1)")
        if self.max_micro_batches < 2:
            raise ConfigError(f"--max-micro-batches {self.max_micro_batches} must be >= 2 (ping-pong needs m >= 2)")
        if self.objective not in ("throughput", "per-cost"):
            raise ConfigError(f"objective {self.objective!r} must be 'throughput' or 'per-cost'")


@dataclass(frozen=True)
class Plan:
    prediction: Prediction  # of one unit
    replicas: int  # copies of the unit in the N GPUs

    @property
    def total_throughput(self) -> float:
        return self.replicas * self.prediction.throughput

    @property
    def gpus_used(self) -> int:
        return self.replicas * self.prediction.deployment.gpus

    def score(self, objective: str) -> tuple:
        p = self.prediction
        if objective == "per-cost":
            return (p.per_dollar or 0.0, self.total_throughput)
        return (self.total_throughput, p.per_dollar or 0.0, p.per_gpu)

    def to_dict(self) -> dict:
        return {"replicas": self.replicas, "gpus_used": self.gpus_used, "total_throughput": self.total_throughput,
                **self.prediction.to_dict()}


def feasible(model: PerfModel, tp_a: int, tp_e: int, n_a, n_e: int, m: int, b_a, cons: Constraints):
    """Boolean array: every constraint holds (broadcast over n_a and b_a)."""
    t_a, t_e, t_c, t_h = model.times(tp_a, tp_e, n_a, n_e, b_a)
    t_f = np.maximum(t_a, t_e)
    ok = (np.abs(t_a - t_e) <= cons.balance_tolerance * t_f) & (t_c < t_f) & (m * t_f >= 2 * (t_f + t_c))
    attn_mem, exp_mem = model.memory(tp_a, tp_e, n_e, m, b_a)
    ok &= (attn_mem <= model.ha.usable_bytes) & (exp_mem <= model.he.usable_bytes) & (np.asarray(b_a) >= 1)
    if cons.slo_tpot_s is not None:
        t_step = model.step_time(np.asarray(n_a) * m * np.asarray(b_a))
        ok &= iteration_time(t_a, t_e, t_c, t_h, m, model.c.num_layers, t_step, model.async_scheduling) \
            <= cons.slo_tpot_s
    return ok


def _b_upper(model: PerfModel, tp_a: int, tp_e: int, n_a: np.ndarray, n_e: int, m: int, cons: Constraints):
    """Largest b_a allowed by memory and the SLO (both monotone in b_a), per n_a; 0 where none is."""
    c = model.c
    kv_seq = c.kv_bytes_per_sequence(model.w.reserved_len) / model.kv_divisor(tp_a)
    room = model.ha.usable_bytes - c.attention_weight_bytes() / tp_a
    b_mem = min(cons.max_micro_batch, int(room // (m * kv_seq)) if room > 0 else 0)
    hi = np.full(n_a.shape, b_mem, dtype=np.int64)
    if cons.slo_tpot_s is None or b_mem < 1:
        return hi

    def slo_ok(b):
        t = model.times(tp_a, tp_e, n_a, n_e, b)
        return iteration_time(*t, m, c.num_layers, model.step_time(n_a * m * b), model.async_scheduling) \
            <= cons.slo_tpot_s

    lo = np.zeros_like(hi)  # bisection: lo meets the SLO (or is 0: nothing does), every b > hi misses it
    while np.any(lo < hi):
        mid = (lo + hi + 1) // 2
        ok = slo_ok(mid)
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid - 1)
    return lo


def _best_b(model: PerfModel, tp_a: int, tp_e: int, n_a: np.ndarray, n_e: int, m: int, cons: Constraints):
    """Largest feasible b_a per n_a (0: none), checking b_hi and the floors of every constraint root."""
    b_hi = _b_upper(model, tp_a, tp_e, n_a, n_e, m, cons)
    # every T is linear in b_a: T(b) = T(0) + b * (T(1) - T(0))
    t0 = model.times(tp_a, tp_e, n_a, n_e, 0.0)
    t1 = model.times(tp_a, tp_e, n_a, n_e, 1.0)
    (a0, e0, c0, _), (a1, e1, c1, _) = t0, t1
    lines = lambda f: (f(a0, e0, c0), f(a1, e1, c1) - f(a0, e0, c0))  # noqa: E731 (intercept, slope)
    tol = cons.balance_tolerance
    boundaries = [lines(lambda a, e, c: e - (1 - tol) * a), lines(lambda a, e, c: a - (1 - tol) * e),
                  lines(lambda a, e, c: a - c), lines(lambda a, e, c: e - c),
                  lines(lambda a, e, c: (m - 2) * a - 2 * c), lines(lambda a, e, c: (m - 2) * e - 2 * c)]
    cands = [b_hi]
    with np.errstate(divide="ignore", invalid="ignore"):
        for icpt, slope in boundaries:
            root = np.where(slope != 0, -icpt / slope, -1.0)
            root = np.where(np.isfinite(root), np.clip(root, -1, b_hi + 1), -1.0)
            cands += [np.floor(root).astype(np.int64), (np.ceil(root) - 1).astype(np.int64)]
    cand = np.minimum(np.stack(cands, axis=1), b_hi[:, None])  # [A, C]
    ok = feasible(model, tp_a, tp_e, n_a[:, None], n_e, m, np.maximum(cand, 1), cons) & (cand >= 1)
    return np.where(ok, cand, 0).max(axis=1)


def tp_choices(model: PerfModel) -> tuple[list[int], list[int]]:
    c = model.c
    tp_a = [t for t in TP_SIZES if t <= model.ha.gpus_per_host and c.num_heads % t == 0]
    tp_e = [t for t in TP_SIZES if t <= model.he.gpus_per_host and c.expert_intermediate % t == 0]
    return tp_a, tp_e


def search(model: PerfModel, num_gpus: int, cons: Constraints = Constraints()) -> list[Plan]:
    """Every locally best plan (the best n_a for each tp_a, tp_e, n_e, m), best first by the objective."""
    if num_gpus < 2:
        raise ConfigError(f"--gpus {num_gpus}: a disaggregated deployment needs at least 2 GPUs "
                          "(one attention node and one expert node)")
    c = model.c
    tp_as, tp_es = tp_choices(model)
    plans: list[Plan] = []
    n_es = [d for d in range(1, c.num_experts + 1) if c.num_experts % d == 0]
    for tp_a in tp_as:
        for tp_e in tp_es:
            for n_e in n_es:
                max_na = (num_gpus - n_e * tp_e) // tp_a
                if max_na < 1:
                    continue
                _, exp_mem = model.memory(tp_a, tp_e, n_e, 1, 0)
                if exp_mem > model.he.usable_bytes:
                    continue
                n_a = np.arange(1, max_na + 1)
                for m in range(2, cons.max_micro_batches + 1):
                    b = _best_b(model, tp_a, tp_e, n_a, n_e, m, cons)
                    if not b.any():
                        continue
                    unit = n_a * tp_a + n_e * tp_e
                    t = model.times(tp_a, tp_e, n_a, n_e, np.maximum(b, 1))
                    tpot = iteration_time(*t, m, c.num_layers, model.step_time(n_a * m * b), model.async_scheduling)
                    thr = np.where(b > 0, n_a * m * b / tpot, 0.0)
                    total = (num_gpus // unit) * thr
                    if cons.objective == "per-cost" and model.ha.price_per_hour and model.he.price_per_hour:
                        cost = n_a * tp_a * model.ha.price_per_hour + n_e * tp_e * model.he.price_per_hour
                        key = np.where(b > 0, thr / cost, 0.0)
                    else:
                        key = total
                    i = int(np.argmax(key))
                    dep = Deployment(tp_a, tp_e, int(n_a[i]), n_e, m, int(b[i]))
                    plans.append(Plan(predict(model, dep), num_gpus // dep.gpus))
    plans.sort(key=lambda p: p.score(cons.objective), reverse=True)
    return plans


def best_plan(model: PerfModel, num_gpus: int, cons: Constraints = Constraints(), label: str = "the model") -> Plan:
    """The best plan, or a ConfigError that says which constraint leaves none and what to change."""
    plans = search(model, num_gpus, cons)
    if plans:
        return plans[0]
    raise ConfigError(_why_none(model, num_gpus, cons, label))


def _why_none(model: PerfModel, num_gpus: int, cons: Constraints, label: str) -> str:
    c, ha, he = model.c, model.ha, model.he
    tp_as, tp_es = tp_choices(model)
    attn_need = c.attention_weight_bytes() / max(tp_as) + c.kv_bytes_per_sequence(model.w.reserved_len) * 2 / \
        model.kv_divisor(max(tp_as))
    exp_need = min(c.num_moe_layers * c.expert_bytes * c.num_experts / (n_e * tp_e)
                   for tp_e in tp_es for n_e in range(1, c.num_experts + 1)
                   if c.num_experts % n_e == 0 and n_e * tp_e + 1 <= num_gpus) if num_gpus > 1 else float("inf")
    if attn_need > ha.usable_bytes:
        return (f"{label} does not fit: an attention node of tp_a={max(tp_as)} {ha.name} GPUs needs "
                f"{attn_need / 1e9:.1f} GB per GPU (weights + KV cache of 2 sequences of {model.w.reserved_len} "
                f"tokens) against {ha.usable_bytes / 1e9:.1f} GB usable; use a GPU with more memory or a "
                "shorter --context-len/--max-len")
    if exp_need > he.usable_bytes:
        return (f"{label} does not fit in {num_gpus} GPUs: its routed experts need at least "
                f"{exp_need / 1e9:.1f} GB per expert GPU in the largest expert group that leaves room for attention, "
                f"against {he.usable_bytes / 1e9:.1f} GB usable on {he.name}; use more --gpus or a bigger GPU profile")
    if cons.slo_tpot_s is not None:
        loose_cons = Constraints(None, cons.balance_tolerance, cons.max_micro_batches, cons.max_micro_batch,
                                 cons.objective)
        loose = search(model, num_gpus, loose_cons)
        if loose:
            tpot = min(_fastest_tpot(model, p, loose_cons) for p in loose)
            return (f"--slo-tpot {cons.slo_tpot_s * 1e3:g} ms is impossible for {label} on {num_gpus} GPUs: the "
                    f"fastest plan that meets the other constraints needs {tpot * 1e3:.2f} ms per token; "
                    "relax the SLO, use faster GPUs, or widen --balance-tolerance")
    return (f"no plan for {label} on {num_gpus} GPUs balances attention and experts within "
            f"--balance-tolerance {cons.balance_tolerance} while hiding communication (T_c < T_f, "
            f"m >= 2(1 + T_c/T_f) with m <= {cons.max_micro_batches}); widen the tolerance or use more GPUs")


def _fastest_tpot(model: PerfModel, plan: Plan, cons: Constraints) -> float:
    """TPOT of the plan's unit at the smallest micro-batch that meets the (non-SLO) constraints."""
    d = plan.prediction.deployment
    b = np.arange(1, d.b_a + 1)
    ok = feasible(model, d.tp_a, d.tp_e, d.n_a, d.n_e, d.m, b, cons)
    tpot = iteration_time(*model.times(d.tp_a, d.tp_e, d.n_a, d.n_e, b), d.m, model.c.num_layers)
    return float(tpot[ok].min())
