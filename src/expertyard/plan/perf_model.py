"""The performance model of one disaggregated deployment (MegaScale-Infer, section 4).

A deployment is n_a attention nodes of tp_a GPUs and n_e expert nodes of tp_e GPUs; every attention node
decodes m micro-batches of b_a sequences, so the global batch is B = n_a * m * b_a. Each expert node holds
E / n_e routed experts of every MoE layer. Per layer and micro-batch (times in seconds):

  T_a(b_a) = k1 * b_a + k2     attention node: k2 = overhead_a + W_attn / (tp_a * weight_bw) [+ TP all-reduce latency]
                                k1 = ctx * kv_bytes / (min(tp_a, kv_heads) * kv_bw) + 2 P_attn / (tp_a * attn_flops)
                                     [+ TP all-reduce bytes of one token]
  T_e(b_e) = k3 * b_e + k4     expert node, b_e = b_a * n_a * K / n_e (token, expert) pairs arrive per micro-batch:
                                k4 = overhead_e + (E / n_e) * W_expert / (tp_e * weight_bw) [+ all-reduce latency]
                                k3 = 2 P_expert / (tp_e * expert_flops) + 2 D s / weight_bw [+ all-reduce bytes]
  T_c(b_a) = lat + b_a * max(K D s / (tp_a * bw), n_a K D s / (n_e * bw))
                                one dispatch (or combine) message: the attention node's GPUs share the send,
                                every GPU of an expert node receives all b_e rows (TP splits I, not tokens)
  T_h(b_a)                      LM head of one micro-batch, once per iteration (vocabulary split over tp_a)
  T_x(b_a) = x1 * b_a + x0     not in the paper: the runtime's work around one exchange that no kernel fit times
                                (router, packing, unpacking, combining, launch gaps), calibrated from null
                                deployments; half is added to T_a, half to T_e (the split is an assumption)
  T_step(B)                     not in the paper: the driver's host work, once per iteration (step_time)

T_e and T_c are scaled by L_moe / L so that every per-layer figure is an average over the L layers (exact when
all layers are MoE). With T_f = max(T_a, T_e) and R = T_a + T_e + 2 T_c (one round trip of a micro-batch):

  iteration (= TPOT) = (L - 1) * P + (m - 1) * T_f + R + m * T_h + T_step,   P = max(m T_f, R)
  with async scheduling (the host prepares iteration t+1 while the GPUs run t): max(the same without T_step, T_step)

When the paper's ping-pong condition holds (m >= 2 (1 + T_c / T_f), which implies m T_f >= R, so P = m T_f)
this is the paper's (T_a + T_e + 2 T_c) + T_f (m L - 1), plus the LM head; when it does not, P = R is the
per-layer period of the stalled pipeline. Without T_h the formula equals, for every T_a, T_e, T_c, m and L, a
discrete-event simulation of the ping-pong schedule (one attention server, one expert server, messages
delayed by T_c; tests/test_plan_model.py). Link contention is not modelled: T_c < T_f keeps it hidden.
Throughput = B / iteration tokens/s. See docs/plan.md for the derivation.

Every function takes numpy arrays or scalars for n_a and b_a (broadcast), so the search evaluates thousands
of deployments at once through the same code as `plan predict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from expertyard.errors import ConfigError
from expertyard.plan.model_costs import ModelCosts
from expertyard.plan.profiles import HardwareProfile


@dataclass(frozen=True)
class Line:
    """t(b) = slope * b + intercept, seconds."""
    slope: float
    intercept: float

    def __call__(self, b):
        return self.slope * b + self.intercept


@dataclass(frozen=True)
class Workload:
    context_len: int = 2048  # mean cached tokens of a decoding sequence: what each step reads
    max_len: int | None = None  # KV-cache tokens reserved per sequence (memory); None: context_len

    def __post_init__(self):
        if self.context_len < 1:
            raise ConfigError(f"--context-len {self.context_len} must be >= 1")
        if self.max_len is not None and self.max_len < self.context_len:
            raise ConfigError(f"--max-len {self.max_len} must be >= --context-len {self.context_len}")

    @property
    def reserved_len(self) -> int:
        return self.max_len or self.context_len


@dataclass(frozen=True)
class Deployment:
    tp_a: int  # GPUs per attention node (tensor parallel)
    tp_e: int  # GPUs per expert node (tensor parallel)
    n_a: int  # attention nodes
    n_e: int  # expert nodes
    m: int  # micro-batches per attention node
    b_a: int  # sequences per micro-batch per attention node

    def __post_init__(self):
        for name in ("tp_a", "tp_e", "n_a", "n_e", "m", "b_a"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def gpus(self) -> int:
        return self.n_a * self.tp_a + self.n_e * self.tp_e

    @property
    def global_batch(self) -> int:
        return self.n_a * self.m * self.b_a


def _allreduce(tp: int, nbytes_per_row: float, hw: HardwareProfile) -> Line:
    """Ring all-reduce inside a host: latency + 2 (tp - 1) / tp of the bytes over the intra-host link."""
    if tp == 1:
        return Line(0.0, 0.0)
    return Line(2 * (tp - 1) / tp * nbytes_per_row / (hw.intra_host_gbps * 1e9), hw.link_latency_us * 1e-6)


class PerfModel:
    """T_a, T_e, T_c, T_h of a model on an attention GPU type and an expert GPU type (the same or not)."""

    def __init__(self, costs: ModelCosts, attn_hw: HardwareProfile, expert_hw: HardwareProfile,
                 workload: Workload = Workload(), async_scheduling: bool = False):
        self.c, self.ha, self.he, self.w = costs, attn_hw, expert_hw, workload
        self.moe_fraction = costs.num_moe_layers / costs.num_layers
        self.async_scheduling = async_scheduling  # T_step overlaps the GPUs' work (iteration_time)

    def kv_divisor(self, tp_a: int) -> int:
        return min(tp_a, self.c.kv_shards)

    def attention_line(self, tp_a: int) -> Line:
        """T_a(b_a): one layer's attention side for a micro-batch of b_a sequences, one attention node."""
        c, hw = self.c, self.ha
        ctx = c.context(self.w.context_len)
        ar = _allreduce(tp_a, c.activation_bytes, hw)
        slope = (ctx * c.kv_bytes_per_token_layer() / (self.kv_divisor(tp_a) * hw.kv_gbps * 1e9)
                 + c.attn_flops_per_token / (tp_a * hw.attn_tflops * 1e12) + ar.slope)
        intercept = hw.attn_overhead_us * 1e-6 + c.attn_bytes_per_layer / (tp_a * hw.weight_gbps * 1e9) + ar.intercept
        return Line(slope, intercept)

    def expert_line(self, tp_e: int, n_e: int) -> Line:
        """T_e(b_e) of one MoE layer: b_e (token, expert) pairs on one expert node holding E / n_e experts
        (all assumed touched: weights dominate small batches)."""
        c, hw = self.c, self.he
        ar = _allreduce(tp_e, c.activation_bytes, hw)
        slope = (c.expert_flops_per_pair / (tp_e * hw.expert_tflops * 1e12)
                 + 2 * c.activation_bytes / (hw.weight_gbps * 1e9) + ar.slope)
        intercept = (hw.expert_overhead_us * 1e-6
                     + (c.num_experts / n_e) * c.expert_bytes / (tp_e * hw.weight_gbps * 1e9) + ar.intercept)
        return Line(slope, intercept)

    def head_line(self, tp_a: int) -> Line:
        """T_h(b_a): the LM head of one micro-batch, vocabulary-parallel over tp_a, once per iteration."""
        c, hw = self.c, self.ha
        return Line(c.lm_head_flops_per_token / (tp_a * hw.attn_tflops * 1e12),
                    c.lm_head_bytes / (tp_a * hw.weight_gbps * 1e9))

    def step_time(self, global_batch):
        """The driver's host work per iteration for B sequences (scheduling, planning, the step header,
        sampling): serial with the GPUs, once per iteration."""
        hw = self.ha
        return (hw.step_overhead_us + hw.step_overhead_per_seq_us * np.asarray(global_batch, dtype=np.float64)) * 1e-6

    def link_gbps(self, unit_gpus):
        """One-direction GB/s per GPU between attention and expert nodes: the intra-host link when the unit
        (n_a tp_a + n_e tp_e GPUs, one GPU type) fits one host, else the network (the slower side's NIC)."""
        ha, he = self.ha, self.he
        intra = (ha == he) & (np.asarray(unit_gpus) <= ha.gpus_per_host)
        return np.where(intra, ha.intra_host_gbps, min(ha.inter_host_gbps, he.inter_host_gbps))

    def exchange_time(self, hw: HardwareProfile, b_a):
        """T_x(b_a): the runtime's work around one MoE exchange of a micro-batch of b_a tokens that no kernel fit
        times (router, packing, unpacking, combining, launch gaps), from the profile's null deployments."""
        return (hw.exchange_overhead_us + hw.exchange_overhead_per_token_us * np.asarray(b_a, dtype=np.float64)) * 1e-6

    def times(self, tp_a: int, tp_e: int, n_a, n_e: int, b_a):
        """Per-layer averages (T_a, T_e, T_c) and T_h in seconds, broadcast over arrays n_a and b_a. T_x is
        split evenly between T_a and T_e: its kernels run on both sides (which side carries how much is not
        measured yet; docs/plan.md shows how much the split moves the predictions)."""
        c = self.c
        n_a = np.asarray(n_a, dtype=np.float64)
        b_a = np.asarray(b_a, dtype=np.float64)
        t_a = self.attention_line(tp_a)(b_a) + 0.5 * self.exchange_time(self.ha, b_a) * self.moe_fraction
        t_e = (self.expert_line(tp_e, n_e)(b_a * n_a * c.top_k / n_e) + 0.5 * self.exchange_time(self.he, b_a)) \
            * self.moe_fraction
        bw = self.link_gbps(n_a * tp_a + n_e * tp_e) * 1e9
        lat = max(self.ha.link_latency_us, self.he.link_latency_us) * 1e-6
        per_row = c.top_k * c.activation_bytes / bw * np.maximum(1.0 / tp_a, n_a / n_e)
        t_c = (lat + b_a * per_row) * self.moe_fraction
        return t_a, t_e, t_c, self.head_line(tp_a)(b_a)

    def memory(self, tp_a: int, tp_e: int, n_e: int, m, b_a):
        """Bytes per GPU: (attention GPU: weights / tp_a + KV of m * b_a sequences, expert GPU: its experts)."""
        c = self.c
        attn = c.attention_weight_bytes() / tp_a + \
            np.asarray(m * b_a, dtype=np.float64) * c.kv_bytes_per_sequence(self.w.reserved_len) / self.kv_divisor(tp_a)
        expert = c.num_moe_layers * (c.num_experts / n_e) * c.expert_bytes / tp_e
        return attn, expert


