"""The deployment-plan performance model and search (expertyard.plan) against independent computations:
published parameter counts, a discrete-event simulation of the ping-pong pipeline, hand-written float
formulas, and brute-force enumeration of small deployment spaces."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertyard.errors import ConfigError
from expertyard.plan.model_costs import model_costs
from expertyard.plan.model_specs import model_config_for
from expertyard.plan.colocated import best_colocated, predict_colocated
from expertyard.plan.perf_model import Deployment, PerfModel, Workload, iteration_time, predict
from expertyard.plan.profiles import BUILTIN, load_profile
from expertyard.plan.search import TP_SIZES, Constraints, best_plan, search

H200 = BUILTIN["h200"]


@pytest.mark.parametrize("name, published_b", [("mixtral-8x7b", 46.7), ("mixtral-8x22b", 141), ("dbrx", 132),
                                               ("scaled-moe-317b", 317), ("deepseek-v2-lite", 15.7),
                                               ("olmoe-1b-7b", 6.9), ("qwen3-30b-a3b", 30.5)])
def test_parameter_counts_match_published_sizes(name, published_b):
    assert model_costs(model_config_for(name)).total_params() / 1e9 == pytest.approx(published_b, rel=0.01)


def test_mixtral_costs_by_hand():
    c = model_costs(model_config_for("mixtral-8x7b"))
    d, h, g, dh, e, i = 4096, 32, 8, 128, 8, 14336
    assert c.attn_params_per_layer == d * (h * dh + 2 * g * dh) + h * dh * d + 2 * d + e * d  # + norms, router
    assert c.kv_elems_per_token == 2 * g * dh and c.expert_params == 3 * d * i and c.kv_shards == g


def simulate_pingpong(t_a, t_e, t_c, m, layers):
    """Discrete-event ping-pong: one attention server, one expert server, micro-batches in turn, messages
    delayed by t_c. Returns when the last micro-batch leaves the last layer."""
    ready, a_free, e_free = [0.0] * m, 0.0, 0.0
    for _ in range(layers):
        arrive = []
        for j in range(m):
            a_free = max(a_free, ready[j]) + t_a
            arrive.append(a_free + t_c)
        for j in range(m):
            e_free = max(e_free, arrive[j]) + t_e
            ready[j] = e_free + t_c
    return max(ready)


times = st.floats(1e-5, 1e-2)


@given(times, times, st.floats(0, 1e-2), st.integers(1, 8), st.integers(1, 64))
def test_iteration_time_equals_pingpong_simulation(t_a, t_e, t_c, m, layers):
    got = float(iteration_time(t_a, t_e, t_c, 0.0, m, layers))
    assert got == pytest.approx(simulate_pingpong(t_a, t_e, t_c, m, layers), rel=1e-9)
    t_f = max(t_a, t_e)
    if m >= 2 * (1 + t_c / t_f):  # the paper's closed form
        assert got == pytest.approx((t_a + t_e + 2 * t_c) + t_f * (m * layers - 1), rel=1e-9)


def simulate_host_and_device(t_step: float, device: float, iterations: int, async_scheduling: bool) -> float:
    """Mean seconds per iteration of a host that prepares each iteration in t_step and a device that runs it in
    `device`. Synchronous: the host prepares k+1 after the device has finished k. Async: it prepares k+1 while
    the device runs k, and never runs more than one iteration ahead (the engine's one step in flight)."""
    host_done, device_done = 0.0, 0.0
    for _ in range(iterations):
        start_prep = host_done if async_scheduling else max(host_done, device_done)
        if async_scheduling:  # the host may not prepare k+1 before the device has started k
            start_prep = max(start_prep, device_done - device)
        host_done = start_prep + t_step
        device_done = max(device_done, host_done) + device
    return device_done / iterations


@given(times, times, times, st.integers(1, 8), st.integers(1, 16), st.floats(0, 5e-2))
def test_iteration_time_with_the_step_term_equals_a_host_device_simulation(t_a, t_e, t_c, m, layers, t_step):
    device = float(iteration_time(t_a, t_e, t_c, 0.0, m, layers))
    n = 2000  # the simulation's start-up (one host preparation) fades from its mean
    for a in (False, True):
        got = float(iteration_time(t_a, t_e, t_c, 0.0, m, layers, t_step, a))
        assert got == pytest.approx(simulate_host_and_device(t_step, device, n, a), rel=2e-3, abs=1e-9)


profiles = st.builds(
    lambda w, kv, fa, fe, oa, oe, link, lat, s0, s1: replace(
        H200, weight_gbps=w, kv_gbps=kv, attn_tflops=fa, expert_tflops=fe, attn_overhead_us=oa, expert_overhead_us=oe,
        intra_host_gbps=link, inter_host_gbps=link / 8, link_latency_us=lat, step_overhead_us=s0,
        step_overhead_per_seq_us=s1),
    st.floats(500, 5000), st.floats(200, 3000), st.floats(50, 900), st.floats(50, 900), st.floats(0, 100),
    st.floats(0, 100), st.floats(20, 500), st.floats(1, 50), st.sampled_from([0.0, 3000.0]), st.floats(0, 2))


@settings(max_examples=30, deadline=None)
@given(profiles, st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 4, 8]), st.integers(1, 16),
       st.sampled_from([1, 2, 4, 8]), st.integers(1, 300))
