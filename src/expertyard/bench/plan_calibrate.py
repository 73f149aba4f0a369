"""`plan calibrate`: time the project's own kernels on one layer of a model and fit the paper's lines.

  T_a(b)  = k1 * b + k2   `DecoderLayer.attention_step` + post-attention norm + router, decode of b sequences
                          against a KV cache of S tokens each, at two cache lengths (S and S/4)
  T_e(p)  = k3 * p + k4   `kernels.fused_moe.fused_moe` over p (token, expert) rows spread evenly over E experts,
                          at two expert counts (E and E/2)
  T_c(n)  = c1 * n + c0   NCCL send/recv of n bytes between two GPUs (plan_comm.py), when two are visible
  T_step(B) = s1 * B + s0 the driver's host work per decode iteration: 2 TPOT(L1) - TPOT(L2) - T_h of two null
                          deployments of the real runtime (plan_step.py), when two GPUs are visible or asked on CPU
  T_x(b)  = x1 * b + x0   the rest of one MoE layer in those deployments: TPOT(L2) - TPOT(L1) - (T_a + T_e + 2 T_c)
                          of the fits above at the same b (router, packing, unpacking, combining, launch gaps)

Fits are float64 least squares. From them the profile's effective figures, which carry over to any model
shape, are solved (W = weight bytes of the timed layer, kv = KV bytes per token per layer, P = parameters):
  weight_gbps = (E - E/2) W_expert / (k4(E) - k4(E/2))       expert_overhead = k4(E) - E W_expert / weight_gbps
  expert_tflops = 2 P_expert / (k3 - 2 D s / weight_gbps)
  kv_gbps = kv / beta,  attn_tflops = 2 P_attn / alpha      where k1(S) = alpha + beta * S
  attn_overhead = mean k2 - W_attn / weight_gbps
Values the noise makes non-physical (a negative difference) fall back to the base profile; `sources` says
which. On one GPU, or on a CPU, the link figures are the base profile's (named in `sources`). The step term's
null deployments run first (fail fast, before the parent holds GPU memory) and are solved last: T_step subtracts
the LM head T_h(B) that the solved profile predicts, because the performance model adds T_h on its own.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import replace
from typing import Callable

import torch

from expertyard.bench.plan_comm import measure_send_recv
from expertyard.bench.plan_step import measure_null_tpots
from expertyard.config import ModelConfig
from expertyard.kernels.fused_moe import fused_moe
from expertyard.layers.attention_metadata import AttentionMetadata
from expertyard.layers.moe import SparseMoeBlock
from expertyard.layers.rotary import RotaryEmbedding, rope_parameters
from expertyard.models.base import DecoderLayer
from expertyard.plan.fit import exchange_residuals, fit_line, fit_step, solve_step
from expertyard.plan.model_costs import model_costs
from expertyard.plan.perf_model import PerfModel, Workload
from expertyard.plan.profiles import HardwareProfile

GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GPU_PAIRS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CPU_BATCHES = (4, 8, 16, 32, 64)  # CPU: large enough that the per-row work shows above call overheads
CPU_PAIRS = (64, 128, 256, 512, 1024)


def time_calls(fns: list[Callable[[], object]], device: torch.device, repeats: int, graphs: bool) -> list[float]:
    """Seconds per call of each function. CUDA: events around `repeats` calls (replays of a captured CUDA graph
    when `graphs`, as the engine decodes). Other devices (the CPU path exists for tests): one torch thread, the
    CPU time of the calling thread (time the OS gives other processes does not count), `repeats` rounds that call
    every function once, the fastest call of each."""
    if device.type != "cuda":
        best = [float("inf")] * len(fns)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # ops run in this thread, so its CPU time is theirs
        try:
            for fn in fns:
                fn()
            for _ in range(repeats):
                for j, fn in enumerate(fns):
                    t0 = time.thread_time()
                    fn()
                    best[j] = min(best[j], time.thread_time() - t0)
        finally:
            torch.set_num_threads(threads)
        return best
    return [_time_cuda(fn, repeats, graphs) for fn in fns]


def _time_cuda(fn: Callable[[], object], repeats: int, graphs: bool) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graphs:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        except RuntimeError as e:  # not capturable: time it eagerly (launch overheads included)
            print(f"plan calibrate: CUDA-graph capture failed ({e}); timing eagerly", file=sys.stderr)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    run()
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _random_(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=gen)


def attention_points(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batches, context_len: int,
                     repeats: int, graphs: bool) -> tuple[list[tuple[int, float]], int]:
    """[(b, seconds)] of one layer's attention side decoding b sequences with `context_len` cached tokens each,
    and the parameter count of the timed layer."""
    index = cfg.moe_layers[0] if cfg.moe_layers else 0
    with torch.device("meta"):
        layer = DecoderLayer(cfg, index)
    layer = layer.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device).manual_seed(0)
    _random_(layer, gen)
    router = layer.mlp.gate if isinstance(layer.mlp, SparseMoeBlock) else None
    params = sum(p.numel() for n, p in layer.named_parameters() if n.startswith(("self_attn", "input_", "post_"))) + \
        (router.weight.numel() if router is not None else 0)
    with torch.device("cpu"):
        inv_freq, scaling = rope_parameters(cfg.hf_config)
    rope = RotaryEmbedding(inv_freq.to(device), scaling, cfg.attention.rope_style)
    b_max = max(batches)
    cache = [torch.randn(b_max, context_len, *shape, device=device, generator=gen).to(dtype)
             for shape in layer.self_attn.kv_cache_shapes()]
    steps = []
    for b in batches:
        slots = torch.arange(b, device=device)
        positions = torch.full((b,), context_len - 1, device=device)
        meta = AttentionMetadata(token_slots=slots, positions=positions, prefills=[], num_prefill_tokens=0,
                                 decode_slots=slots, decode_context_lens=torch.full((b,), context_len, device=device),
                                 decode_max_len=context_len)
        cos, sin = rope.cos_sin(positions)
        h = torch.randn(b, cfg.hidden_size, device=device, generator=gen).to(dtype)

        def step(h=h, meta=meta, cos=cos, sin=sin):
            out = layer.post_attention_layernorm(layer.attention_step(h, meta, cache, rope, cos, sin))
            return router(out) if router is not None else out

        steps.append(step)
    with torch.inference_mode():
        return list(zip(batches, time_calls(steps, device, repeats, graphs))), params


def expert_points(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, pairs, num_experts: int,
                  repeats: int, graphs: bool) -> list[tuple[int, float]]:
    """[(p, seconds)] of fused_moe over p rows, one (token, expert) pair each, spread evenly over the experts."""
    d, i = cfg.hidden_size, cfg.moe.intermediate_size
    gen = torch.Generator(device).manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * i, d, device=device, generator=gen) * 0.02).to(dtype)  # [E, 2I, D]
    w2 = (torch.randn(num_experts, d, i, device=device, generator=gen) * 0.02).to(dtype)  # [E, D, I]
    calls = []
    for p in pairs:
        x = torch.randn(p, d, device=device, generator=gen).to(dtype)  # [P, D]
        ids = (torch.arange(p, device=device) % num_experts).view(p, 1)  # [P, 1]
        w = torch.ones(p, 1, device=device)
        calls.append(lambda x=x, ids=ids, w=w: fused_moe(x, w13, w2, ids, w))
    with torch.inference_mode():
        return list(zip(pairs, time_calls(calls, device, repeats, graphs)))


def _fit_record(module: str, x_name: str, points, **extra) -> dict:
    xs, ys = zip(*points)
    line = fit_line(xs, ys)
    rel = [abs(line(x) - y) / (abs(y) or 1e-12) for x, y in points]  # T_step points can be <= 0 (noise)
    return {"module": module, "x": x_name, **extra, "k_slope": line.slope, "k_intercept": line.intercept,
            "max_rel_err": max(rel), "points": [[int(x), float(y)] for x, y in points]}


def calibrate(cfg: ModelConfig, label: str, device: torch.device, dtype: torch.dtype, base: HardwareProfile,
              name: str | None = None, context_len: int | None = None, batches=None, pairs=None,
              repeats: int | None = None, graphs: bool = True, comm: bool = True, step: bool | None = None,
              step_batches=None) -> HardwareProfile:
    """Measure, fit and solve a calibrated profile (see the module docstring); `base` supplies what is not
    measured (datasheet peaks, the network, prices). `step`: measure T_step (None: on CUDA when two GPUs are
    visible, not on CPU, where it costs two launches of two processes)."""
    on_gpu = device.type == "cuda"
    null, step_reason = _null_deployments(cfg, label, device, dtype, step, step_batches)
    graphs = graphs and on_gpu
    context_len = context_len or (2048 if on_gpu else 128)
    batches = tuple(batches or (GPU_BATCHES if on_gpu else CPU_BATCHES))
    pairs = tuple(pairs or (GPU_PAIRS if on_gpu else CPU_PAIRS))
    repeats = repeats or (20 if on_gpu else 7)
    elt = torch.empty((), dtype=dtype).element_size()
    c = model_costs(cfg, elt)
    sources = {"calibration": f"expertyard plan calibrate: one layer of {label}, {dtype}, on {_device_name(device)}"
                              f"{', CUDA graphs' if graphs else ''}; effective figures solved from the fits"}
    fits = []

    e1 = c.num_experts
    e2 = max(1, e1 // 2)
    exp1 = expert_points(cfg, device, dtype, pairs, e1, repeats, graphs)
    fits.append(_fit_record("experts", "(token, expert) rows on one expert node (b_e)", exp1, experts=e1))
    f1 = fit_line(*zip(*exp1))
    w_e, act = c.expert_bytes, c.activation_bytes
    if e2 < e1:
        exp2 = expert_points(cfg, device, dtype, pairs, e2, repeats, graphs)
        fits.append(_fit_record("experts", "(token, expert) rows on one expert node (b_e)", exp2, experts=e2))
        di = f1.intercept - fit_line(*zip(*exp2)).intercept
    else:
        di = -1.0
    if di > 0:
        weight_bps = (e1 - e2) * w_e / di
        expert_overhead = max(0.0, f1.intercept - e1 * w_e / weight_bps)
    else:  # one expert, or noise: the whole intercept is weight streaming
        weight_bps, expert_overhead = e1 * w_e / f1.intercept, 0.0
        sources["expert_overhead_us"] = "set to 0: the two expert counts did not separate overhead from bandwidth"
    compute = f1.slope - 2 * act / weight_bps
    expert_tflops = c.expert_flops_per_pair / compute / 1e12 if compute > 0 else base.expert_tflops
    if compute <= 0:
        sources["expert_tflops"] = f"base profile {base.name}: the expert slope was too small to solve"
    expert_tflops = _at_most_peak(expert_tflops, base, "expert_tflops", sources)

    s1, s2 = context_len, max(1, context_len // 4)
    att1, attn_params = attention_points(cfg, device, dtype, batches, s1, repeats, graphs)
    att2, _ = attention_points(cfg, device, dtype, batches, s2, repeats, graphs)
    fits.append(_fit_record("attention", "sequences per micro-batch (b_a)", att1, context_len=s1))
    fits.append(_fit_record("attention", "sequences per micro-batch (b_a)", att2, context_len=s2))
    g1, g2 = fit_line(*zip(*att1)), fit_line(*zip(*att2))
    kv_tok = c.kv_bytes_per_token_layer()
    beta = (g1.slope - g2.slope) / (s1 - s2) if s1 != s2 else -1.0
    kv_gbps = kv_tok / beta / 1e9 if beta > 0 else base.kv_gbps
    if beta <= 0:
        sources["kv_gbps"] = f"base profile {base.name}: the two cache lengths did not separate KV reads"
    alpha = g1.slope - s1 * kv_tok / (kv_gbps * 1e9)
    attn_tflops = 2.0 * attn_params / alpha / 1e12 if alpha > 0 else base.attn_tflops
    if alpha <= 0:
        sources["attn_tflops"] = f"base profile {base.name}: the per-token projection time was too small to solve"
    attn_tflops = _at_most_peak(attn_tflops, base, "attn_tflops", sources)
    attn_overhead = max(0.0, (g1.intercept + g2.intercept) / 2 - attn_params * elt / weight_bps)

    link = {}
    samples = _comm_points() if comm and on_gpu else None
    if samples:
        fits.append(_fit_record("comm", "message bytes (NCCL send/recv, cuda:0 -> cuda:1)", samples))
        cl = fit_line(*zip(*samples))
        if cl.slope > 0:
            link = {"intra_host_gbps": 1 / cl.slope / 1e9, "link_latency_us": max(0.0, cl.intercept * 1e6)}
    if not link:
        sources["intra_host_gbps, link_latency_us"] = (
            f"base profile {base.name} ({'no second GPU visible' if on_gpu else 'CPU run'}): not measured")
    sources["inter_host_gbps, hbm_gbps, peak_tflops, price_per_hour"] = f"base profile {base.name}: not measured"
    memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if on_gpu else base.memory_gb
    profile = replace(
        base, name=name or f"{base.name}-calibrated", gpu=_device_name(device), kind="calibrated",
        memory_gb=memory_gb, weight_gbps=weight_bps / 1e9, kv_gbps=kv_gbps, attn_tflops=attn_tflops,
        expert_tflops=expert_tflops, attn_overhead_us=attn_overhead * 1e6, expert_overhead_us=expert_overhead * 1e6,
        **link, sources=sources, fits=fits)
    return _with_step_term(profile, c, null, step_reason, base.name)


def _at_most_peak(tflops: float, base, key: str, sources: dict) -> float:
    """A solved throughput above the device's peak is noise in a small difference of slopes (the line's slope over
    a range that starts memory-bound): clamp it to the peak and say so in `sources`."""
    if tflops <= base.peak_tflops:
        return tflops
    sources[key] = (f"clamped to the peak {base.peak_tflops:g} TFLOPS of base profile {base.name}: "
                    f"{tflops:,.0f} TFLOPS was solved from a slope within the noise")
    return float(base.peak_tflops)


STEP_KEY = "step_overhead_us, step_overhead_per_seq_us"


def _null_deployments(cfg: ModelConfig, label: str, device: torch.device, dtype: torch.dtype, step: bool | None,
                      batches) -> tuple[dict | None, str]:
    """The two null deployments' TPOTs (plan_step.measure_null_tpots), or None and why they were not run."""
    on_gpu = device.type == "cuda"
    if step is False:
        return None, "--no-step-term"
    if not on_gpu and step is None:
        return None, "CPU run; --step-term measures it over gloo"
    if on_gpu and torch.cuda.device_count() < 2:
        return None, (f"the null deployments need 2 GPUs (1 attention + 1 expert rank), "
                      f"{torch.cuda.device_count()} visible")
    null = measure_null_tpots(cfg.hf_config, device.type, dtype, batches, name=label)
    where = (f"2 x {torch.cuda.get_device_name(0)} (cuda:0, cuda:1)" if on_gpu else
             f"CPU ({platform.processor() or platform.machine()}), 2 processes over gloo")
    return {**null, "where": where}, ""


