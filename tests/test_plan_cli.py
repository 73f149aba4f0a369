"""`expertyard plan`, `plan predict`, `plan calibrate --device cpu` and `plan table` through the CLI."""

import json

import numpy as np
import pytest

from expertyard.entrypoints.cli import main
from expertyard.plan.model_costs import model_costs
from expertyard.plan.model_specs import model_config_for
from expertyard.plan.colocated import predict_colocated
from expertyard.plan.perf_model import Deployment, PerfModel, Workload, predict
from expertyard.plan.profiles import load_profile


def _json(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plan_prints_best_plan_and_candidates(capsys):
    assert main(["plan", "--synthetic", "mixtral-8x22b", "--gpus", "64", "--slo-tpot", "150", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "best plan for mixtral-8x22b on 64 GPUs, h200 (datasheet)" in out and "TPOT SLO 150 ms" in out
    assert "top 5 candidates" in out and "tok/s/GPU" in out
    best = _json(capsys, ["plan", "--synthetic", "mixtral-8x22b", "--gpus", "64", "--slo-tpot", "150", "--json"])
    b = best["best"]
    t_f = max(b["t_a"], b["t_e"])
    assert b["tpot"] <= 0.150 and b["gpus_used"] <= 64 and b["fits_memory"] and b["t_c"] < t_f
    assert b["deployment"]["m"] >= b["min_micro_batches"] and b["balance"] <= 0.2


def test_heterogeneous_plan_by_cost(capsys):
    out = _json(capsys, ["plan", "--synthetic", "dbrx", "--gpus", "32", "--gpu", "h20", "--expert-gpu", "l40s",
                         "--objective", "per-cost", "--json"])
    assert out["attention_profile"] == "h20" and out["expert_profile"] == "l40s"
    assert out["best"]["per_dollar"] == max(c["per_dollar"] for c in out["candidates"])


def test_predict_matches_the_model(capsys):
    out = _json(capsys, ["plan", "predict", "--synthetic", "mixtral-8x7b", "--attention-ranks", "2",
                         "--expert-ranks", "2", "--micro-batches", "3", "--batch", "96", "--profile", "h100", "--json"])
    d = out["deployment"]
    assert (d["n_a"], d["n_e"], d["m"], d["b_a"]) == (2, 2, 3, 16)
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), load_profile("h100"), load_profile("h100"),
                   Workload(2048))
    t_a, t_e, t_c, t_h = (float(x) for x in pm.times(1, 1, 2, 2, 16))
    tpot = (t_a + t_e + 2 * t_c) + max(t_a, t_e) * (3 * 32 - 1) + 3 * t_h
    assert out["tpot"] == pytest.approx(tpot) and out["throughput"] == pytest.approx(96 / tpot)
    assert main(["plan", "predict", "--synthetic", "mixtral-8x7b", "--attention-ranks", "2", "--expert-ranks", "2",
                 "--micro-batches", "3", "--batch", "96"]) == 0
    assert "TPOT" in capsys.readouterr().out
    short = _json(capsys, ["plan", "predict", "--synthetic", "mixtral-8x7b", "--num-layers", "8", "--attention-ranks",
                           "2", "--expert-ranks", "2", "--micro-batches", "3", "--batch", "96", "--profile", "h100",
                           "--json"])
    t_f = max(t_a, t_e)  # same per-layer times, 8 layers instead of 32
    assert short["tpot"] == pytest.approx((t_a + t_e + 2 * t_c) + t_f * (3 * 8 - 1) + 3 * t_h)
    stepped = _json(capsys, ["plan", "predict", "--synthetic", "mixtral-8x7b", "--num-layers", "8", "--attention-ranks",
                             "2", "--expert-ranks", "2", "--micro-batches", "3", "--batch", "96", "--profile", "h100",
                             "--step-overhead-ms", "2.5", "--json"])
    # the driver's host work adds once per iteration; the per-layer times (the link included) stay the same
    assert [stepped[k] for k in ("t_a", "t_e", "t_c", "t_h")] == pytest.approx([t_a, t_e, t_c, t_h])
    assert stepped["t_step"] == pytest.approx(2.5e-3) and stepped["tpot"] == pytest.approx(short["tpot"] + 2.5e-3)


def test_calibrate_on_cpu_fits_the_measured_points(capsys, tmp_path):
    path = tmp_path / "cpu.json"
    assert main(["plan", "calibrate", "--device", "cpu", "--out", str(path), "--batch-sizes", "4,8,16,32,64",
                 "--pairs", "64,128,256,512,1024", "--context-len", "128", "--repeats", "15"]) == 0
    assert "wrote" in capsys.readouterr().out
    profile = load_profile(path)
    assert profile.kind == "calibrated" and profile.gpu.startswith("CPU")
    modules = [(f["module"], f.get("experts"), f.get("context_len")) for f in profile.fits]
    assert modules == [("experts", 16, None), ("experts", 8, None), ("attention", None, 128), ("attention", None, 32)]
    for f in profile.fits:
        x, y = np.array(f["points"], dtype=np.float64).T
        slope, intercept = np.polyfit(x, y, 1)
        assert f["k_slope"] == pytest.approx(slope, rel=1e-6, abs=1e-15)
        assert f["k_intercept"] == pytest.approx(intercept, rel=1e-6, abs=1e-12)
        # the line reproduces the timings (thread CPU time on a shared 2-core machine: a loose bound)
        assert np.abs(slope * x + intercept - y).max() / y.mean() < 0.5, f
        assert f["max_rel_err"] == pytest.approx(np.max(np.abs(slope * x + intercept - y) / y), rel=1e-6)
    # the solved profile, used for the calibrated shape at tp 1, reproduces the expert fit's points
    pm = PerfModel(model_costs(model_config_for(), 4), profile, profile, Workload(128))
    x, y = np.array(profile.fits[0]["points"], dtype=np.float64).T
    assert np.abs(pm.expert_line(1, 1)(x) - y).max() / y.mean() < 0.5
    out = _json(capsys, ["plan", "predict", "--attention-ranks", "1", "--expert-ranks", "1", "--micro-batches", "3",
                         "--batch", "3", "--profile", str(path), "--json"])
    assert out["attention_profile"] == "h200-calibrated" and out["tpot"] > 0


def test_table_of_paper_models(capsys):
    assert main(["plan", "table", "--gpus", "8,64", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | GPUs |") and "| mixtral-8x22b | 8 |" in out and "| scaled-moe-317b | 64 |" in out
    assert "x colocated |" in out.splitlines()[0]
    table = _json(capsys, ["plan", "table", "--synthetic", "dbrx", "--gpus", "16", "--slo-tpot", "150", "--json"])
    plan = table["plans"][0]
    co = plan["colocated"]  # the best colocated deployment of the same GPUs within the same SLO
    assert co["tpot"] <= 0.150 and co["fits_memory"] and co["unit"] * co["replicas"] <= 16


def test_predict_colocated_and_the_comparison(capsys):
    co = _json(capsys, ["plan", "predict", "--synthetic", "mixtral-8x7b", "--num-layers", "8", "--mode", "colocated",
                        "--attention-ranks", "2", "--expert-ranks", "2", "--micro-batches", "1", "--batch", "2048",
                        "--context-len", "272", "--profile", "h100", "--json"])
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b", num_layers=8)), load_profile("h100"),
                   load_profile("h100"), Workload(272))
    assert co["unit"] == 4 and co["batch"] == 2048
    assert co["tpot"] == pytest.approx(predict_colocated(pm, 4, 2048).tpot)
    assert main(["plan", "predict", "--synthetic", "mixtral-8x7b", "--num-layers", "8", "--attention-ranks", "2",
                 "--expert-ranks", "2", "--micro-batches", "2", "--batch", "2048", "--context-len", "272",
                 "--profile", "h100"]) == 0
    out = capsys.readouterr().out
    pp = predict(pm, Deployment(1, 1, 2, 2, 2, 512))
    assert f"colocated EP on the same 4 GPUs at batch 2048: TPOT {co['tpot'] * 1e3:.2f} ms" in out
    assert f"this deployment is {pp.per_gpu / (2048 / co['tpot'] / 4):.2f}x colocated" in out
    assert main(["plan", "--synthetic", "mixtral-8x7b", "--gpus", "8", "--slo-tpot", "100"]) == 0
    assert "colocated EP on the same 8 GPUs within TPOT 100.00 ms" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["plan", "--gpus", "8", "--gpu", "b200"], "unknown GPU profile 'b200'"),
    (["plan", "--gpus", "1"], "--gpus 1: a disaggregated deployment needs at least 2 GPUs"),
    (["plan"], "needs --gpus N"),
    (["plan", "--synthetic", "mixtral-8x7b", "--gpus", "8", "--slo-tpot", "0.5"], "--slo-tpot 0.5 ms is impossible"),
    (["plan", "--synthetic", "scaled-moe-317b", "--gpus", "4", "--gpu", "l40s"], "does not fit in 4 GPUs"),
    (["plan", "--model", "/nonexistent", "--gpus", "8"], "--model /nonexistent: not a directory"),
    (["plan", "predict", "--synthetic", "mixtral-8x7b", "--attention-ranks", "2", "--expert-ranks", "3",
      "--micro-batches", "3", "--batch", "96"], "3 expert nodes cannot split 8 experts"),
    (["plan", "predict", "--synthetic", "mixtral-8x7b", "--attention-ranks", "2", "--expert-ranks", "2",
      "--micro-batches", "3", "--batch", "97"], "--batch 97 must be a positive multiple of"),
    (["plan", "predict", "--attention-ranks", "3", "--tp-attention", "2", "--expert-ranks", "1",
      "--micro-batches", "3", "--batch", "9"], "--attention-ranks 3 must be a positive multiple"),
    (["plan", "predict", "--synthetic", "mixtral-8x7b", "--mode", "colocated", "--attention-ranks", "2",
      "--expert-ranks", "1", "--micro-batches", "1", "--batch", "96"], "3 colocated ranks cannot split 8 experts"),
    (["plan", "predict", "--mode", "colocated", "--attention-ranks", "2", "--expert-ranks", "2",
      "--micro-batches", "2", "--batch", "96"], "--mode colocated models m = 1"),
    (["plan", "predict", "--mode", "colocated", "--attention-ranks", "2", "--expert-ranks", "2",
      "--micro-batches", "1", "--batch", "98"], "--batch 98 must be a multiple of the 4 colocated ranks"),
])
def test_bad_input_is_a_clear_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_calibrated_throughput_above_the_peak_is_clamped_and_said():
    from expertyard.bench.plan_calibrate import _at_most_peak
    from expertyard.plan.profiles import load_profile

    base, sources = load_profile("h200"), {}
    assert _at_most_peak(0.5 * base.peak_tflops, base, "expert_tflops", sources) == 0.5 * base.peak_tflops
    assert sources == {}
    assert _at_most_peak(1.3 * base.peak_tflops, base, "expert_tflops", sources) == base.peak_tflops
    assert "clamped" in sources["expert_tflops"] and base.name in sources["expert_tflops"]