def test_times_against_hand_written_formulas(hw, tp_a, tp_e, n_a, n_e, b_a):
    """T_a, T_e, T_c of Mixtral-8x7B from the docstring formulas, written out in floats."""
    d, h, g, dh, e, k, i, layers, ctx, s = 4096, 32, 8, 128, 8, 2, 14336, 32, 2048, 2
    attn_params = d * (h * dh + 2 * g * dh) + h * dh * d + 2 * d + e * d
    ar = lambda tp, rows: 0.0 if tp == 1 else hw.link_latency_us * 1e-6 + 2 * (tp - 1) / tp * rows * d * s / (  # noqa
        hw.intra_host_gbps * 1e9)
    t_a = (hw.attn_overhead_us * 1e-6 + attn_params * s / (tp_a * hw.weight_gbps * 1e9)
           + b_a * ctx * 2 * g * dh * s / (min(tp_a, g) * hw.kv_gbps * 1e9)
           + b_a * 2 * attn_params / (tp_a * hw.attn_tflops * 1e12) + ar(tp_a, b_a))
    b_e = b_a * n_a * k / n_e
    t_e = (hw.expert_overhead_us * 1e-6 + (e / n_e) * 3 * d * i * s / (tp_e * hw.weight_gbps * 1e9)
           + b_e * (6 * d * i / (tp_e * hw.expert_tflops * 1e12) + 2 * d * s / (hw.weight_gbps * 1e9)) + ar(tp_e, b_e))
    same_host = n_a * tp_a + n_e * tp_e <= 8
    bw = (hw.intra_host_gbps if same_host else hw.inter_host_gbps) * 1e9
    t_c = hw.link_latency_us * 1e-6 + max(b_a * k * d * s / tp_a, b_e * d * s) / bw
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), hw, hw, Workload(ctx))
    got = pm.times(tp_a, tp_e, n_a, n_e, b_a)
    assert [float(x) for x in got[:3]] == pytest.approx([t_a, t_e, t_c], rel=1e-9)
    t_h = 32000 * d * s / (tp_a * hw.weight_gbps * 1e9) + b_a * 2 * 32000 * d / (tp_a * hw.attn_tflops * 1e12)
    assert float(got[3]) == pytest.approx(t_h, rel=1e-9)


def check_constraints(pm: PerfModel, plan, cons: Constraints, num_gpus: int):
    """Every constraint of the paper, from the prediction's own numbers."""
    q, d = plan.prediction, plan.prediction.deployment
    t_f = max(q.t_a, q.t_e)
    assert abs(q.t_a - q.t_e) <= cons.balance_tolerance * t_f * (1 + 1e-12)
    assert q.t_c < t_f and d.m >= 2 * (1 + q.t_c / t_f) * (1 - 1e-12)
    assert q.attn_mem_bytes <= pm.ha.usable_bytes and q.expert_mem_bytes <= pm.he.usable_bytes
    assert cons.slo_tpot_s is None or q.tpot <= cons.slo_tpot_s * (1 + 1e-12)
    assert plan.gpus_used <= num_gpus and plan.replicas == num_gpus // d.gpus
    assert pm.c.num_experts % d.n_e == 0 and d.tp_a <= 8 and d.tp_e <= 8
    # the paper's formula, plus the driver's host work per iteration
    assert q.t_step == pytest.approx((pm.ha.step_overhead_us + pm.ha.step_overhead_per_seq_us * d.global_batch) * 1e-6)
    tpot = (q.t_a + q.t_e + 2 * q.t_c) + t_f * (d.m * pm.c.num_layers - 1) + d.m * q.t_h + q.t_step
    assert q.tpot == pytest.approx(tpot, rel=1e-9)
    assert q.throughput == pytest.approx(d.n_a * d.m * d.b_a / tpot, rel=1e-9)


