from __future__ import annotations

import math
from dataclasses import dataclass, field

from expertyard.errors import RequestError


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # return this many top log-probabilities per generated token
    grammar: object | None = None  # a structured.GrammarConstraint: tokens it forbids are masked before sampling

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature={self.temperature!r} must be a number >= 0")
        if not 0 < self.top_p <= 1 or math.isnan(self.top_p):
            raise RequestError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables it)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop={self.stop!r} must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"logprobs={self.logprobs!r} must be between 0 and 20")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
