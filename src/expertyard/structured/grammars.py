"""Compile what a request asks its answer to be into an xgrammar grammar, once per distinct format (cached)."""

from __future__ import annotations

import json

from expertyard.errors import RequestError
from expertyard.structured.tools import TOOL_FORMAT


class Grammars:
    """An xgrammar compiler for one tokenizer and vocabulary. `stop_token_ids` end a finished answer (the engine's
    EOS ids, so a grammar's end is also the sequence's end)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise RequestError("structured outputs and tools need xgrammar: pip install 'expertyard[serve]'") from e
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        self.vocab_size = vocab_size

    def json_object(self):
        """Any JSON object, written compactly (no runs of whitespace for a model to loop on)."""
        return self.json_schema({"type": "object"}, strict=False)

    def json_schema(self, schema: dict, strict: bool = True):
        """A JSON value that validates against `schema`; with `strict`, objects have only the properties the
        schema names (OpenAI's structured outputs)."""
        if not isinstance(schema, dict):
            raise RequestError("the JSON schema must be an object")
        try:
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError for schemas it cannot compile
            raise RequestError(f"the JSON schema cannot be compiled: {_first_line(e)}") from None

    def tool_calls(self, tools: list[dict], mode: str, parallel: bool):
        """Tool calls in TOOL_FORMAT. mode: "auto" (text, or calls after a trigger), "required" (at least one
        call), or a function name (exactly that function, its arguments constrained to its schema)."""
        xgr = self._xgr
        choice = mode if mode in ("auto", "required") else {"type": "function", "function": {"name": mode}}
        try:
            # at most one whitespace character in a row inside the arguments: no runs of blanks for a model to loop on
            tag = xgr.get_model_structural_tag(TOOL_FORMAT, tools=tools, tool_choice=choice, reasoning="disabled",
                                               parallel_tool_calls=parallel, max_whitespace_cnt=1)
            return self.compiler.compile_structural_tag(tag)
        except Exception as e:
            raise RequestError(f"the tools' parameter schemas cannot be compiled: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
