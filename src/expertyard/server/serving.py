"""What completions and chat share: checking prompts against the context, sampling parameters, running a
request's sequences through the engine (with metrics and abort on disconnect), text deltas, logprobs."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import StreamingResponse

from expertyard.engine.sampling_params import SamplingParams
from expertyard.errors import RequestError
from expertyard.server.async_engine import AsyncEngine, Stream, Update
from expertyard.server.formats import Formats
from expertyard.server.metrics import Metrics
from expertyard.server.protocol import APIError


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


@dataclass
class ServerState:
    engine: AsyncEngine
    metrics: Metrics
    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: object | None  # a copy for this thread: the engine thread's is never shared
    formats: Formats  # response_format and tools as grammars
    _token_str: dict[int, str] = field(default_factory=dict)

    @classmethod
    def create(cls, engine: AsyncEngine, metrics: Metrics, model_name: str) -> ServerState:
        e = engine.engine
        tok = copy.deepcopy(e.tokenizer) if e.tokenizer is not None else None
        vocab = e.model_config.vocab_size
        return cls(engine, metrics, model_name, e.max_model_len, vocab, tok, Formats(tok, vocab, e.eos_token_ids))

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           status=404, param="model", code="model_not_found")

    def token_str(self, token_id: int) -> str:
        if (s := self._token_str.get(token_id)) is None:
            s = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"
            self._token_str[token_id] = s
        return s

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    async def encode(self, prompts: list, tools: list[dict] | None = None) -> list[list[int]]:
        """Strings, token ids or chat messages -> token ids, on the engine thread (which owns the tokenizer);
        `tools` go to the chat template."""
        engine = self.engine.engine
        if engine.tokenizer is None and any(not isinstance(p, list) or (p and isinstance(p[0], dict))
                                            for p in prompts):
            raise APIError("this model has no tokenizer: send prompts as token ids", param="prompt")
        param = "messages" if prompts and isinstance(prompts[0], list) and prompts[0] and \
            isinstance(prompts[0][0], dict) else "prompt"
        try:
            if tools:
                return await self.engine.call(lambda: [_encode_chat(engine.tokenizer, p, tools) for p in prompts])
            return await self.engine.call(lambda: [engine.encode(p) for p in prompts])
        except RequestError as e:
            raise APIError(str(e), param=param) from None
        except APIError:  # the deployment is down (503)
            raise
        except Exception as e:  # the tokenizer or chat template refused this input (e.g. roles out of order)
            if not self.engine.alive:
                raise
            raise APIError(f"could not tokenize the {param}: {type(e).__name__}: {e}", param=param) from None

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str = "prompt") -> int:
        """Validate one prompt against the context; returns max_tokens (default: the rest of the context)."""
        n, limit = len(ids), self.max_model_len
        if n == 0:
            raise APIError("the prompt is empty", param=param)
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise APIError(f"prompt token ids must be in 0..{self.vocab_size - 1}", param=param)
        if max_tokens == 0:  # echo only: the prompt is scored, nothing generated
            if n > limit:
                raise APIError(f"the prompt has {n} tokens; this server's max_model_len is {limit}", param=param,
                               code="context_length_exceeded")
            return 0
        if n >= limit:
            raise APIError(f"the prompt has {n} tokens; this server's max_model_len is {limit}, which must leave "
                           "room for at least one generated token", param=param, code="context_length_exceeded")
        if max_tokens is None:
            return limit - n
        if n + max_tokens > limit:
            raise APIError(f"max_tokens={max_tokens} plus the prompt's {n} tokens exceed this server's "
                           f"max_model_len of {limit}; ask for at most {limit - n}", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens


def _encode_chat(tokenizer, messages: list[dict], tools: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def sampling_params(req, max_tokens: int, index: int, logprobs: int | None, grammar=None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              seed=None if req.seed is None else req.seed + index, stop=list(req.stop),
                              ignore_eos=req.ignore_eos, logprobs=logprobs, grammar=grammar)
    except RequestError as e:
        raise APIError(str(e)) from None


class Generation:
    """The sequences of one request in the engine: their updates in arrival order, metrics, abort at exit."""

    def __init__(self, state: ServerState, endpoint: str):
        self.state, self.endpoint = state, endpoint
        self.arrival = time.perf_counter()
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.streams: list[Stream] = []
        self._first: dict[int, float] = {}

    async def start(self, requests: list[tuple[list[int], SamplingParams]]) -> None:
        try:
            self.streams, self.queue = await self.state.engine.add(requests)
        except RequestError as e:
            raise APIError(str(e)) from None
        self.state.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in requests))

    async def updates(self):
        """Every update of every sequence until all finished; aborts the rest if the consumer goes away."""
        remaining = len(self.streams)
        try:
            while remaining:
                u: Update = await self.queue.get()
                self._observe(u)
                if u.finish_reason is not None:
                    remaining -= 1
                yield u
        finally:
            self.state.engine.abort(self.streams)
            if remaining:  # the client went away (or the server is stopping)
                m = self.state.metrics
                m.requests.labels(m.model_name, self.endpoint, "abort").inc(remaining)

    async def collect(self, request: Request) -> list[Update]:
        """Wait for all sequences, merged into one final Update each; abort if the client disconnects."""
        async def drain():
            final: dict[int, Update] = {}
            async for u in self.updates():
                if u.error:
                    raise APIError(u.error, status=500)
                prev = final.get(u.index)
                if prev is not None:
                    u.token_ids, u.logprobs = prev.token_ids + u.token_ids, prev.logprobs + u.logprobs
                final[u.index] = u
            return [final[i] for i in range(len(self.streams))]

        work, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            gone.cancel()
            return work.result()
        work.cancel()
        try:
            await work
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientGone()

    def _observe(self, u: Update) -> None:
        now, m = time.perf_counter(), self.state.metrics
        if u.index not in self._first and u.num_output_tokens > 0:
            self._first[u.index] = now
            m.ttft.observe(now - self.arrival)
        if u.finish_reason is not None:
            m.requests.labels(m.model_name, self.endpoint, u.finish_reason).inc()
            m.e2e.observe(now - self.arrival)
            if u.num_output_tokens > 1 and u.index in self._first:
                m.tpot.observe((now - self._first[u.index]) / (u.num_output_tokens - 1))


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class TextDelta:
    """Text to send for a stream: holds back what could still turn out to be the start of a stop string, and
    a trailing incomplete UTF-8 character."""

    def __init__(self, stops: list[str]):
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def next(self, text: str, finished: bool) -> str:
        end = len(text)
        if not finished:
            end -= self.hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta


class StreamTally:
    """What a finished stream reports after its chunks: output tokens counted, or the engine's error."""

    def __init__(self):
        self.completion_tokens = 0
        self.error: str | None = None


async def visible_updates(gen: Generation, stops: list[str], wants_tokens: bool, tally: StreamTally):
    """(update, text delta) for every update a stream must show: new text, a finish, or new tokens when the
    client asked for token ids or logprobs. Stops early on an engine error (left in `tally.error`)."""
    deltas = [TextDelta(stops) for _ in gen.streams]
    async for u in gen.updates():
        if u.error:
            tally.error = u.error
            return
        tally.completion_tokens += len(u.token_ids)
        text = deltas[u.index].next(u.text, u.finish_reason is not None)
        if text or u.finish_reason or (u.token_ids and wants_tokens):
            yield u, text


class EngineStream(StreamingResponse):
    """An SSE response that aborts its request's sequences however it ends: also when the client left before
    the body generator ever started (then its own `finally` never runs)."""

    def __init__(self, content, gen: Generation):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.state.engine.abort(self.gen.streams)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