@settings(max_examples=15, deadline=None)
@given(profiles, st.integers(2, 24), st.sampled_from([None, 0.05, 0.2]), st.floats(0.05, 0.5))
def test_chosen_plans_satisfy_every_constraint(hw, num_gpus, slo, tol):
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), hw, hw, Workload(1024))
    cons = Constraints(slo_tpot_s=slo, balance_tolerance=tol, max_micro_batches=5)
    for plan in search(pm, num_gpus, cons):
        check_constraints(pm, plan, cons, num_gpus)
        d = plan.prediction.deployment  # the batch is the largest the constraints allow
        bigger = predict(pm, replace(d, b_a=d.b_a + 1))
        t_f = max(bigger.t_a, bigger.t_e)
        assert not (bigger.fits_memory and bigger.balance <= tol and bigger.t_c < t_f
                    and d.m >= 2 * (1 + bigger.t_c / t_f) and (slo is None or bigger.tpot <= slo))


def brute_force_best(pm: PerfModel, num_gpus: int, cons: Constraints, max_b: int) -> float:
    best = 0.0
    e = pm.c.num_experts
    for tp_a, tp_e in itertools.product(TP_SIZES, TP_SIZES):
        for n_e in (n for n in range(1, e + 1) if e % n == 0):
            for n_a in range(1, (num_gpus - n_e * tp_e) // tp_a + 1):
                for m in range(2, cons.max_micro_batches + 1):
                    for b in range(1, max_b + 1):
                        q = predict(pm, Deployment(tp_a, tp_e, n_a, n_e, m, b))
                        t_f = max(q.t_a, q.t_e)
                        ok = (q.fits_memory and abs(q.t_a - q.t_e) <= cons.balance_tolerance * t_f and q.t_c < t_f
                              and m * t_f >= 2 * (t_f + q.t_c)
                              and (cons.slo_tpot_s is None or q.tpot <= cons.slo_tpot_s))
                        if ok:
                            best = max(best, (num_gpus // q.deployment.gpus) * q.throughput)
    return best


@pytest.mark.parametrize("num_gpus, slo, hw", [
    (5, None, H200), (6, 0.08, H200), (6, None, BUILTIN["l40s"]),
    (6, 0.08, replace(H200, step_overhead_us=3000.0, step_overhead_per_seq_us=50.0)),  # the SLO binds the batch
])
def test_search_agrees_with_brute_force(num_gpus, slo, hw):
    # a long context keeps the batch small (KV memory), so every b_a can be enumerated: at most what the KV
    # cache of m >= 2 micro-batches leaves room for on an attention node of 8 GPUs (KV split over 8 heads)
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), hw, hw, Workload(65536))
    max_b = int(8 * hw.usable_bytes // (2 * pm.c.kv_bytes_per_sequence(65536))) + 1
    assert max_b <= 60
    cons = Constraints(slo_tpot_s=slo, balance_tolerance=0.3, max_micro_batches=3)
    expected = brute_force_best(pm, num_gpus, cons, max_b)
    plans = search(pm, num_gpus, cons)
    assert expected > 0 and plans
    assert plans[0].total_throughput == pytest.approx(expected, rel=1e-12)


@settings(max_examples=5, deadline=None)
@given(profiles)
def test_more_gpus_never_lower_the_best_throughput(hw):
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), hw, hw, Workload(2048))
    cons = Constraints(balance_tolerance=0.3, max_micro_batches=4)
    last = 0.0
    for n in range(2, 33):
        plans = search(pm, n, cons)
        best = plans[0].total_throughput if plans else 0.0
        assert best >= last * (1 - 1e-12)
        last = best


def test_heterogeneous_plan_uses_both_profiles_and_network():
    pm = PerfModel(model_costs(model_config_for("mixtral-8x22b")), BUILTIN["h20"], BUILTIN["l40s"], Workload(2048))
    plan = best_plan(pm, 64, Constraints(objective="per-cost"))
    check_constraints(pm, plan, Constraints(objective="per-cost"), 64)
    d = plan.prediction.deployment
    assert plan.prediction.per_dollar == pytest.approx(
        plan.prediction.throughput * 3600 / (d.n_a * d.tp_a * 1.3 + d.n_e * d.tp_e * 1.0))
    assert float(pm.link_gbps(2)) == 25  # different GPU types never share a host: the slower NIC