def iteration_time(t_a, t_e, t_c, t_h, m, num_layers: int, t_step=0.0, async_scheduling: bool = False):
    """Seconds of one decode iteration (every sequence gets one token): see the module docstring. `t_step`:
    the driver's host work per iteration (PerfModel.step_time), serial with the GPUs' work, or overlapping it
    with `async_scheduling` (then the slower of the two sets the pace)."""
    t_f = np.maximum(t_a, t_e)
    r = t_a + t_e + 2 * t_c
    period = np.maximum(m * t_f, r)
    device = (num_layers - 1) * period + (m - 1) * t_f + r + m * t_h
    return np.maximum(device, t_step) if async_scheduling else device + t_step


@dataclass(frozen=True)
class Prediction:
    deployment: Deployment
    t_a: float  # seconds per layer per micro-batch
    t_e: float
    t_c: float
    t_h: float
    t_step: float  # seconds per iteration: the driver's host work (PerfModel.step_time)
    tpot: float  # seconds per output token of a sequence (one iteration)
    throughput: float  # tokens/s of the deployment
    per_gpu: float  # tokens/s per GPU
    per_dollar: float | None  # tokens per USD (None without prices)
    attn_mem_bytes: float  # per attention GPU
    expert_mem_bytes: float  # per expert GPU
    fits_memory: bool
    balance: float  # |T_a - T_e| / T_f
    comm_hidden: bool  # T_c < T_f
    min_micro_batches: float  # 2 (1 + T_c / T_f)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deployment"] = asdict(self.deployment)
        return d


