"""What a request asks its answer to look like (`response_format`, `tools` + `tool_choice`) as a grammar for the
engine (structured/), and a 400 naming the field for what cannot be served."""

from __future__ import annotations

import asyncio

from expertyard.errors import RequestError
from expertyard.server.protocol import APIError
from expertyard.structured import GrammarConstraint, Grammars
from expertyard.structured.tools import template_supports_tools


class Formats:
    """The server's grammar compiler (made at the first constrained request; compiled grammars are cached)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        self._args = (tokenizer, vocab_size, stop_token_ids)
        self._grammars: Grammars | None = None

    @property
    def grammars(self) -> Grammars:
        if self._grammars is None:
            self._grammars = Grammars(*self._args)
        return self._grammars

    async def constraint(self, req) -> GrammarConstraint | None:
        """The grammar for this request, or None when its answer is free text."""
        tokenizer = self._args[0]
        if tokenizer is None and (req.response_format or getattr(req, "tools", None)):
            raise APIError("this model has no tokenizer, so no structured outputs or tools", param="response_format")
        compile_ = _response_format(req.response_format, self)
        mode = getattr(req, "tool_mode", None)
        if mode is not None:
            if mode == "auto" and not template_supports_tools(tokenizer):
                raise APIError("tool_choice auto lets the model decide, but this model's chat template does not show "
                               "it the tools; use tool_choice required or name a function", param="tool_choice")
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            compile_ = lambda: self.grammars.tool_calls(tools, mode, req.parallel_tool_calls)  # noqa: E731
        if compile_ is None:
            return None
        try:
            return GrammarConstraint(await asyncio.to_thread(compile_))
        except RequestError as e:
            raise APIError(str(e), param="tools" if mode is not None else "response_format") from None


def _response_format(rf: dict | None, formats: Formats):
    """A function compiling `response_format`'s grammar, or None for text."""
    if rf is None or rf.get("type") == "text":
        if rf is not None and set(rf) != {"type"}:
            raise APIError("response_format text takes no other fields", param="response_format")
        return None
    kind = rf.get("type")
    if kind == "json_object":
        return lambda: formats.grammars.json_object()
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                           param="response_format")
        schema = spec.get("schema", {})
        return lambda: formats.grammars.json_schema(schema)
    raise APIError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                   param="response_format")
