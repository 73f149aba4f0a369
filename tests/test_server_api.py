"""The OpenAI-compatible server on the bundled model: the official openai client (completions and chat, streamed
and not), echo + logprobs for lm-eval, metrics, and a 4xx OpenAI-style error for every kind of bad input."""

from __future__ import annotations

import json
import math
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from servers import KEY, MAX_MODEL_LEN, RunningServer, make_engine  # noqa: E402

from expertyard.engine.sampling_params import SamplingParams  # noqa: E402


@pytest.fixture(scope="module", params=["sync", "async"])
def server(request, bundled_server):
    """Every API test runs against an engine with async scheduling off (the session's shared server), then on (the
    reference is synchronous)."""
    if request.param == "sync":
        yield bundled_server
        return
    s = RunningServer(make_engine(async_scheduling=True))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(bundled_engine):
    """Each prompt generated alone by a separate LLMEngine: what the server must return (greedy)."""
    engine = bundled_engine(max_num_seqs=1)
    cache: dict = {}

    def get(prompt, max_tokens: int = 16, **kw):
        key = (str(prompt), max_tokens, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, **kw))[0]
        return cache[key]

    get.engine = engine
    return get


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-moe"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_is_the_engines_greedy_output(client, reference):
    out = client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=16, temperature=0)
    ref = reference("Once upon a time")
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.num_prompt_tokens and out.usage.completion_tokens == 16


def test_streamed_completion_equals_the_whole_one(client, reference):
    chunks = list(client.completions.create(model="tiny-moe", prompt="The king said", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference("The king said", 24).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices


def test_stop_string_cuts_the_text_streamed_or_not(client, reference):
    ref = reference("Once upon a time", 48)
    stop = ref.text[10:14]  # a string the greedy output contains
    whole = client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=48, temperature=0,
                                      stop=[stop])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-moe", prompt="Once upon a time", max_tokens=48, temperature=0, stop=stop, stream=True))
    assert whole.choices[0].text == ref.text[:ref.text.find(stop)] == streamed
    assert whole.choices[0].finish_reason == "stop"


def test_chat_streamed_and_not(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    ref = reference(messages, 20)
    out = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_n_and_seed_reproduce_samples(client):
    kw = dict(model="tiny-moe", prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # different seeds per choice
    chat = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=8, temperature=1.0, seed=3)
    assert len(chat.choices) == 2


def test_logprobs_of_generated_tokens(client, reference):
    out = client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=6, temperature=0,
                                    logprobs=3)
    lp = out.choices[0].logprobs
    ref = reference("Once upon a time", 6, logprobs=3)
    assert len(lp.tokens) == 6 and all(len(t) >= 3 for t in lp.top_logprobs)
    assert lp.token_logprobs == pytest.approx([e["logprob"] for e in ref.logprobs], abs=1e-4)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):  # greedy: chosen is the top one
        assert value == max(top.values()) and top[token] == value


def test_echo_logprobs_score_the_prompt_like_lm_eval(client, reference):
    """lm-eval's local-completions loglikelihood: token-id prompts, echo, logprobs=1, max_tokens 0 (or 1)."""
    engine = reference.engine
    ctx, cont = engine.encode("Once upon a time"), engine.encode(" there was a dog")
    ids = ctx + cont
    expected = engine.score(ids).tolist()
    for max_tokens in (0, 1):
        out = client.completions.create(model="tiny-moe", prompt=[ids, ctx], max_tokens=max_tokens, echo=True,
                                        logprobs=1, temperature=0)
        choice = sorted(out.choices, key=lambda c: c.index)[0]
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
        tail = lp.token_logprobs[len(ctx):len(ids)]  # what lm-eval sums for the continuation
        assert sum(tail) == pytest.approx(sum(expected[len(ctx) - 1:]), abs=1e-3)
        greedy = all(v == max(t.values()) for v, t in zip(tail, lp.top_logprobs[len(ctx):len(ids)]))
        assert isinstance(greedy, bool)
        assert choice.text.startswith("Once upon a time there was a dog")
        assert out.usage.prompt_tokens == len(ids) + len(ctx)