def test_clear_errors():
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), H200, H200)
    with pytest.raises(ConfigError, match="--gpus 1: .*at least 2 GPUs"):
        search(pm, 1)
    with pytest.raises(ConfigError, match=r"--slo-tpot 1 ms is impossible for mixtral-8x7b on 16 GPUs.*needs \d"):
        best_plan(pm, 16, Constraints(slo_tpot_s=1e-3), "mixtral-8x7b")
    big = PerfModel(model_costs(model_config_for("scaled-moe-317b")), BUILTIN["l40s"], BUILTIN["l40s"])
    with pytest.raises(ConfigError, match="scaled-moe-317b does not fit in 4 GPUs.*use more --gpus"):
        best_plan(big, 4, Constraints(), "scaled-moe-317b")
    with pytest.raises(ConfigError, match="unknown GPU profile 'b200'.*h200, h100, a100, l40s, h20"):
        load_profile("b200")
    with pytest.raises(ConfigError, match="3 expert nodes cannot split 8 experts"):
        predict(pm, Deployment(1, 1, 1, 3, 3, 8))
    with pytest.raises(ConfigError, match="b_a=0 must be >= 1"):
        Deployment(1, 1, 1, 1, 3, 0)
    with pytest.raises(ConfigError, match="weight_gbps=-1"):
        replace(H200, weight_gbps=-1)


def test_builtin_profiles_state_their_sources(tmp_path):
    for name in ("h200", "h100", "a100", "l40s", "h20"):
        p = BUILTIN[name]
        assert p.kind == "datasheet" and "datasheet" in p.sources["memory_gb, hbm_gbps, peak_tflops"]
        assert "assumed" in p.sources["weight_gbps, kv_gbps, attn_tflops, expert_tflops"]
        path = tmp_path / f"{name}.json"
        path.write_text(p.to_json())
        assert load_profile(path) == p
    assert math.isclose(BUILTIN["h200"].weight_gbps, 0.75 * 4800)


