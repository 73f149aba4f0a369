"""Request bodies of the OpenAI API (the fields expertyard serves), validated strictly, and its error shape.

Fields we do not implement but clients send by default (`user`, `presence_penalty: 0`, ...) are ignored when
they are left at their neutral value and refused with a 400 naming them otherwise, so that no request is
silently served with a different meaning than it asked for.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 1024  # prompts in one /v1/completions batch (lm-eval sends batches of token lists)
MAX_STOP = 16


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
    model_config = ConfigDict(extra="ignore", strict=True)

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
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: Any = Field(...)  # str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo (score the prompt)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

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
        elif err["type"] == "finite_number" or (isinstance(err.get("input"), float) and math.isnan(err["input"])):
            msg = "must be a finite number"
        where = ".".join(loc)
        raise APIError(f"{where}: {msg}" if where else msg, param=param,
                       code="missing_field" if err["type"] == "missing" else "invalid_value") from None


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before"}
