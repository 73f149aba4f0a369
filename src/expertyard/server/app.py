"""The FastAPI app: routes, the API key and body-size guard, and OpenAI-style errors for everything."""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from expertyard.engine.llm_engine import LLMEngine
from expertyard.server.async_engine import AsyncEngine, deployment_down
from expertyard.server.chat import create_chat_completion
from expertyard.server.completions import create_completion
from expertyard.server.metrics import Metrics
from expertyard.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from expertyard.server.serving import ClientGone, ServerState

log = logging.getLogger("expertyard.server")
access_log = logging.getLogger("expertyard.server.access")


def configure_logging(level: str) -> None:
    """Print the server's log records (the access lines at info) on stderr, at `level` (`--log-level`)."""
    logger = logging.getLogger("expertyard")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False

DEFAULT_MAX_BODY = 16 * 2**20  # a batch of 1024 lm-eval prompts of ~2k token ids fits


def build_app(engine: LLMEngine, model_name: str, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY) -> FastAPI:
    """One server for one engine; the engine thread runs from startup to shutdown of the app."""
    if engine.tokenizer is not None:  # prompts may be longer than the tokenizer's nominal model_max_length: no warning
        engine.tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    metrics = Metrics(engine, model_name)
    aengine = AsyncEngine(engine, on_step=metrics.on_step)
    state = ServerState.create(aengine, metrics, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        log.info("serving %s (max_model_len %d, max_num_seqs %d)", model_name, engine.max_model_len,
                 engine.config.max_num_seqs)
        yield
        aengine.stop()  # uvicorn has waited for in-flight requests (or its graceful-shutdown timeout) by now

    app = FastAPI(title="expertyard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        metrics.error(e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        metrics.error(e.status_code)
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(APIError(f"{request.method} {request.url.path}: {e.detail}", e.status_code,
                                     code=code).body(), status_code=e.status_code)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it; the request was aborted

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        metrics.error(500)  # starlette re-raises it after this answer, and uvicorn logs the traceback
        return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", 500).body(), status_code=500)

    @app.get("/health")
    async def health():
        if not aengine.alive:
            return JSONResponse(APIError("the engine is not running", 503).body(), status_code=503)
        if (down := deployment_down(engine)) is not None:
            return JSONResponse(APIError(f"the deployment is down: {down}", 503, code="deployment_down").body(),
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "expertyard", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await _json(request))
        return await create_completion(req, state, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await _json(request))
        return await create_chat_completion(req, state, request)

    started = time.time()
    return app


def _log_access(scope, status: int, seconds: float) -> None:
    """`127.0.0.1:5000 "POST /v1/completions" 200 prompt_tokens=5 completion_tokens=16 0.123 s`"""
    if not access_log.isEnabledFor(logging.INFO):
        return
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    gen = scope.get("state", {}).get("generation")
    tokens = ""
    if gen is not None and gen.streams:
        prompt = sum(s.seq.num_prompt_tokens for s in gen.streams)
        tokens = f" prompt_tokens={prompt} completion_tokens={sum(len(s.seq.output_token_ids) for s in gen.streams)}"
    access_log.info('%s "%s %s" %d%s %.3f s', who, scope["method"], scope["path"], status, tokens, seconds)


async def _json(request: Request):
    body = await request.body()
    if not body:
        raise APIError("the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None


class Guard:
    """ASGI middleware: bearer-key check on /v1/*, a cap on the body size (read here, then replayed), and one
    access log line per request once its answer is sent."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                _log_access(scope, status[0], time.perf_counter() - start)

        try:
            await self._guarded(scope, receive, logged_send)
        except Exception:
            _log_access(scope, 500, time.perf_counter() - start)
            raise

    async def _guarded(self, scope, receive, send):
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                return await self._error(send, APIError("missing or wrong API key: send 'Authorization: Bearer "
                                                        "KEY'", 401, code="invalid_api_key"))
        too_big = APIError(f"the request body is larger than this server's limit of {self.max_body} bytes", 413,
                           code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await self._error(send, APIError("the Content-Length header is not a number"))
        if length is not None and int(length) > self.max_body:
            return await self._error(send, too_big)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body was sent
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self._error(send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay, send)

    async def _error(self, send, e: APIError) -> None:
        self.metrics.error(e.status)
        await JSONResponse(e.body(), status_code=e.status)({"type": "http"}, None, send)
