"""Disaggregated and colocated expert parallelism on CPU (gloo, float32): M2N buffers against the resident
kernel, then whole deployments launched by torchrun's launcher against a single-process resident run (greedy
tokens equal, log-probabilities within 1e-4), a killed rank, and the server's 503."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import disagg_tiny_hf_config

from expertyard.disagg import jobs
from expertyard.disagg.config import DisaggConfig
from expertyard.disagg.expert_shard import ExpertShard
from expertyard.disagg.launch import exit_now, launch_local
from expertyard.disagg.m2n import RowLayout, combine, pack_dispatch, unpack_dispatch
from expertyard.disagg.placement import ExpertPlacement
from expertyard.disagg.worker import ModelSource, run_rank
from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.loader.bundled import bundled_model_path
from expertyard.errors import ConfigError, DeploymentDownError
from expertyard.experts.resident import ResidentExperts
from expertyard.kernels.fused_moe import fused_moe

MAX_TOKENS = 6


TINY = ModelSource(hf_config=disagg_tiny_hf_config(), std=0.15, name="tiny")
BUNDLED = ModelSource(model_dir=bundled_model_path(), name="tiny-moe")
SOURCES = {"tiny": TINY, "bundled": BUNDLED}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 13, 2, 9, 1)]  # 5 > max_num_seqs


@functools.cache
def _reference(source_name: str) -> tuple[list[list[int]], dict]:
    source = SOURCES[source_name]
    loaded = source.load(torch.device("cpu"), torch.float32, ResidentExperts)
    prompts = _prompts(loaded.config.vocab_size)
    engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=4, max_model_len=64), eos_token_ids=set())
    return prompts, jobs.greedy(engine, prompts, MAX_TOKENS)


def _assert_matches(got: dict, ref: dict, key=None) -> None:
    """`key`: (m, async scheduling) of the run, named when it fails."""
    assert got["tokens"] == ref["tokens"], key
    for a, b in zip(got["logprobs"], ref["logprobs"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(got["prompt_logprobs"]), torch.tensor(ref["prompt_logprobs"]),
                               atol=1e-4, rtol=1e-4)


# ---- M2N buffers, in one process ------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,num_ranks,replicate", [(7, 3, {}), (0, 2, {}), (16, 4, {0: [1, 5]}), (5, 1, {})])
def test_dispatch_compute_combine_equals_fused_moe(tokens, num_ranks, replicate):
    e, k, d, i = 8, 3, 16, 12
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.empty(0, k, dtype=torch.long)
    w = torch.rand(tokens, k, generator=g)
    w13, w2 = torch.randn(e, 2 * i, d, generator=g) * 0.3, torch.randn(e, d, i, generator=g) * 0.3
    placement = ExpertPlacement.balanced([0], e, num_ranks, replicate)
    layout, cap = RowLayout(d, k, torch.float32), 16
    buf, route = pack_dispatch(layout, x, ids, w, *placement.tables(0, x.device), num_ranks, cap)
    assert buf.shape == (num_ranks * (cap + 1), layout.width)
    answers = []
    for n in range(num_ranks):  # what each expert rank does with the chunk it receives
        shard = ExpertShard.__new__(ExpertShard)
        shard.w13 = {0: w13[placement.local_experts(0, n)]}
        shard.w2 = {0: w2[placement.local_experts(0, n)]}
        got = unpack_dispatch(layout, buf.view(num_ranks, cap + 1, -1)[n], 1, cap)
        assert int(got.counts[0]) == int(route.sent[:, n].sum())  # the header row carries the count
        answers.append(shard.compute(0, got.x, got.local_ids, got.weights))
    y = combine(route, torch.cat(answers), x.dtype)
    torch.testing.assert_close(y, fused_moe(x, w13, w2, ids, w) if tokens else torch.zeros(0, d), atol=1e-5, rtol=1e-5)
    if replicate:  # a replicated expert's tokens are spread over its copies
        used = {int(r) for t in range(tokens) for r in route.sent[t].nonzero().flatten() if 1 in ids[t]}
        assert len(used) > 1


def test_placement_covers_every_rank_and_expert():
    p = ExpertPlacement.balanced([0, 2], num_experts=4, num_ranks=6)
    assert sorted({r for rs in p.holders[0] for r in rs}) == list(range(6))
    assert all(p.local_experts(0, r) for r in range(6))
    with pytest.raises(ConfigError, match="expert 9"):
        ExpertPlacement.balanced([0], 4, 2, replicate={0: [9]})


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="micro_batches=5"):
        DisaggConfig(micro_batches=5)
    with pytest.raises(ConfigError, match="expert_ranks=3"):
        DisaggConfig(mode="colocated", attention_ranks=2, expert_ranks=3)
    with pytest.raises(ConfigError, match="dist_timeout=0"):
        DisaggConfig(dist_timeout=0)
    assert DisaggConfig(attention_ranks=2, expert_ranks=3).world_size == 5


# ---- whole deployments ----------------------------------------------------------------------------------

CASES = [  # (source, config, replicated hot experts, micro-batch counts)
    ("tiny", DisaggConfig(attention_ranks=1, expert_ranks=1), {}, [1, 2, 3, 4]),
    ("tiny", DisaggConfig(attention_ranks=2, expert_ranks=2), {}, [1, 2, 3, 4]),
    ("tiny", DisaggConfig(attention_ranks=1, expert_ranks=3), {0: [0, 3], 2: [7]}, [1, 2, 3, 4]),
    ("tiny", DisaggConfig.colocated(2), {}, [1, 2]),
    ("tiny", DisaggConfig.colocated(4), {}, [1]),
    ("bundled", DisaggConfig(attention_ranks=2, expert_ranks=2), {}, [1, 2, 3, 4]),
]


@pytest.mark.parametrize("source_name,cfg,replicate,ms", CASES,
                         ids=[f"{s}-{c.mode}-{c.attention_ranks}x{c.expert_ranks}" for s, c, _, _ in CASES])
def test_deployment_matches_single_process(source_name, cfg, replicate, ms):
    source = SOURCES[source_name]
    prompts, ref = _reference(source_name)
    config = EngineConfig(max_num_seqs=4, max_model_len=64)
    job = functools.partial(jobs.greedy_each_m, prompts=prompts, max_tokens=MAX_TOKENS, ms=ms)
    results = launch_local(replace(cfg, replicate=replicate), source, config, "cpu", torch.float32, job,
                           torch_threads=1)
    assert sorted(results) == [(m, a) for m in ms for a in (False, True)]  # async scheduling off and on
    for key, got in results.items():
        _assert_matches(got, ref, key)


PIECE_CASES = [  # the CUDA-graph split of decode steps (decode_pieces.py), run as plain functions on CPU
    ("tiny", DisaggConfig(attention_ranks=2, expert_ranks=2), {}, [1, 2, 3, 4]),
    ("tiny", DisaggConfig(attention_ranks=1, expert_ranks=3), {0: [0, 3], 2: [7]}, [1, 3]),
    ("tiny", DisaggConfig.colocated(2), {}, [1, 2]),
]


@pytest.mark.parametrize("source_name,cfg,replicate,ms", PIECE_CASES,
                         ids=[f"{s}-{c.mode}-{c.attention_ranks}x{c.expert_ranks}" for s, c, _, _ in PIECE_CASES])
def test_decode_pieces_match_single_process(source_name, cfg, replicate, ms):
    """Decode steps through the graph pieces (padded to a capacity bucket, padding never dispatched): the same
    tokens and log-probabilities as one process."""
    prompts, ref = _reference(source_name)
    config = EngineConfig(max_num_seqs=4, max_model_len=64, cuda_graphs=True)  # off CUDA: the pieces, eagerly
    job = functools.partial(jobs.greedy_each_m, prompts=prompts, max_tokens=MAX_TOKENS, ms=ms)
    results = launch_local(replace(cfg, replicate=replicate), SOURCES[source_name], config, "cpu", torch.float32,
                           job, torch_threads=1)
    for key, got in results.items():
        _assert_matches(got, ref, key)


def _warm_then_greedy(engine, prompts, max_tokens):
    """Rank 0's job: the server's warm-up on the distributed engine, then greedy generation."""
    from expertyard.server.warmup import warm_up

    warm_up(engine)
    assert not engine.has_unfinished()
    keys = sorted(engine.runner.attention.pieces.entries)  # (micro-batch, capacity, length bucket)
    return {"pieces": keys, **jobs.greedy(engine, prompts, max_tokens)}


def test_server_warm_up_on_a_deployment_builds_the_decode_pieces_and_changes_no_output():
    prompts, ref = _reference("tiny")
    config = EngineConfig(max_num_seqs=4, max_model_len=64, cuda_graphs=True)
    job = functools.partial(_warm_then_greedy, prompts=prompts, max_tokens=MAX_TOKENS)
    got = launch_local(DisaggConfig(attention_ranks=2, expert_ranks=2, micro_batches=2), TINY, config, "cpu",
                       torch.float32, job, torch_threads=1)
    keys = got.pop("pieces")
    assert {i for i, _, _ in keys} == {0, 1}  # both micro-batches
    assert len({lb for _, _, lb in keys}) >= 3  # the warm-up decodes at short and long contexts
    _assert_matches(got, ref)


def test_padding_rows_are_never_dispatched():
    layout, placement = RowLayout(8, 2, torch.float32), ExpertPlacement.balanced([0], 4, 2)
    x, ids, w = torch.randn(6, 8), torch.tensor([[0, 1], [2, 3]] * 3), torch.rand(6, 2)
    valid = torch.arange(6) < 4
    buf, route = pack_dispatch(layout, x, ids, w, *placement.tables(0, x.device), 2, 8, valid)
    assert not route.sent[4:].any() and route.sent[:4].any(dim=1).all()
    counts = layout.meta(buf.view(2, 9, -1)[:, 0])[:, 0]
    assert counts.tolist() == route.sent[:4].sum(dim=0).float().tolist()


def test_graph_capacities_cover_every_micro_batch():
    from expertyard.disagg.step_plan import graph_capacities

    cfg = DisaggConfig(attention_ranks=2, expert_ranks=2)
    caps = graph_capacities(cfg, max_num_seqs=256)
    assert caps[-1] >= 128 and all(c % cfg.capacity_multiple == 0 for c in caps)
    assert len(caps) <= 8  # few graphs


# ---- failures -------------------------------------------------------------------------------------------

def _generate_until_down(engine, out_dir: str, async_scheduling: bool):
    """Rank 0's job in the failure test: keep decoding; report the error and the runner's state."""
    from expertyard.engine.sampling_params import SamplingParams

    engine.config.async_scheduling = async_scheduling
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for p in ([5, 6, 7], [8, 9]):
        engine.add_request(p, params)
    steps = 0
    try:
        while engine.has_unfinished():
            engine.step()
            steps += 1
            if steps == 3:
                Path(out_dir, "decoding").write_text("")
    except DeploymentDownError as e:
        Path(out_dir, "rank0_error").write_text(f"{e}\n{engine.runner.down_reason}")
        raise
    return steps


def _rank_process(rank: int, world: int, port: int, cfg: DisaggConfig, out_dir: str, async_scheduling: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    job = functools.partial(_generate_until_down, out_dir=out_dir, async_scheduling=async_scheduling)
    try:
        run_rank(cfg, TINY, EngineConfig(max_num_seqs=4, max_model_len=256), rank, world, torch.device("cpu"),
                 torch.float32, job)
    except DeploymentDownError:
        exit_now(3)


@pytest.mark.parametrize("how,async_scheduling", [("kill", False), ("stop", True)])
def test_dead_or_hung_rank_ends_every_other_rank_with_an_error(tmp_path, how, async_scheduling):
    import multiprocessing as mp

    from expertyard.disagg.launch import _free_port

    timeout = 10.0
    cfg = DisaggConfig(attention_ranks=2, expert_ranks=2, dist_timeout=timeout)
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_rank_process, args=(r, 4, port, cfg, str(tmp_path), async_scheduling))
             for r in range(4)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "decoding").exists():
            assert time.monotonic() < deadline and all(p.exitcode is None for p in procs), "never started decoding"
            time.sleep(0.1)
        victim = procs[3]  # an expert rank
        os.kill(victim.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        for p in procs[:3]:
            p.join(timeout=timeout * 3 + 30)
        elapsed = time.monotonic() - t0
        assert [p.exitcode for p in procs[:3]] == [3, 3, 3], "every other rank exits with the error status"
        assert elapsed < timeout * 3 + 30
        message = (tmp_path / "rank0_error").read_text()
        assert "rank 0" in message and ("died" in message or "timed out" in message)
        assert message.splitlines()[-1] != "None"  # the runner remembers that the deployment is down
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5)


def test_server_answers_503_while_the_deployment_is_down():
    from fastapi.testclient import TestClient

    from expertyard.server import build_app

    loaded = TINY.load(torch.device("cpu"), torch.float32, ResidentExperts)
    engine = LLMEngine(loaded, None, EngineConfig(max_num_seqs=2, max_model_len=64), eos_token_ids=set())
    with TestClient(build_app(engine, "tiny")) as client:
        ok = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
        assert ok.status_code == 200
        engine.runner.down_reason = "rank 3 (expert) died"  # what DistributedRunner records on a failure
        health = client.get("/health")
        assert health.status_code == 503 and "rank 3" in health.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "deployment_down"


# ---- the commands -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefill_budget", [None, 6])
def test_bench_disaggregate_reports_each_micro_batch_count(capsys, monkeypatch, prefill_budget):
    import json

    from expertyard.entrypoints import disagg_cmd
    from expertyard.entrypoints.cli import main

    if prefill_budget:  # 16 prompt tokens in chunks of 6: prefill takes 3 steps, no decode meanwhile
        monkeypatch.setattr(disagg_cmd, "PREFILL_TOKENS_PER_STEP", prefill_budget)
    assert main(["bench", "--disaggregate", "--attention-ranks", "1", "--expert-ranks", "1", "--micro-batches", "1,3",
                 "--batch-sizes", "4", "--prompt-len", "4", "--decode-tokens", "4", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["gpus"] == 2 and [r["micro_batches"] for r in result["runs"]] == [1, 3]
    for r in result["runs"]:
        assert r["per_gpu_tokens_per_s"] == pytest.approx(r["decode_tokens_per_s"] / 2)
        generated = r["decode_tokens_per_s"] * r["tpot_ms"] * r["steps"] / 1e3  # tokens of the timed steps
        # however the prompts were prefilled, every timed step decodes the whole batch: 4 sequences x 3 steps
        assert r["steps"] == 3 and generated == pytest.approx(12)
        assert 0 < r["step_ms_median"] <= r["step_ms_max"] <= r["tpot_ms"] * 3  # intervals of the timed steps


def test_serve_disaggregate_answers_like_one_process_then_503_when_a_rank_dies(tmp_path):
    import json
    import subprocess
    import urllib.error
    import urllib.request

    from expertyard.disagg.launch import _free_port
    from expertyard.engine.sampling_params import SamplingParams
    from expertyard.entrypoints.common import load_tokenizer

    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "expertyard.entrypoints.cli", "serve", "--disaggregate",
                             "--attention-ranks", "1", "--expert-ranks", "2", "--device", "cpu", "--port", str(port),
                             "--dist-timeout", "20", "--async-scheduling", "on"], stdout=log, stderr=subprocess.STDOUT)

    def post(prompt):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     data=json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0}).encode(),
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except (urllib.error.URLError, ConnectionError):
            return None, None

    try:
        deadline = time.monotonic() + 120
        while (status := post("Once upon a time"))[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        loaded = BUNDLED.load(torch.device("cpu"), torch.float32, ResidentExperts)
        engine = LLMEngine(loaded, load_tokenizer(bundled_model_path()), EngineConfig(max_num_seqs=2))
        ref = engine.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8))[0].text
        assert status[1]["choices"][0]["text"] == ref
        workers = _spawned_children(proc.pid)
        assert len(workers) == 3
        os.kill(workers[-1], signal.SIGKILL)  # the last one started: expert rank 2
        deadline = time.monotonic() + 60
        while (status := post("Once"))[0] != 503:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert status[1]["error"]["code"] == "deployment_down" and "rank " in status[1]["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(30)


def _spawned_children(pid: int) -> list[int]:
    """Pids of the rank processes the launcher spawned under `pid` (Linux /proc), oldest first."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            found.append(int(d.name))
    return sorted(found)