def _with_step_term(profile: HardwareProfile, costs, null: dict | None, reason: str, base_name: str) -> HardwareProfile:
    """`profile` with T_step(B) solved from the null deployments minus the LM head `profile` predicts (at
    tp_a = 1, m = 1, as they ran), fitted, and recorded under `fits` and `sources`."""
    sources = dict(profile.sources)
    if null is None:
        sources[STEP_KEY] = (f"base profile {base_name} ({profile.step_overhead_us:g} us + "
                             f"{profile.step_overhead_per_seq_us:g} us per sequence): not measured ({reason})")
        sources[EXCHANGE_KEY] = (f"base profile {base_name} ({profile.exchange_overhead_us:g} us + "
                                 f"{profile.exchange_overhead_per_token_us:g} us per token): not measured, it comes "
                                 f"from the step term's null deployments ({reason})")
        return replace(profile, sources=sources)
    head = PerfModel(costs, profile, profile).head_line(1)
    points, layers = solve_step(null["tpots"], head)
    line, notes = fit_step(points)
    l1, l2 = null["layers"]
    record = _fit_record("step", "sequences in the decode step (B)", points, null_layers=[l1, l2],
                         null_tpots=[[int(b), t1, t2] for b, t1, t2 in null["tpots"]],
                         lm_head=[[int(b), float(head(b))] for b, _, _ in null["tpots"]],
                         layer=[[b, t] for b, t in layers], prompt_len=null["prompt_len"],
                         decode_tokens=null["decode_tokens"])
    how = (f"measured: null deployments of the runtime (1 attention + 1 expert rank, m = 1, {l1} and {l2} layers) "
           f"on {null['where']}, T_step(B) = 2 TPOT({l1}) - TPOT({l2}) - T_h(B), fitted over B = "
           f"{', '.join(str(b) for b, _ in points)}")
    sources[STEP_KEY] = "; ".join([how, *notes, *([null["note"]] if null["note"] else [])])
    profile = replace(profile, step_overhead_us=line.intercept * 1e6, step_overhead_per_seq_us=line.slope * 1e6,
                      sources=sources, fits=[*profile.fits, record])
    return with_exchange_term(profile, costs, null, layers)