def cost_per_hour(model: PerfModel, dep: Deployment) -> float | None:
    pa, pe = model.ha.price_per_hour, model.he.price_per_hour
    if pa is None or pe is None:
        return None
    return dep.n_a * dep.tp_a * pa + dep.n_e * dep.tp_e * pe


def predict(model: PerfModel, dep: Deployment) -> Prediction:
    """The model's figures for one given deployment (no constraint is enforced; they are reported)."""
    c = model.c
    if c.num_experts % dep.n_e:
        raise ConfigError(f"{dep.n_e} expert nodes cannot split {c.num_experts} experts evenly; use a divisor of "
                          f"{c.num_experts}")
    t_a, t_e, t_c, t_h = (float(x) for x in model.times(dep.tp_a, dep.tp_e, dep.n_a, dep.n_e, dep.b_a))
    t_step = float(model.step_time(dep.global_batch))
    tpot = float(iteration_time(t_a, t_e, t_c, t_h, dep.m, c.num_layers, t_step, model.async_scheduling))
    thr = dep.global_batch / tpot
    attn_mem, exp_mem = (float(x) for x in model.memory(dep.tp_a, dep.tp_e, dep.n_e, dep.m, dep.b_a))
    cost = cost_per_hour(model, dep)
    t_f = max(t_a, t_e)
    return Prediction(
        deployment=dep, t_a=t_a, t_e=t_e, t_c=t_c, t_h=t_h, t_step=t_step, tpot=tpot, throughput=thr,
        per_gpu=thr / dep.gpus,
        per_dollar=None if cost is None else thr * 3600 / cost, attn_mem_bytes=attn_mem, expert_mem_bytes=exp_mem,
        fits_memory=attn_mem <= model.ha.usable_bytes and exp_mem <= model.he.usable_bytes,
        balance=abs(t_a - t_e) / t_f, comm_hidden=t_c < t_f, min_micro_batches=2 * (1 + t_c / t_f))
