"""T_step, the driver's host work per decode iteration: the null-deployment arithmetic (plan/fit.py: solve_step,
fit_step), the null deployments on the real runtime over gloo, and `plan calibrate --step-term` on CPU."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_hf_config

from expertyard.bench.plan_step import cut, measure_null_tpots, null_layer_counts
from expertyard.entrypoints.cli import main
from expertyard.plan.fit import fit_step, solve_step
from expertyard.plan.model_costs import model_costs
from expertyard.plan.model_specs import model_config_for
from expertyard.plan.perf_model import Line, PerfModel, Workload
from expertyard.plan.profiles import load_profile

ARCHS = {"mixtral": "MixtralForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
BATCHES = (1, 16, 256, 1024)
STEP = Line(3e-6, 2.5e-3)  # the driver's host work: 2.5 ms + 3 us per sequence
LAYER = Line(1e-6, 0.4e-3)  # one MoE layer (attention + experts + two messages)
HEAD = Line(2e-7, 60e-6)  # the LM head as the performance model prices it


def _tiny(name: str):
    hf = tiny_hf_config(name)
    hf.architectures = [ARCHS[name]]
    return hf


@pytest.mark.parametrize("dense", [0.0, 0.7e-3], ids=["all-moe", "dense-first"])  # Mixtral; DeepSeek-V2 (L1 = 2)
def test_solve_recovers_the_step_and_layer_times(dense):
    # TPOT(L) = T_step + the L1 - 1 dense layers + (MoE layers) T_layer + T_h; the dense layers stay in T_step
    tpots = [[b, STEP(b) + dense + LAYER(b) + HEAD(b), STEP(b) + dense + 2 * LAYER(b) + HEAD(b)] for b in BATCHES]
    steps, layers = solve_step(tpots, HEAD)
    assert [b for b, _ in steps] == list(BATCHES)
    assert [t for _, t in steps] == pytest.approx([STEP(b) + dense for b in BATCHES], rel=1e-9)
    assert [t for _, t in layers] == pytest.approx([LAYER(b) for b in BATCHES], rel=1e-9)
    line, notes = fit_step(steps)
    assert (line.slope, line.intercept) == pytest.approx((STEP.slope, STEP.intercept + dense), rel=1e-9)
    assert notes == []
    no_head, _ = solve_step(tpots)  # without a head line the LM head stays in T_step
    assert [t for _, t in no_head] == pytest.approx([STEP(b) + dense + HEAD(b) for b in BATCHES], rel=1e-9)


def test_fit_keeps_both_parts_non_negative_and_says_so():
    line, notes = fit_step([(2, 1e-3), (8, 4e-3), (16, 9e-3)])  # least squares: negative intercept
    assert line.intercept == 0 and line.slope == pytest.approx((2e-3 + 32e-3 + 144e-3) / (4 + 64 + 256))
    assert len(notes) == 1 and "fixed part" in notes[0] and "< 0" in notes[0]
    line, notes = fit_step([(2, 5e-3), (8, 4e-3)])  # falling with B (noise): the mean, flat
    assert (line.slope, line.intercept) == pytest.approx((0.0, 4.5e-3)) and "per-sequence part" in notes[0]
    line, notes = fit_step([(8, 3e-3)])  # one batch size: no slope to fit
    assert (line.slope, line.intercept) == (0.0, 3e-3) and "one batch size" in notes[0]
    line, notes = fit_step([(2, -1e-3), (8, -2e-3)])  # all noise: zero, not negative
    assert line.slope == 0 and line.intercept == 0


def test_layer_counts_start_at_the_first_moe_layer():
    assert null_layer_counts(_tiny("mixtral"))[:2] == (1, 2)
    l1, l2, note = null_layer_counts(_tiny("deepseek_v2"))  # first_k_dense_replace=1
    assert (l1, l2, note) == (2, 3, None)
    l1, l2, note = null_layer_counts(_tiny("qwen2_moe"))  # mlp_only_layers=[1]: layer 1 is dense
    assert (l1, l2) == (1, 2) and "layer 1 is dense" in note
    hf = _tiny("mixtral")
    assert cut(hf, 5).num_hidden_layers == 5 and hf.num_hidden_layers == 3  # a copy; may exceed the model


def test_null_deployments_on_gloo_time_each_batch():
    null = measure_null_tpots(_tiny("mixtral"), "cpu", torch.float32, batches=(2, 4), name="tiny")
    assert null["layers"] == [1, 2] and null["note"] is None
    assert null["prompt_len"] == 8 and null["decode_tokens"] == 6  # the CPU defaults
    assert [row[0] for row in null["tpots"]] == [2, 4]
    for _, t1, t2 in null["tpots"]:  # CPU timing noise: positive seconds, no ordering asserted
        assert 0 < t1 < 1 and 0 < t2 < 1
    steps, layers = solve_step(null["tpots"])
    assert [b for b, _ in steps] == [2, 4] and all(abs(t) < 1 for _, t in steps + layers)


def test_calibrate_step_term_on_cpu_writes_the_step_fields(capsys, tmp_path):
    path = tmp_path / "cpu.json"
    assert main(["plan", "calibrate", "--device", "cpu", "--out", str(path), "--batch-sizes", "4,16",
                 "--pairs", "64,256", "--context-len", "32", "--repeats", "2", "--step-term",
                 "--step-batch-sizes", "2,4"]) == 0
    out = capsys.readouterr().out
    assert "step term: T_step(B) =" in out and "TPOT(1)" in out and "TPOT(2)" in out
    profile = load_profile(path)
    step = [f for f in profile.fits if f["module"] == "step"]
    assert len(step) == 1 and [f["module"] for f in profile.fits][-2:] == ["step", "exchange"]
    rec = step[0]
    assert rec["null_layers"] == [1, 2] and [row[0] for row in rec["null_tpots"]] == [2, 4]
    assert all(t > 0 for _, t1, t2 in rec["null_tpots"] for t in (t1, t2))
    assert all(h > 0 for _, h in rec["lm_head"])
    # the points are 2 TPOT(1) - TPOT(2) - T_h, and the profile holds their fit with both parts kept >= 0
    for (b, t1, t2), (_, head), (_, s) in zip(rec["null_tpots"], rec["lm_head"], rec["points"]):
        assert s == pytest.approx(2 * t1 - t2 - head, rel=1e-9, abs=1e-12)
    line, _ = fit_step([tuple(p) for p in rec["points"]])
    assert profile.step_overhead_us == pytest.approx(line.intercept * 1e6)
    assert profile.step_overhead_per_seq_us == pytest.approx(line.slope * 1e6)
    assert profile.sources["step_overhead_us, step_overhead_per_seq_us"].startswith("measured: null deployments")
    # T_x: the same deployments' T_layer = TPOT(2) - TPOT(1) beyond the kernel fits (float32: 4-byte elements)
    exchange = profile.fits[-1]
    assert exchange["context_len"] == 8 + 6 // 2 and [b for b, _ in exchange["layer"]] == [2, 4]
    bare = replace(profile, exchange_overhead_us=0.0, exchange_overhead_per_token_us=0.0)
    pm = PerfModel(model_costs(model_config_for(None, None), 4), bare, bare, Workload(exchange["context_len"]))
    for (b, t1, t2), (_, x) in zip(rec["null_tpots"], exchange["points"]):
        t_a, t_e, t_c, _ = (float(v) for v in pm.times(1, 1, 1, 1, b))
        assert x == pytest.approx((t2 - t1) - (t_a + (t_e + 2 * t_c) / pm.moe_fraction), rel=1e-9, abs=1e-12)
    line, _ = fit_step([tuple(p) for p in exchange["points"]])
    assert (profile.exchange_overhead_us, profile.exchange_overhead_per_token_us) == \
        pytest.approx((line.intercept * 1e6, line.slope * 1e6))
    # plan predict with the profile uses them; --step-overhead-ms replaces the fixed part only
    argv = ["plan", "predict", "--attention-ranks", "1", "--expert-ranks", "1", "--micro-batches", "1", "--batch", "8",
            "--profile", str(path), "--json"]
    assert main(argv) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert q["t_step"] == pytest.approx((profile.step_overhead_us + 8 * profile.step_overhead_per_seq_us) * 1e-6)
    assert main([*argv, "--step-overhead-ms", "1.5"]) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert q["t_step"] == pytest.approx(1.5e-3 + 8 * profile.step_overhead_per_seq_us * 1e-6)


def test_calibrate_without_the_step_term_says_why(capsys, tmp_path):
    path = tmp_path / "cpu.json"
    assert main(["plan", "calibrate", "--device", "cpu", "--out", str(path), "--batch-sizes", "4,16",
                 "--pairs", "64,256", "--context-len", "32", "--repeats", "1"]) == 0
    profile = load_profile(path)
    assert (profile.step_overhead_us, profile.step_overhead_per_seq_us) == (0, 0)
    assert "not measured (CPU run" in profile.sources["step_overhead_us, step_overhead_per_seq_us"]
    assert "not measured" in profile.sources["exchange_overhead_us, exchange_overhead_per_token_us"]
    assert (profile.exchange_overhead_us, profile.exchange_overhead_per_token_us) == (0, 0)
    assert all(f["module"] != "step" for f in profile.fits)
    capsys.readouterr()
    assert main(["plan", "calibrate", "--device", "cpu", "--out", str(path), "--no-step-term",
                 "--step-batch-sizes", "2"]) == 2
    assert "--step-batch-sizes was given with --no-step-term" in capsys.readouterr().err