def test_api_key_is_required(server):
    body = {"prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # /health and /metrics stay open


def _long_prompt() -> list[int]:
    return [100] * MAX_MODEL_LEN


BAD = [  # (name, endpoint, raw body or JSON, status, param, words in the message)
    ("invalid json", "completions", b'{"prompt": "x",', 400, None, "not valid JSON"),
    ("empty body", "completions", b"", 400, None, "empty"),
    ("not an object", "completions", [1, 2], 400, None, "JSON object"),
    ("missing prompt", "completions", {"max_tokens": 3}, 400, "prompt", "required"),
    ("missing messages", "chat/completions", {"max_tokens": 3}, 400, "messages", "required"),
    ("mistyped prompt", "completions", {"prompt": 5}, 400, "prompt", "prompt must be"),
    ("mistyped max_tokens", "completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("mistyped stream", "completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "boolean"),
    ("zero max_tokens", "completions", {"prompt": "x", "max_tokens": 0}, 400, None, "echo"),
    ("negative max_tokens", "completions", {"prompt": "x", "max_tokens": -2}, 400, "max_tokens", "greater"),
    ("zero chat max_tokens", "chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     400, "max_tokens", "greater"),
    ("max_tokens past context", "completions", {"prompt": "x", "max_tokens": 5000}, 400, "max_tokens",
     "max_model_len"),
    ("prompt too long", "completions", {"prompt": _long_prompt(), "max_tokens": 1}, 400, "prompt", "max_model_len"),
    ("chat prompt too long", "chat/completions",
     {"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 1}, 400, "messages", "max_model_len"),
    ("empty prompt", "completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("token out of vocab", "completions", {"prompt": [1, 10**6]}, 400, "prompt", "token ids"),
    ("unknown model", "completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "gpt-4"),
    ("unknown chat model", "chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
     404, "model", "gpt-4"),
    ("nan temperature", "completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    ("infinite temperature", "completions", b'{"prompt": "x", "temperature": Infinity}', 400, "temperature", "finite"),
    ("negative temperature", "completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature", "greater"),
    ("top_p zero", "completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "greater"),
    ("n zero", "completions", {"prompt": "x", "n": 0}, 400, "n", "greater"),
    ("n too big", "completions", {"prompt": "x", "n": 1000}, 400, "n", "less"),
    ("empty stop", "completions", {"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ("too many logprobs", "completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "less"),
    ("bad role", "chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "role"),
    ("no messages", "chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("penalty", "completions", {"prompt": "x", "presence_penalty": 1.0}, 400, None, "presence_penalty"),
    ("huge seed", "completions", {"prompt": "x", "seed": 2**70}, 400, "seed", "less"),
    ("unknown field", "completions", {"prompt": "x", "foo": 1}, 400, "foo", "unknown field"),
    ("unknown chat field", "chat/completions", {"messages": [{"role": "user", "content": "x"}], "foo": 1}, 400, "foo",
     "unknown field"),
    ("unknown message field", "chat/completions", {"messages": [{"role": "user", "content": "x", "foo": 1}]}, 400,
     "messages", "unknown field"),
    ("null content", "chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages",
     "content"),
    ("tool message without id", "chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages", "tool_call_id"),
    ("auto tools on a template without them", "chat/completions", {"messages": [{"role": "user", "content": "x"}],
     "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice", "template"),
    ("repetition penalty", "completions", {"prompt": "x", "repetition_penalty": 1.2}, 400, None,
     "repetition_penalty"),
]


@pytest.mark.parametrize("name,endpoint,body,status,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(server, name, endpoint, body, status, param, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}/v1/{endpoint}", headers={"Authorization": f"Bearer {KEY}",
                                                           "Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and words.lower() in err["message"].lower(), err


def test_null_max_tokens_means_the_default(client):
    """OpenAI clients send "max_tokens": null for "not set": 16 on /v1/completions, the rest of the context on chat."""
    out = client.completions.create(model="tiny-moe", prompt="Once upon a time", temperature=0, max_tokens=None,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
    out = client.completions.create(model="tiny-moe", prompt="Once upon a time", temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16


def test_each_request_gets_one_access_line(server, client, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="expertyard.server.access"):
        client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=5, temperature=0)
        list(client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0, stream=True))
        httpx.post(server.url + "/v1/completions", json={"prompt": "x", "foo": 1},
                   headers={"Authorization": f"Bearer {KEY}"})
        assert server.idle()
        deadline = time.time() + 5
        while len(caplog.records) < 3 and time.time() < deadline:
            time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "expertyard.server.access"]
    assert len(lines) == 3, lines
    prompt_tokens = len(server.engine.encode("Once upon a time"))
    assert '"POST /v1/completions" 200' in lines[0]
    assert f"prompt_tokens={prompt_tokens} completion_tokens=5" in lines[0] and lines[0].endswith(" s")
    assert '"POST /v1/chat/completions" 200' in lines[1] and "completion_tokens=3" in lines[1]
    assert '"POST /v1/completions" 400' in lines[2] and "tokens" not in lines[2]


def test_oversized_body_and_wrong_method(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * 100_000}, headers=headers)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted while it is read
        for _ in range(100):
            yield b" " * 1024

    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers=headers)
    assert r.status_code == 413
    r = httpx.get(server.url + "/v1/completions", headers=headers)
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(server.url + "/v2/nothing").status_code == 404


def test_server_keeps_serving_after_bad_input(server, client, reference):
    test_completion_is_the_engines_greedy_output(client, reference)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'expertyard_request_errors_total{model_name="tiny-moe",status="400"}' in metrics
    assert server.idle()


def test_metrics(server, client):
    client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=8, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = _metrics(text)
    for name in ("expertyard_prompt_tokens_total", "expertyard_generation_tokens_total",
                 "expertyard_time_to_first_token_seconds_count", "expertyard_time_per_output_token_seconds_count",
                 "expertyard_e2e_request_latency_seconds_count"):
        assert values[name] > 0, name
    assert values['expertyard_requests_total{endpoint="completions",finish_reason="length"'] >= 1
    assert values["expertyard_num_requests_running"] == 0 and values["expertyard_num_requests_waiting"] == 0


def _metrics(text: str) -> dict[str, float]:
    """'name{labels}' -> value, with the model_name label dropped from the key."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            key = key.replace('model_name="tiny-moe"', "").replace("{}", "").replace(",}", "").replace("{,", "{")
            out[key.rstrip("}") if "{" in key else key] = float(value)
    return out


def test_offloaded_backend_reports_expert_cache_metrics():
    """`expertyard serve --offload` on CPU: expert cache hits, misses and bytes copied on /metrics."""
    from expertyard.entrypoints.cli import build_parser
    from expertyard.entrypoints.common import engine_from_args

    args = build_parser().parse_args(["serve", "--device", "cpu", "--offload", "--expert-cache-fraction", "0.5",
                                      "--max-num-seqs", "4", "--max-model-len", "128", "--json"])
    s = RunningServer(engine_from_args(args), api_key=None)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        out = c.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert out.usage.completion_tokens == 8
        values = _metrics(httpx.get(s.url + "/metrics").text)
        assert values["expertyard_expert_cache_misses_total"] > 0 and values["expertyard_expert_cache_hits_total"] > 0
        assert values["expertyard_expert_cache_bytes_copied_total"] > 0
        assert not math.isnan(values["expertyard_expert_cache_slots"])
    finally:
        s.stop()


def test_warmup_runs_every_step_size_and_leaves_the_engine_idle():
    from expertyard.server.warmup import warm_up, warmup_sizes

    sizes = warmup_sizes(2048)
    assert sizes[:4] == [1, 2, 3, 4] and sizes[-1] == 2048
    assert all(b - a == 1 or b / a <= 1.34 for a, b in zip(sizes, sizes[1:]))
    engine = make_engine(max_num_seqs=4, max_model_len=48)
    shapes, step = [], engine.step

    def recording_step():
        out = step()
        shapes.append((len(engine.last_step.prefills), len(engine.last_step.decodes)))
        return out

    engine.step = recording_step
    assert warm_up(engine) > 0
    assert not engine.has_unfinished() and len(engine.scheduler.free_slots) == 4
    # the compositions of a loaded server: every slot prefilling at once, and prompts beside running decodes
    assert (4, 0) in shapes
    assert any(p >= 1 and d >= 1 for p, d in shapes)


@pytest.mark.parametrize("endpoint,body", [
    ("completions", {"prompt": "Once upon a time"}),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
])
def test_engine_error_mid_stream_reaches_the_client_and_the_server_goes_on(endpoint, body):
    engine = make_engine()
    s = RunningServer(engine)
    step, calls = engine.step, {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated device fault")
        return step()

    engine.step = failing_step
    try:
        events = []
        with httpx.stream("POST", f"{s.url}/v1/{endpoint}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                          json={"model": "tiny-moe", "max_tokens": 32, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}, **body}) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        assert any(p.get("choices") for p in payloads[:-1])  # text streamed before the fault
        assert "simulated device fault" in payloads[-1]["error"]["message"]  # the fault, not a usage chunk
        assert not any("usage" in p for p in payloads)
        assert s.idle()
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)  # the server keeps serving
        assert c.completions.create(model="tiny-moe", prompt="Hi", max_tokens=4, temperature=0).usage.completion_tokens == 4
    finally:
        s.stop()
