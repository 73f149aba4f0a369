"""OpenAI-compatible HTTP server: FastAPI routes over one engine thread (see docs/serving.md).

    app.py           routes, API key and body-size guard, OpenAI-style errors
    async_engine.py  the engine thread: commands between steps, per-request queues of new tokens
    completions.py   /v1/completions (echo, logprobs, batched prompts)
    chat.py          /v1/chat/completions
    serving.py       what both share: context checks, sampling parameters, metrics per request, text deltas
    formats.py       response_format and tools as grammars for the engine (expertyard.structured)
    protocol.py      request bodies (pydantic, strict) and the error shape
    metrics.py       Prometheus metrics
"""

from expertyard.server.app import build_app

__all__ = ["build_app"]
