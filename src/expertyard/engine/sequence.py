from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from expertyard.engine.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    slot: int = -1  # KV cache row while running
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    text: str = ""  # detokenised output (trimmed at a stop string)
    logprobs: list[dict] = field(default_factory=list)
    # async scheduling (engine/placeholders.py): 1 while the last of token_ids is a placeholder for a token in
    # flight; length_capped: that token is its last by length (max_tokens, max_model_len), so no step follows
    pending: int = 0
    length_capped: bool = False

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens known on the host (a placeholder in flight is not one)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.pending]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
