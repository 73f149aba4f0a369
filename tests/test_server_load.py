"""The server under load (32 concurrent clients, 200 requests, every greedy output checked against the engine
alone, resident memory), clients that disconnect mid-request, and `expertyard serve` stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from servers import KEY, RunningServer, make_engine  # noqa: E402

from expertyard.engine.sampling_params import SamplingParams  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park", "ROMEO:", "The sun was hot",
           "She opened the box and", "My lord, I pray you", "There was a big tree", "Lily wanted to", "KING HENRY:",
           "One day, a bird", "The boy ran home because", "What light through yonder", "Mom said no.", "The cat"]


@pytest.fixture(scope="module")
def server():
    s = RunningServer(make_engine(max_num_seqs=32))
    yield s
    s.stop()


def rss_mib(pid: int | None = None) -> float:
    for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _one(client: httpx.AsyncClient, i: int) -> tuple[int, str, str]:
    """Request i: completion or chat, streamed or not (greedy, 16 tokens). -> (status, prompt, text)."""
    prompt = PROMPTS[i % len(PROMPTS)]
    chat = i % 5 == 4
    body = {"model": "tiny-moe", "max_tokens": 16, "temperature": 0, "stream": i % 2 == 0,
            **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    url = "/v1/chat/completions" if chat else "/v1/completions"
    if not body["stream"]:
        r = await client.post(url, json=body)
        if r.status_code != 200:
            return r.status_code, prompt, r.text
        c = r.json()["choices"][0]
        return 200, prompt, c["message"]["content"] if chat else c["text"]
    text, done = [], False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return r.status_code, prompt, (await r.aread()).decode()
        async for line in r.aiter_lines():
            done = done or line == "data: [DONE]"
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"][0]
                text.append(c["delta"].get("content", "") if chat else c["text"])
    return (200 if done else 599), prompt, "".join(text)


async def _load(url: str, n_requests: int, n_clients: int) -> list[tuple[int, str, str, bool]]:
    results = []
    work = iter(range(n_requests))
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                 limits=httpx.Limits(max_connections=n_clients)) as client:
        async def worker():
            for i in work:
                results.append((*await _one(client, i), i % 5 == 4))

        await asyncio.gather(*(worker() for _ in range(n_clients)))
    return results


def test_32_concurrent_clients_200_requests(server, bundled_engine):
    ref_engine = bundled_engine(max_num_seqs=1)  # the reference of test_server_api too
    params = SamplingParams(temperature=0, max_tokens=16)
    used = {(PROMPTS[i % len(PROMPTS)], i % 5 == 4) for i in range(200)}  # 15 (prompt, chat) pairs
    expected = {(p, chat): ref_engine.generate([[{"role": "user", "content": p}] if chat else p], params)[0].text
                for p, chat in used}  # each alone

    asyncio.run(_load(server.url, 32, 32))  # warm-up: allocator pools, first-call paths
    registry = server.app.state.server.metrics.registry
    steps_before = registry.get_sample_value("expertyard_engine_step_seconds_count", {"model_name": "tiny-moe"})
    rss_before = rss_mib()
    t0 = time.perf_counter()
    results = asyncio.run(_load(server.url, 200, 32))
    seconds = time.perf_counter() - t0
    rss_after = rss_mib()
    print(f"\n200 requests from 32 clients in {seconds:.1f} s ({len(results) * 16 / seconds:.0f} tokens/s); "
          f"RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after ({rss_after - rss_before:+.1f} MiB)")
    assert len(results) == 200
    assert all(status == 200 for status, *_ in results), [r for r in results if r[0] != 200][:3]
    wrong = [(p, chat, text) for _, p, text, chat in results if text != expected[(p, chat)]]
    assert not wrong, wrong[:3]
    assert rss_after - rss_before < 64, "resident memory grew under load"
    assert server.idle()
    steps = registry.get_sample_value("expertyard_engine_step_seconds_count", {"model_name": "tiny-moe"}) - steps_before
    assert steps < 200 * 16 / 8, f"{steps} steps for 3200 tokens: requests were not batched"


def test_stream_disconnect_aborts_the_request(server):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
            assert any(line.startswith("data: {") for line in got)
            assert server.engine.scheduler.running  # still generating
    assert server.idle(), "the disconnected request still holds a KV row"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_non_streaming_disconnect_aborts_the_request(server):
    body = {"prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True, "n": 3}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(5, read=0.3))
    assert server.idle(), "the disconnected request still holds KV rows"
    assert httpx.get(server.url + "/health").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_requests_then_exits():
    """`expertyard serve` as users run it: SIGTERM lets a running stream finish, then the process exits 0."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "expertyard.entrypoints.cli", "serve", "--port", str(port),
                             "--max-model-len", "512", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_serving_reports_throughput_and_percentiles(server, capsys):
    from expertyard.entrypoints.cli import main

    assert main(["bench", "serving", "--url", server.url, "--api-key", KEY, "--concurrency", "1,4",
                 "--num-requests", "4", "--input-len", "8", "--output-len", "5", "--json"]) == 0
    levels = json.loads(capsys.readouterr().out)["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    for lv in levels:
        assert lv["requests"] == 4 and lv["errors"] == 0 and lv["output_tokens_per_s"] > 0
        assert 0 < lv["ttft_p50_ms"] <= lv["ttft_p99_ms"] and 0 < lv["tpot_p50_ms"] <= lv["tpot_p99_ms"]
    assert server.idle()