EXCHANGE_KEY = "exchange_overhead_us, exchange_overhead_per_token_us"


def with_exchange_term(profile: HardwareProfile, costs, null: dict, layers) -> HardwareProfile:
    """`profile` with T_x(b): what one MoE layer of the null deployments took (T_layer = TPOT(L2) - TPOT(L1))
    beyond the kernel fits' T_a + T_e + 2 T_c at the same batch and cache length, fitted over b."""
    sources = dict(profile.sources)
    if null["note"]:  # the layer the second deployment adds is dense: no exchange in T_layer
        sources[EXCHANGE_KEY] = f"not measured: {null['note']}"
        return replace(profile, sources=sources)
    bare = replace(profile, exchange_overhead_us=0.0, exchange_overhead_per_token_us=0.0)
    context = null["prompt_len"] + null["decode_tokens"] // 2  # the mean cached length of the timed steps
    points = exchange_residuals(PerfModel(costs, bare, bare, Workload(context)), layers)
    line, notes = fit_step(points)
    record = _fit_record("exchange", "tokens of the micro-batch (b), one MoE layer", points,
                         layer=[[b, t] for b, t in layers], context_len=context)
    how = ("measured: T_layer(b) of the same null deployments minus the kernel fits' T_a + T_e + 2 T_c at b "
           f"sequences and {context} cached tokens, fitted over b = {', '.join(str(b) for b, _ in points)}")
    sources[EXCHANGE_KEY] = "; ".join([how, *notes])
    return replace(profile, exchange_overhead_us=line.intercept * 1e6,
                   exchange_overhead_per_token_us=line.slope * 1e6, sources=sources, fits=[*profile.fits, record])


def _comm_points():
    return measure_send_recv()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, 1 thread)"
