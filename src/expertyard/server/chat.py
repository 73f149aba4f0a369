"""POST /v1/chat/completions: messages through the model's chat template, streaming or not."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from expertyard.server.protocol import APIError, ChatCompletionRequest
from expertyard.server.serving import (EngineStream, Generation, ServerState, StreamTally, sampling_params, sse,
                                       usage, visible_updates)


async def create_chat_completion(req: ChatCompletionRequest, state: ServerState, request: Request):
    state.check_model(req.model)
    if state.tokenizer is None:
        raise APIError("this model has no tokenizer, so no chat template: use /v1/completions with token ids",
                       param="messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    ids = (await state.encode([messages]))[0]
    max_tokens = state.check_prompt(ids, req.token_limit, param="messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    gen = Generation(state, "chat")
    await gen.start([(ids, sampling_params(req, max_tokens, i, top)) for i in range(req.n)])
    if req.stream:
        return EngineStream(_stream(req, state, gen, len(ids)), gen)
    finals = await gen.collect(request)
    choices = [{"index": u.index, "message": {"role": "assistant", "content": u.text},
                "logprobs": _logprobs(state, u.logprobs) if req.logprobs else None,
                "finish_reason": u.finish_reason, **({"token_ids": u.token_ids} if req.return_token_ids else {})}
               for u in finals]
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


def _logprobs(state: ServerState, entries: list[dict]) -> dict:
    def item(token: int, logprob: float) -> dict:
        s = state.token_str(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, v) for t, v in e["top"]]}
                        for e in entries]}
