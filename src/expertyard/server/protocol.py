"""Request bodies of the OpenAI API (the fields expertyard serves), validated strictly, and its error shape.

Fields we do not implement but clients send by default (`user`, `presence_penalty: 0`, ...) are ignored when
they are left at their neutral value and refused with a 400 naming them otherwise; a field this server does not
know at all is refused with a 400 naming it, so that no request is silently served with a different meaning than
it asked for.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 1024  # prompts in one /v1/completions batch (lm-eval sends batches of token lists)
MAX_STOP = 16
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions without max_tokens (or with null), as OpenAI and vLLM


class APIError(Exception):
    """An error for the client: becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error",
                             413: "invalid_request_error"}.get(status, "invalid_request_error" if status < 500
                                                                else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # strict: "5" is not 5 and 1 is not True; ints are still accepted where floats are expected
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # extension (vLLM): 0 disables it
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, validate_default=True)  # -> list[str]
    ignore_eos: bool = False  # extension (vLLM): generate exactly max_tokens (benchmarks)
    return_token_ids: bool = False  # extension: each choice (and stream chunk) carries its token ids
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    repetition_penalty: float = 1.0  # extension (vLLM): only its neutral value
    min_p: float = 0.0  # extension (vLLM): only its neutral value
    user: str | None = None  # an end-user id for the provider's logs: accepted, not used
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", ...} (structured/)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop must be at most {MAX_STOP} non-empty strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.repetition_penalty != 1:
            raise ValueError("repetition_penalty is not supported (only 1)")
        if self.min_p != 0:
            raise ValueError("min_p is not supported (only 0)")
        if self.service_tier not in (None, "auto", "default"):
            raise ValueError(f"service_tier {self.service_tier!r} is not supported (only auto or default)")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: Any = Field(...)  # str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo (score the prompt); null means 16, as left out
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _max_tokens(cls, v):
        return DEFAULT_COMPLETION_TOKENS if v is None else v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v) -> list[str | list[int]]:
        """-> a list of prompts, each a string or token ids."""
        if isinstance(v, str):
            v = [v]
        elif isinstance(v, list) and v and all(_is_token(t) for t in v):
            v = [v]
        if not isinstance(v, list) or not v or not all(
                isinstance(p, str) or (isinstance(p, list) and all(_is_token(t) for t in p)) for p in v):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of "
                             "token-id lists")
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 needs echo=true (it scores the prompt without generating)")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo and self.stream:
            raise ValueError("echo is not supported with stream=true")
        return self


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def template_dict(self) -> dict:
        try:
            args = json.loads(self.function.arguments)
        except ValueError:
            args = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": args}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    refusal: str | None = None

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError("content must be a string or a list of content parts (null only for an assistant "
                             "message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def template_dict(self) -> dict:
        """The message as chat templates read it (tool calls with their arguments decoded, as HF templates
        expect)."""
        out: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; none: any JSON object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None  # "none" | "auto" | "required" | {"type": "function", "function": ...}
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice {self.tool_choice!r} must be none, auto, required or "
                             '{"type": "function", "function": {"name": ...}}')
        if isinstance(self.tool_choice, dict):
            fn = self.tool_choice.get("function")
            if self.tool_choice.get("type") != "function" or not isinstance(fn, dict) or fn.get("name") not in names:
                raise ValueError(f"tool_choice {self.tool_choice!r} must name one of the tools: "
                                 '{"type": "function", "function": {"name": ...}}')
        if self.tools and self.response_format and self.response_format.get("type") not in (None, "text") \
                and self.tool_choice != "none":
            raise ValueError("response_format json_object/json_schema cannot be combined with tools "
                             "(set tool_choice to none, or drop one)")
        return self

    @property
    def tool_mode(self) -> str | None:
        """None (no tools in play), "auto", "required", or the name of the one function that must be called."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, dict):
            return self.tool_choice["function"]["name"]
        return self.tool_choice or "auto"

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """Validate a decoded JSON body; a ValidationError becomes a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in _TYPE_NAMES))]
        param = loc[0] if loc else None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "this field is required"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field: this server does not support it (leave it out)"
        elif err["type"] == "finite_number" or (isinstance(err.get("input"), float) and math.isnan(err["input"])):
            msg = "must be a finite number"
        where = ".".join(loc)
        raise APIError(f"{where}: {msg}" if where else msg, param=param,
                       code={"missing": "missing_field", "extra_forbidden": "unsupported_field"}.get(err["type"],
                                                                                          "invalid_value")) from None


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before"}
