"""POST /v1/completions: prompts (text or token ids, batched), n, echo and logprobs (lm-eval's loglikelihood
sends echo=true, logprobs=1 with max_tokens 0 or 1 and reads the prompt's token_logprobs), streaming or not."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from expertyard.server.protocol import APIError, CompletionRequest
from expertyard.server.serving import (EngineStream, Generation, ServerState, StreamTally, sampling_params, sse,
                                       usage, visible_updates)


async def create_completion(req: CompletionRequest, state: ServerState, request: Request):
    state.check_model(req.model)
    ids_list = await state.encode(req.prompt)
    max_tokens = [state.check_prompt(ids, req.max_tokens) for ids in ids_list]
    engine = state.engine.engine
    echo_entries = None
    if req.echo and req.logprobs is not None:
        top = req.logprobs
        echo_entries = await state.engine.call(lambda: [_prompt_entries(engine, ids, top) for ids in ids_list])
    grammar = await state.formats.constraint(req) if req.max_tokens else None
    gen = request.state.generation = Generation(state, "completions")
    if req.max_tokens == 0:  # score the prompts only
        state.metrics.prompt_tokens.inc(sum(map(len, ids_list)))
        state.metrics.requests.labels(state.model_name, "completions", "length").inc(len(ids_list) * req.n)
        finals = [None] * (len(ids_list) * req.n)
    else:
        await gen.start([(ids, sampling_params(req, mt, i, req.logprobs, grammar))
                         for ids, mt in zip(ids_list, max_tokens) for i in range(req.n)])
        if req.stream:
            return EngineStream(_stream(req, state, gen), gen)
        finals = await gen.collect(request)

    choices, completion_tokens = [], 0
    for index, u in enumerate(finals):
        p = index // req.n
        text, entries = (u.text, u.logprobs) if u is not None else ("", [])
        prompt_text = ""
        if req.echo:
            prompt_text = req.prompt[p] if isinstance(req.prompt[p], str) else state.decode(ids_list[p])
            entries = (echo_entries[p] if echo_entries is not None else []) + entries
        choice = {"index": index, "text": prompt_text + text,
                  "logprobs": _logprobs(state, entries, 0) if req.logprobs is not None else None,
                  "finish_reason": u.finish_reason if u is not None else "length"}
        if req.return_token_ids:
            choice["prompt_token_ids"] = ids_list[p]
            choice["token_ids"] = u.token_ids if u is not None else []
        choices.append(choice)
        completion_tokens += u.num_output_tokens if u is not None else 0
    return JSONResponse({"id": f"cmpl-{gen.id}", "object": "text_completion", "created": gen.created,
                         "model": state.model_name, "choices": choices,
                         "usage": usage(sum(map(len, ids_list)), completion_tokens)})


async def _stream(req: CompletionRequest, state: ServerState, gen: Generation):
    offsets = [0] * len(gen.streams)
    tally = StreamTally()

    def chunk(choices, usage_=None):
        return sse({"id": f"cmpl-{gen.id}", "object": "text_completion", "created": gen.created,
                    "model": state.model_name, "choices": choices, **({"usage": usage_} if usage_ else {})})

    try:
        wants_tokens = bool(req.return_token_ids or req.logprobs is not None)
        async for u, text in visible_updates(gen, req.stop, wants_tokens, tally):
            lp = None
            if req.logprobs is not None:
                lp = _logprobs(state, u.logprobs, offsets[u.index])
                offsets[u.index] += sum(len(t) for t in lp["tokens"])
            choice = {"index": u.index, "text": text, "logprobs": lp, "finish_reason": u.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = u.token_ids
            yield chunk([choice])
        if tally.error:
            yield sse(APIError(tally.error, status=500).body())
        elif req.include_usage:
            prompt_tokens = sum(s.seq.num_prompt_tokens for s in gen.streams[::req.n])
            yield chunk([], usage(prompt_tokens, tally.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        state.engine.abort(gen.streams)


def _prompt_entries(engine, ids: list[int], top: int) -> list[dict]:
    """Echoed prompt tokens as logprob entries: the first has none (nothing predicts it)."""
    chosen, top_v, top_i = (t.tolist() for t in engine.prompt_logprobs(ids, top))
    return [{"token": ids[0], "logprob": None, "top": None}] + [
        {"token": ids[j + 1], "logprob": chosen[j], "top": list(zip(top_i[j], top_v[j]))} for j in range(len(chosen))]


def _logprobs(state: ServerState, entries: list[dict], offset: int) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs (the top ones and the chosen one),
    text_offset."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        s = state.token_str(e["token"])
        tokens.append(s)
        token_logprobs.append(e["logprob"])
        if e["top"] is None:
            top_logprobs.append(None)
        else:
            top = {state.token_str(t): v for t, v in e["top"]}
            top.setdefault(s, e["logprob"])
            top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}
