"""POST /v1/chat/completions: messages (and tools) through the model's chat template, streaming or not; answers
constrained by `response_format` or `tools`, the latter returned as OpenAI `tool_calls`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from expertyard.server.protocol import APIError, ChatCompletionRequest
from expertyard.server.serving import (EngineStream, Generation, ServerState, StreamTally, sampling_params, sse,
                                       usage, visible_updates)
from expertyard.structured.tools import parse_tool_calls


async def create_chat_completion(req: ChatCompletionRequest, state: ServerState, request: Request):
    state.check_model(req.model)
    if state.tokenizer is None:
        raise APIError("this model has no tokenizer, so no chat template: use /v1/completions with token ids",
                       param="messages")
    messages = [m.template_dict() for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tool_mode is not None else None
    grammar = await state.formats.constraint(req)
    ids = (await state.encode([messages], tools))[0]
    max_tokens = state.check_prompt(ids, req.token_limit, param="messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    gen = request.state.generation = Generation(state, "chat")
    await gen.start([(ids, sampling_params(req, max_tokens, i, top, grammar)) for i in range(req.n)])
    if req.stream and req.tool_mode is None:
        return EngineStream(_stream(req, state, gen, len(ids)), gen)
    finals = await gen.collect(request)
    choices = [{"index": u.index, **_message(req, u),
                "logprobs": _logprobs(state, u.logprobs) if req.logprobs else None,
                **({"token_ids": u.token_ids} if req.return_token_ids else {})}
               for u in finals]
    if req.stream:  # tool calls are parsed from the whole answer: one chunk per choice, then the end
        completion_tokens = sum(u.num_output_tokens for u in finals)
        return EngineStream(_replay(req, state, gen, choices, usage(len(ids), completion_tokens)), gen)
    return JSONResponse({"id": f"chatcmpl-{gen.id}", "object": "chat.completion", "created": gen.created,
                         "model": state.model_name, "choices": choices,
                         "usage": usage(len(ids), sum(u.num_output_tokens for u in finals))})


async def _stream(req: ChatCompletionRequest, state: ServerState, gen: Generation, prompt_tokens: int):
    tally = StreamTally()

    def chunk(choices, usage_=None):
        return sse({"id": f"chatcmpl-{gen.id}", "object": "chat.completion.chunk", "created": gen.created,
                    "model": state.model_name, "choices": choices, **({"usage": usage_} if usage_ else {})})

    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(gen.streams))])
        async for u, text in visible_updates(gen, req.stop, bool(req.return_token_ids or req.logprobs), tally):
            choice = {"index": u.index, "delta": {"content": text} if text else {},
                      "logprobs": _logprobs(state, u.logprobs) if req.logprobs else None,
                      "finish_reason": u.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = u.token_ids
            yield chunk([choice])
        if tally.error:
            yield sse(APIError(tally.error, status=500).body())
        elif req.include_usage:
            yield chunk([], usage(prompt_tokens, tally.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        state.engine.abort(gen.streams)


def _message(req: ChatCompletionRequest, u) -> dict:
    """{"message": ..., "finish_reason": ...}; with tools in play, the answer's calls as `tool_calls`."""
    if req.tool_mode is None:
        return {"message": {"role": "assistant", "content": u.text}, "finish_reason": u.finish_reason}
    content, calls = parse_tool_calls(u.text)
    finish = "tool_calls" if calls and u.finish_reason == "stop" else u.finish_reason
    return {"message": {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})},
            "finish_reason": finish}


async def _replay(req: ChatCompletionRequest, state: ServerState, gen: Generation, choices: list[dict],
                  usage_: dict):
    """A finished answer with tool calls as a stream: the role, the content and calls, the finish reason."""
    def chunk(choices_, usage_=None):
        return sse({"id": f"chatcmpl-{gen.id}", "object": "chat.completion.chunk", "created": gen.created,
                    "model": state.model_name, "choices": choices_, **({"usage": usage_} if usage_ else {})})

    for c in choices:
        msg = c["message"]
        yield chunk([{"index": c["index"], "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
        delta = {"content": msg["content"]} if msg["content"] else {}
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(msg["tool_calls"])]
        yield chunk([{"index": c["index"], "delta": delta, "logprobs": c["logprobs"], "finish_reason": None}])
        yield chunk([{"index": c["index"], "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}])
    if req.include_usage:
        yield chunk([], usage_)
    yield "data: [DONE]\n\n"


def _logprobs(state: ServerState, entries: list[dict]) -> dict:
    def item(token: int, logprob: float) -> dict:
        s = state.token_str(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, v) for t, v in e["top"]]}
                        for e in entries]}
