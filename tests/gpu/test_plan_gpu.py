"""`expertyard plan calibrate` on CUDA: the project's attention step and Triton fused_moe timed (CUDA-graph
replays) on one layer of Mixtral-8x7B shapes, lines fitted, effective figures solved; NCCL send/recv with two
GPUs, and the driver's step term from two null deployments with two. Run by the lead on the device machine:
`python -m pytest tests/gpu/test_plan_gpu.py -q`."""

import numpy as np
import pytest
import torch

from expertyard.entrypoints.cli import main
from expertyard.plan.model_costs import model_costs
from expertyard.plan.model_specs import model_config_for
from expertyard.plan.perf_model import PerfModel, Workload
from expertyard.plan.profiles import load_profile

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "profile.json"
    assert main(["plan", "calibrate", "--synthetic", "mixtral-8x7b", "--device", "cuda", "--out", str(path)]) == 0
    return load_profile(path)


def test_calibrated_lines_fit_the_points(calibrated):
    assert calibrated.kind == "calibrated" and "NVIDIA" in calibrated.gpu
    assert {f["module"] for f in calibrated.fits} >= {"attention", "experts"}
    for f in calibrated.fits:
        if f["module"] in ("step", "exchange"):  # differences of TPOTs: test_step_term_from_null_deployments
            continue
        x, y = np.array(f["points"], dtype=np.float64).T
        slope, intercept = np.polyfit(x, y, 1)
        assert f["k_slope"] == pytest.approx(slope, rel=1e-6) and f["k_intercept"] == pytest.approx(intercept, rel=1e-6)
        assert np.all(y > 0) and slope > 0
        # decode kernels are close to linear in the batch over these ranges (the paper's premise)
        assert np.abs(slope * x + intercept - y).max() / y.mean() < 0.35, f


def test_effective_figures_are_physical(calibrated):
    p = calibrated
    assert 0.3 * p.hbm_gbps < p.weight_gbps < 1.1 * p.hbm_gbps, p.weight_gbps
    assert 0.05 * p.hbm_gbps < p.kv_gbps < 1.1 * p.hbm_gbps, p.kv_gbps
    assert p.expert_tflops < 1.1 * p.peak_tflops and p.attn_tflops < 1.1 * p.peak_tflops
    assert p.memory_gb > 40
    # used for the calibrated shape at tp 1, the solved profile gives back the expert line
    pm = PerfModel(model_costs(model_config_for("mixtral-8x7b")), p, p, Workload(2048))
    fit = next(f for f in p.fits if f["module"] == "experts")
    line = pm.expert_line(1, 1)
    if "clamped" in p.sources.get("expert_tflops", ""):  # a slower, physical figure: the line is no steeper than 1.5x
        assert fit["k_slope"] <= line.slope < 1.5 * fit["k_slope"]
    else:
        assert line.slope == pytest.approx(fit["k_slope"], rel=0.05)
    assert line.intercept == pytest.approx(fit["k_intercept"], rel=0.5)  # overhead clamped at >= 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_send_recv_line(calibrated):
    fit = next(f for f in calibrated.fits if f["module"] == "comm")
    assert fit["k_slope"] > 0 and 10 < calibrated.intra_host_gbps < 1000


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_step_term_from_null_deployments(calibrated):
    """T_step from two null deployments (1 + 1 ranks, 1 and 2 layers): a profiler trace put the driver's
    host work at ~3 ms per iteration on H200s; bounded loosely (0.1-50 ms), timing noise aside."""
    fit = next(f for f in calibrated.fits if f["module"] == "step")
    assert fit["null_layers"] == [1, 2] and [row[0] for row in fit["null_tpots"]] == [16, 256, 1024]
    assert all(t1 > 0 and t2 > 0 for _, t1, t2 in fit["null_tpots"]), fit["null_tpots"]
    assert 0.1e3 < calibrated.step_overhead_us < 50e3, calibrated.step_overhead_us
    assert calibrated.sources["step_overhead_us, step_overhead_per_seq_us"].startswith("measured")
    # T_x from the same deployments: 250 us + 1.35 us per token on 2 x H200 (2026-11-21)
    exchange = next(f for f in calibrated.fits if f["module"] == "exchange")
    assert [b for b, _ in exchange["points"]] == [16, 256, 1024]
    assert calibrated.exchange_overhead_us + 1024 * calibrated.exchange_overhead_per_token_us < 20e3
    assert calibrated.sources["exchange_overhead_us, exchange_overhead_per_token_us"].startswith("measured")
