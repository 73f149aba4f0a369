"""Colocated expert parallelism in the performance model: the baseline a disaggregated plan must beat.

A colocated unit is g GPUs (g divides E), each running attention (tensor parallel 1) for b = B / g sequences
and E / g routed experts of every MoE layer, with an all-to-all dispatch and combine per MoE layer and no
micro-batches: the runtime's `--mode colocated`. Units are replicated (data parallel) over the N GPUs, as
disaggregated units are. With the disaggregated model's own lines (perf_model.py), per layer:

  T_a = attention_line(tp 1)(b) + T_x(b) / 2          attention, router, packing: b sequences
  T_e = expert_line(tp 1, n_e = g)(b K) + T_x(b) / 2  b K (token, expert) pairs land on each GPU
  T_c = lat + b K D s (g - 1) / (g bw)               one all-to-all: the rows that leave the GPU
  iteration = L (T_a + T_e + 2 T_c) + T_h(b) + T_step(B)  (T_e, T_c scaled by L_moe / L; T_step overlapped
                                                            under async scheduling, as in iteration_time)

Nothing overlaps inside a layer: that is what ping-pong adds, at the price of m-times smaller expert batches
(each expert's weights are read once per micro-batch) and a fixed attention/expert split of the GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from expertyard.plan.perf_model import PerfModel


@dataclass(frozen=True)
class ColocatedPrediction:
    unit: int  # GPUs of one unit (each holds E / unit experts)
    replicas: int  # units in the N GPUs
    batch: int  # sequences per unit
    t_a: float  # seconds per layer
    t_e: float
    t_c: float
    t_h: float  # LM head per iteration
    t_step: float  # driver host work per iteration
    tpot: float
    throughput: float  # tokens/s of one unit
    per_gpu: float
    mem_bytes: float  # per GPU
    fits_memory: bool

    @property
    def total_throughput(self) -> float:
        return self.replicas * self.throughput

    def to_dict(self) -> dict:
        return {**asdict(self), "total_throughput": self.total_throughput}


def colocated_times(model: PerfModel, unit: int, b):
    """(T_a, T_e, T_c, T_h) in seconds for b sequences per GPU of a colocated unit (numpy-broadcast over b)."""
    c = model.c
    b = np.asarray(b, dtype=np.float64)
    half_x = 0.5 * model.exchange_time(model.ha, b) * model.moe_fraction
    t_a = model.attention_line(1)(b) + half_x
    t_e = model.expert_line(1, unit)(b * c.top_k) * model.moe_fraction + half_x
    bw = model.link_gbps(unit) * 1e9
    t_c = (model.ha.link_latency_us * 1e-6
           + b * c.top_k * c.activation_bytes * (unit - 1) / (unit * bw)) * model.moe_fraction
    return t_a, t_e, t_c, model.head_line(1)(b)


def colocated_tpot(model: PerfModel, unit: int, b):
    """Seconds per decode iteration of a colocated unit with b sequences per GPU."""
    t_a, t_e, t_c, t_h = colocated_times(model, unit, b)
    device = model.c.num_layers * (t_a + t_e + 2 * t_c) + t_h
    t_step = model.step_time(np.asarray(b) * unit)
    return np.maximum(device, t_step) if model.async_scheduling else device + t_step


def colocated_memory(model: PerfModel, unit: int, b):
    """Bytes per GPU: all non-expert weights, the KV cache of b sequences, E / unit experts of every MoE layer."""
    c = model.c
    return (c.attention_weight_bytes() + np.asarray(b, dtype=np.float64) * c.kv_bytes_per_sequence(model.w.reserved_len)
            + c.num_moe_layers * (c.num_experts / unit) * c.expert_bytes)


def predict_colocated(model: PerfModel, unit: int, batch: int, num_gpus: int | None = None) -> ColocatedPrediction:
    """A colocated unit of `unit` GPUs decoding `batch` sequences (batch / unit per GPU, not rounded)."""
    b = batch / unit
    t_a, t_e, t_c, t_h = (float(x) for x in colocated_times(model, unit, b))
    tpot = float(colocated_tpot(model, unit, b))
    mem = float(colocated_memory(model, unit, b))
    thr = batch / tpot
    return ColocatedPrediction(unit=unit, replicas=(num_gpus or unit) // unit, batch=batch, t_a=t_a, t_e=t_e,
                               t_c=t_c, t_h=t_h, t_step=float(model.step_time(batch)), tpot=tpot, throughput=thr,
                               per_gpu=thr / unit, mem_bytes=mem, fits_memory=mem <= model.ha.usable_bytes)


def best_colocated(model: PerfModel, num_gpus: int, slo_tpot_s: float | None = None,
                   max_batch_per_gpu: int = 1 << 16) -> ColocatedPrediction | None:
    """The colocated deployment of `num_gpus` GPUs with the most decode tokens/s: for every unit size g (a
    divisor of E, at most num_gpus) the largest per-GPU batch that fits memory and meets the SLO (throughput
    grows with the batch), replicated num_gpus // g times. None if no unit fits."""
    c = model.c
    best = None
    for unit in (g for g in range(1, min(num_gpus, c.num_experts) + 1) if c.num_experts % g == 0):
        room = model.ha.usable_bytes - float(colocated_memory(model, unit, 0))
        b_hi = min(max_batch_per_gpu, int(room // c.kv_bytes_per_sequence(model.w.reserved_len)) if room > 0 else 0)
        if b_hi < 1:
            continue
        if slo_tpot_s is not None:
            b = np.arange(1, b_hi + 1)
            ok = colocated_tpot(model, unit, b) <= slo_tpot_s  # TPOT grows with b: ok is a prefix
            if not ok[0]:
                continue
            b_hi = int(b[ok][-1])
        q = predict_colocated(model, unit, b_hi * unit, num_gpus)
        if best is None or q.total_throughput > best.total_throughput:
            best = q
    return best
