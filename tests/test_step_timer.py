"""EXPERTYARD_STEP_TIMES' timer on a fake clock: per-kind medians of each phase, nothing recorded when off."""

from __future__ import annotations

import pytest

from expertyard.engine import step_timer
from expertyard.engine.step_timer import StepTimer


def test_medians_per_kind_and_phase(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(step_timer.time, "perf_counter", lambda: now[0])
    t = StepTimer(enabled=True)
    t.label = "rank 0"
    # three decode steps: schedule 1, 2, 9 ms; plan 4, 4, 5 ms; one prefill step: schedule 7 ms
    for kind, phases in [("decode", [("schedule", 1), ("plan", 4)]), ("decode", [("schedule", 2), ("plan", 4)]),
                         ("prefill", [("schedule", 7)]), ("decode", [("schedule", 9), ("plan", 5)])]:
        t.start()
        t.kind_of_step(kind)
        for phase, ms in phases:
            now[0] += ms / 1e3
            t.mark(phase)
    report = t.report()
    assert "step times of rank 0 (decode, 3 steps, medians): host 6.000 ms" in report  # 2 + 4
    assert "step times of rank 0 (prefill, 1 steps, medians): host 7.000 ms" in report
    assert t.times["decode"]["schedule"] == pytest.approx([0.001, 0.002, 0.009])


def test_off_records_nothing():
    t = StepTimer(enabled=False)
    t.start()
    t.kind_of_step("decode")
    t.mark("schedule")
    assert not t.times and not t.steps and t.report() == ""


def test_garbage_collections_are_counted_per_generation():
    import gc

    t = StepTimer(enabled=True)
    try:
        gc.collect()  # before the first step: start-up, not counted
        t.start()
        t.kind_of_step("decode")
        gc.collect()  # a full collection: generation 2
        t.mark("schedule")
    finally:
        gc.callbacks.remove(t._on_gc)
    assert len(t.gc_pauses[2]) == 1 and t.gc_pauses[2][0] >= 0
    assert "garbage collections: generation 2: 1," in t.report()


def test_the_engine_profiles_its_steps_when_asked(monkeypatch, capsys, tmp_path):
    """EXPERTYARD_PROFILE_STEPS=2:4 on a single-process engine: steps 2 and 3 (decode) are profiled, with the
    model's matmuls in the host table and a Chrome trace per window; unset, the engine prints nothing."""
    import gzip
    import json

    from servers import make_engine

    from expertyard.engine.sampling_params import SamplingParams

    monkeypatch.setenv("EXPERTYARD_PROFILE_STEPS", "2:4")
    monkeypatch.setenv("EXPERTYARD_PROFILE_DIR", str(tmp_path))
    engine = make_engine(max_num_seqs=1, max_model_len=64)
    engine.generate(["hello"], SamplingParams(max_tokens=6, temperature=0))
    err = capsys.readouterr().err
    assert err.count("== rank 0 (engine): steps 2..3, by host time") == 1 and "aten::" in err
    events = json.loads(gzip.open(tmp_path / "rank0_steps2-3.json.gz").read())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    monkeypatch.delenv("EXPERTYARD_PROFILE_STEPS")
    make_engine(max_num_seqs=1, max_model_len=64).generate(["hello"], SamplingParams(max_tokens=6))
    assert "== rank 0" not in capsys.readouterr().err