def test_step_profiler_prints_and_traces_each_window(monkeypatch, capsys, tmp_path):
    import gzip
    import json

    from expertyard.engine.step_profiler import StepProfiler

    monkeypatch.setenv("EXPERTYARD_PROFILE_STEPS", "2:4,6:7")
    monkeypatch.setenv("EXPERTYARD_PROFILE_DIR", str(tmp_path))
    prof = StepProfiler(3, "expert")
    for _ in range(8):
        prof.step()
        with torch.profiler.record_function("expertyard.test"):
            torch.ones(64, 64) @ torch.ones(64, 64)
    err = capsys.readouterr().err
    assert err.count("== rank 3 (expert): steps 2..3, by host time") == 1 and "aten::mm" in err
    assert err.count("== rank 3 (expert): steps 6..6, by host time") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank3_steps2-3.json.gz", "rank3_steps6-6.json.gz"]
    events = json.loads(gzip.open(tmp_path / "rank3_steps2-3.json.gz").read())["traceEvents"]
    assert sum(e.get("name") == "expertyard.test" for e in events) == 2  # steps 2 and 3, not 1 or 4
    for bad in ("forty", "5:3"):
        monkeypatch.setenv("EXPERTYARD_PROFILE_STEPS", bad)
        with pytest.raises(ValueError, match=f"EXPERTYARD_PROFILE_STEPS='{bad}'"):
            StepProfiler(0, "attention")