def test_each_plan_has_the_best_n_a_of_its_group_with_the_step_overhead():
    """search keeps, per (tp_a, tp_e, n_e, m), the n_a of highest predicted throughput: with the driver's host
    work per iteration in the prediction, the choice among n_a must count it too."""
    from expertyard.plan.search import _best_b

    hw = replace(H200, step_overhead_us=20000.0, step_overhead_per_seq_us=5.0)
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), hw, hw, Workload(2048))
    cons = Constraints(balance_tolerance=0.5, max_micro_batches=3)
    for plan in search(pm, 16, cons):
        d = plan.prediction.deployment
        n_a = np.arange(1, (16 - d.n_e * d.tp_e) // d.tp_a + 1)
        b = _best_b(pm, d.tp_a, d.tp_e, n_a, d.n_e, d.m, cons)
        best = max((16 // (n * d.tp_a + d.n_e * d.tp_e)) * predict(pm, replace(d, n_a=int(n), b_a=int(bb))).throughput
                   for n, bb in zip(n_a, b) if bb > 0)
        assert plan.total_throughput == pytest.approx(best, rel=1e-9)


def test_exchange_term_goes_half_to_each_side_of_every_moe_layer():
    """T_x(b) = x0 + x1 b per MoE layer and micro-batch: half in T_a, half in T_e (DeepSeek-V2-Lite: its first
    layer is dense, so the per-layer averages carry T_x times the MoE share)."""
    c = model_costs(model_config_for("deepseek-v2-lite"))
    base = load_profile("h200")
    hw = replace(base, exchange_overhead_us=200.0, exchange_overhead_per_token_us=1.5)
    bare, with_x = PerfModel(c, base, base), PerfModel(c, hw, hw)
    share = c.num_moe_layers / c.num_layers
    assert share < 1
    for b in (1, 64, 512):
        t0, t1 = (np.array(pm.times(1, 1, 2, 4, b)) for pm in (bare, with_x))
        half = 0.5 * (200.0 + 1.5 * b) * 1e-6 * share
        assert t1 - t0 == pytest.approx([half, half, 0.0, 0.0], abs=1e-15)
    dep = Deployment(1, 1, 2, 4, 1, 32)  # m = 1: every layer pays T_a + T_e, so the iteration pays all of T_x
    grown = predict(with_x, dep).tpot - predict(bare, dep).tpot
    assert grown == pytest.approx(c.num_moe_layers * (200.0 + 1.5 * 32) * 1e-6, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(profiles, st.sampled_from([1, 2, 4, 8]), st.integers(1, 600), st.sampled_from([8, 32]), st.booleans(),
       st.floats(0, 500), st.floats(0, 2))
def test_colocated_against_hand_written_formulas(hw, unit, b, layers, async_scheduling, x0, x1):
    """Colocated EP (plan/colocated.py) for Mixtral-8x7B written out in floats: per layer attention for b
    sequences, E/unit experts with b K pairs, two all-to-alls of the rows that leave the GPU, all serial."""
    hw = replace(hw, exchange_overhead_us=x0, exchange_overhead_per_token_us=x1)
    d, h, g, dh, e, k, i, ctx, s = 4096, 32, 8, 128, 8, 2, 14336, 2048, 2
    attn_params = d * (h * dh + 2 * g * dh) + h * dh * d + 2 * d + e * d
    x = (hw.exchange_overhead_us + hw.exchange_overhead_per_token_us * b) * 1e-6  # T_x, half on each side
    t_a = (hw.attn_overhead_us * 1e-6 + attn_params * s / (hw.weight_gbps * 1e9)
           + b * ctx * 2 * g * dh * s / (hw.kv_gbps * 1e9) + b * 2 * attn_params / (hw.attn_tflops * 1e12) + x / 2)
    t_e = (hw.expert_overhead_us * 1e-6 + (e / unit) * 3 * d * i * s / (hw.weight_gbps * 1e9)
           + b * k * (6 * d * i / (hw.expert_tflops * 1e12) + 2 * d * s / (hw.weight_gbps * 1e9)) + x / 2)
    t_c = hw.link_latency_us * 1e-6 + b * k * d * s * (unit - 1) / unit / (hw.intra_host_gbps * 1e9)
    t_h = 32000 * d * s / (hw.weight_gbps * 1e9) + b * 2 * 32000 * d / (hw.attn_tflops * 1e12)
    t_step = (hw.step_overhead_us + hw.step_overhead_per_seq_us * b * unit) * 1e-6
    device = layers * (t_a + t_e + 2 * t_c) + t_h
    tpot = max(device, t_step) if async_scheduling else device + t_step
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b", num_layers=layers)), hw, hw, Workload(ctx),
                   async_scheduling)
    q = predict_colocated(pm, unit, b * unit)
    assert [q.t_a, q.t_e, q.t_c, q.t_h, q.tpot] == pytest.approx([t_a, t_e, t_c, t_h, tpot], rel=1e-9)
    assert q.per_gpu == pytest.approx(b / tpot, rel=1e-9)
    # the same times through the disaggregated formula at m = 1: one serial round trip per layer
    assert q.tpot == pytest.approx(float(iteration_time(q.t_a, q.t_e, q.t_c, q.t_h, 1, layers, t_step,
                                                        async_scheduling)), rel=1e-9)


@pytest.mark.parametrize("slo_ms", [None, 60.0, 200.0])
@pytest.mark.parametrize("num_gpus", [1, 4, 6, 16])
def test_best_colocated_is_the_best_unit_and_batch_by_brute_force(num_gpus, slo_ms):
    """Every unit (a divisor of E up to N) at every per-GPU batch up to the memory bound: the best feasible total
    throughput is what best_colocated returns."""
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), H200, H200, Workload(1024))
    best_total, best_key = 0.0, None
    for unit in (1, 2, 4, 8):
        if unit > num_gpus:
            continue
        for b in range(1, 3000):
            q = predict_colocated(pm, unit, b * unit, num_gpus)
            if not q.fits_memory or (slo_ms is not None and q.tpot > slo_ms * 1e-3):
                continue
            if q.total_throughput > best_total:
                best_total, best_key = q.total_throughput, (unit, b * unit)
    got = best_colocated(pm, num_gpus, None if slo_ms is None else slo_ms * 1e-3, max_batch_per_gpu=2999)
    if best_key is None:
        assert got is None
    else:
        assert (got.unit, got.batch) == best_key and got.total_throughput == pytest.approx(best_total)
        assert got.replicas == num_gpus // got.unit
