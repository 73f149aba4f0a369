"""Structured outputs and tool calls (xgrammar) on the bundled model: the engine's masked greedy choice against an
independent matcher and the model's own logits, constrained and free requests in one batch (async scheduling too),
and the server through the official openai client, every constrained answer parsed and validated."""

from __future__ import annotations

import json

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from expertyard.engine.sampling_params import SamplingParams  # noqa: E402
from expertyard.structured import GrammarConstraint, Grammars  # noqa: E402
from expertyard.structured.tools import parse_tool_calls  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "bird"]}, "maxItems": 3},
    "happy": {"type": "boolean"}},
    "required": ["name", "age", "pets", "happy"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 12},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}


def validate(value, schema: dict, where: str = "$") -> None:
    """A JSON-schema check for the keywords used here (type, properties, required, additionalProperties, items,
    enum, maxLength, minimum, maximum, maxItems): raises AssertionError naming the first violation."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "number": (int, float)}
    kind = schema.get("type")
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
    elif kind is not None:
        assert isinstance(value, types[kind]) and not (kind == "number" and isinstance(value, bool)), \
            f"{where}: {value!r} is not of type {kind}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "maxLength" in schema:
        assert len(value) <= schema["maxLength"], f"{where}: {value!r} is longer than {schema['maxLength']}"
    if "minimum" in schema:
        assert value >= schema["minimum"], f"{where}: {value} < {schema['minimum']}"
    if "maximum" in schema:
        assert value <= schema["maximum"], f"{where}: {value} > {schema['maximum']}"
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{where}: required property {key!r} missing"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{where}: properties {set(value) - set(props)} not allowed"
        for key, v in value.items():
            if key in props:
                validate(v, props[key], f"{where}.{key}")
    if kind == "array":
        assert len(value) <= schema.get("maxItems", len(value)), f"{where}: more than {schema['maxItems']} items"
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{where}[{i}]")


@pytest.fixture(scope="module")
def engine(bundled_engine):
    return bundled_engine()


@pytest.fixture(scope="module")
def grammars(engine):
    return Grammars(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)


def allowed_tokens(compiled, tokens: list[int], vocab: int):
    """An independent matcher walked along `tokens`: before each, the [V] bool mask of the tokens the grammar
    allows there."""
    m = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    bits = torch.arange(32, dtype=torch.int32)
    for t in tokens:
        m.fill_next_token_bitmask(bitmask)
        yield ((bitmask[0][:, None] >> bits) & 1).flatten()[:vocab].bool()  # [V]
        assert m.accept_token(t), f"the grammar refused token {t}"


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_masked_greedy_is_the_argmax_over_the_tokens_the_grammar_allows(engine, grammars, async_scheduling):
    """Constrained and free requests in one batch: each constrained token is the model's most likely token among
    those an independent matcher allows (from the model's own logits, teacher-forced); the free request's output is
    what it is alone; the constrained answers parse and validate."""
    engine.config.async_scheduling = async_scheduling
    try:
        schema = grammars.json_schema(PERSON)
        tools = grammars.tool_calls([WEATHER, ADD], "required", parallel=False)
        prompts = ["Once upon a time", "The king said", "Tell me about the weather"]
        params = [SamplingParams(temperature=0, max_tokens=100, grammar=GrammarConstraint(schema)),
                  SamplingParams(temperature=0, max_tokens=20),
                  SamplingParams(temperature=0, max_tokens=100, grammar=GrammarConstraint(tools))]
        person, free, call = engine.generate(prompts, params)
        alone = engine.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=20))[0]
    finally:
        engine.config.async_scheduling = False
    assert free.output_token_ids == alone.output_token_ids
    for seq, compiled in ((person, schema), (call, tools)):
        assert seq.finish_reason == "stop", seq.text  # the grammar's end: EOS
        ids, out = seq.prompt_token_ids, seq.output_token_ids[:-1]  # the EOS is not part of the answer
        _, top_v, top_i = engine.prompt_logprobs(ids + out, top=engine.model_config.vocab_size)
        for j, (token, allowed) in enumerate(zip(out, allowed_tokens(compiled, out, engine.model_config.vocab_size))):
            logp = torch.full((engine.model_config.vocab_size,), float("-inf"))
            logp[top_i[len(ids) - 1 + j]] = top_v[len(ids) - 1 + j]
            best = int(logp.masked_fill(~allowed, float("-inf")).argmax())
            assert token == best, f"position {j}: {token} is not the best allowed token {best}"
    validate(json.loads(person.text), PERSON)
    content, calls = parse_tool_calls(call.text)
    assert content is None and len(calls) == 1
    schema_of = {"get_weather": WEATHER, "add": ADD}[calls[0]["function"]["name"]]["function"]["parameters"]
    validate(json.loads(calls[0]["function"]["arguments"]), schema_of)


def test_sampled_constrained_answers_validate(engine, grammars):
    """Temperature 1 with several seeds: the grammar holds for sampled tokens too."""
    compiled = grammars.json_schema(PERSON)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=80, grammar=GrammarConstraint(compiled))
              for s in range(4)]
    for seq in engine.generate(["Once upon a time"] * 4, params):
        assert seq.finish_reason == "stop", seq.text
        validate(json.loads(seq.text), PERSON)


def test_tool_call_text_parses_into_openai_tool_calls():
    text = 'Let me see.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me see."
    assert [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    cut = '<tool_call>\n{"name": "add", "arguments": {"a": 1'  # cut by max_tokens: stays text
    assert parse_tool_calls(cut) == (cut, [])


# ---- the server, through the official openai client ------------------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(bundled_server):
    return openai.OpenAI(base_url=bundled_server.url + "/v1", api_key=bundled_server.api_key, max_retries=0)


def test_json_schema_on_chat_and_completions(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chat = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "Who are you?"}],
                                          response_format=rf, max_tokens=80, temperature=0)
    assert chat.choices[0].finish_reason == "stop"
    validate(json.loads(chat.choices[0].message.content), PERSON)
    comp = client.completions.create(model="tiny-moe", prompt="Once upon a time", max_tokens=80, temperature=0.7,
                                     seed=3, n=2, extra_body={"response_format": rf})
    for c in comp.choices:
        assert c.finish_reason == "stop"
        validate(json.loads(c.text), PERSON)


def test_json_object_answers_are_json_objects(client):
    """Free-form JSON: the bundled model (stories and verse) seldom closes an object it opened, so an answer is
    either a complete object (seeds 0 and 4 here) or, cut by max_tokens, the start of one that an independent
    JSON grammar accepts."""
    out = client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "Give me JSON."}],
                                         response_format={"type": "json_object"}, max_tokens=40, temperature=1.0,
                                         seed=0, n=8)
    complete = 0
    for choice in out.choices:
        text = choice.message.content
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            complete += 1
        else:
            assert choice.finish_reason == "length" and text.startswith("{")
            assert _json_prefix(text), text
    assert complete >= 1


def _json_prefix(text: str) -> bool:
    """Does some JSON value start with `text`? (finish its open string and brackets, then parse)"""
    closers, in_str, esc = [], False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            closers.append("]" if ch == "[" else "}")
        elif ch in "]}":
            closers.pop()
    tail = text + ("n" if esc else "") + ('"' if in_str else "")
    for fill in ("", "null", ": null", '"": null', '"x": null', "0"):  # after a value, a colon, a comma, ...
        try:
            json.loads(tail + fill + "".join(reversed(closers)))
            return True
        except ValueError:
            continue
    return False


def test_named_and_required_tool_calls(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(model="tiny-moe", messages=messages, tools=[WEATHER, ADD],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=160, temperature=0)
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    required = client.chat.completions.create(model="tiny-moe", messages=messages, tools=[WEATHER, ADD],
                                              tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                                              temperature=0)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
        validate(json.loads(call.function.arguments), schema)

    # the call goes back as an assistant message with content null, then the tool's answer
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model="tiny-moe", messages=follow, tools=[WEATHER, ADD],
                                            tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"


def test_streamed_tool_call_equals_the_whole_one(client):
    kw = dict(model="tiny-moe", messages=[{"role": "user", "content": "Add two and three."}], tools=[ADD],
              tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == \
        [(tc.function.name, tc.function.arguments) for tc in whole.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    validate(json.loads(calls[0].function.arguments), ADD["function"]["parameters"])


def test_auto_tool_choice_needs_a_template_that_shows_the_tools(client, tool_template_server):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with pytest.raises(openai.BadRequestError) as e:  # the bundled ChatML template does not render tools
        client.chat.completions.create(model="tiny-moe", messages=messages, tools=[WEATHER], max_tokens=8)
    assert e.value.body["param"] == "tool_choice" and "template" in e.value.body["message"]

    c = openai.OpenAI(base_url=tool_template_server.url + "/v1", api_key=tool_template_server.api_key,
                      max_retries=0)
    with_tools = c.chat.completions.create(model="tiny-moe", messages=messages, tools=[WEATHER], max_tokens=24,
                                           temperature=0)
    without = c.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=24, temperature=0)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 20  # the template showed the tools
    choice = with_tools.choices[0]
    for call in choice.message.tool_calls or []:  # text, or calls that validate
        validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert choice.finish_reason in ("stop", "length", "tool_calls")


BAD = [  # (name, endpoint, JSON body, param, words in the message)
    ("unknown response_format", "chat/completions", {"response_format": {"type": "xml"}}, "response_format", "xml"),
    ("schema missing", "chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
     "response_format", "json_schema"),
    ("bad schema", "completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}},
     "response_format", "schema"),
    ("tool_choice names no tool", "chat/completions", {"tools": [ADD], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, None, "tool_choice"),
    ("tool_choice without tools", "chat/completions", {"tool_choice": "required"}, None, "tool_choice"),
    ("tools with json_object", "chat/completions", {"tools": [ADD], "tool_choice": "required",
                                                   "response_format": {"type": "json_object"}}, None, "tools"),
    ("unknown tool field", "chat/completions", {"tools": [{**ADD, "foo": 1}], "tool_choice": "required"}, "tools",
     "unknown field"),
]


@pytest.mark.parametrize("name,endpoint,body,param,words", BAD, ids=[b[0] for b in BAD])
def test_bad_formats_get_a_400_naming_the_field(bundled_server, name, endpoint, body, param, words):
    import httpx

    base = {"prompt": "x"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{bundled_server.url}/v1/{endpoint}", json={**base, "max_tokens": 4, **body},
                   headers={"Authorization": f"Bearer {bundled_server.api_key}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words.lower() in err["message"].lower(), err
