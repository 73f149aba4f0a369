"""Per-sequence grammar matchers and the token bitmask they put on a batch's logits.

Each step, a constrained sequence's matcher first takes the tokens the sequence got since the last step (they are
on the host already, except with async scheduling, where the in-flight step's tokens are waited for: one host sync
per step that holds a constrained sequence), then writes its row of a [N, ceil(V / 32)] int32 bitmask. The
bitmask goes to the device in one non-blocking copy from pinned memory and `xgrammar.apply_token_bitmask_inplace`
sets the logits of forbidden tokens to -inf there, on the rows that have a grammar only.
"""

from __future__ import annotations

import torch

from expertyard.engine.placeholders import placeholder

# N = rows that sample this step, V = vocabulary, W = ceil(V / 32) bitmask words


class GrammarConstraint:
    """A compiled grammar for `SamplingParams.grammar`. One instance may serve several sequences (the same params
    for n choices): each gets its own matcher, made at its first step."""

    def __init__(self, compiled):
        self.compiled = compiled
        self._states: dict[int, _MatcherState] = {}  # seq_id -> its matcher

    def state(self, seq_id: int) -> _MatcherState:
        if (s := self._states.get(seq_id)) is None:
            import xgrammar as xgr

            s = self._states[seq_id] = _MatcherState(xgr.GrammarMatcher(self.compiled))
        return s


class _MatcherState:
    def __init__(self, matcher):
        self.matcher = matcher
        self.consumed = 0  # output tokens the matcher has taken

    def take(self, tokens: list[int]) -> None:
        """Advance over the output tokens not taken yet (a token after the end of the grammar is ignored: with async
        scheduling a finished sequence can get one more, discarded, token)."""
        for t in tokens[self.consumed:]:
            if not self.matcher.is_terminated():
                self.matcher.accept_token(t)
        self.consumed = len(tokens)


def apply_grammars(logits: torch.Tensor, spans: list, in_flight=None) -> None:
    """Mask in place the logits [N, V] of the rows whose sequence has a grammar. `spans` are the step's sampling
    spans in row order; `in_flight` the launched step whose tokens the placeholders stand for (async scheduling)."""
    import xgrammar as xgr

    rows = [i for i, s in enumerate(spans) if s.seq.params.grammar is not None]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(spans), logits.shape[-1])  # [N, W], all allowed
    resolved = None
    for i in rows:
        seq = spans[i].seq
        out = seq.token_ids[seq.num_prompt_tokens:]
        if seq.pending:  # the last is a placeholder: its token is still on its way (async scheduling)
            if resolved is None:
                resolved = _in_flight_tokens(in_flight)
            out = out[:-1] + [resolved[_row_of(out[-1])]]
        state = seq.params.grammar.state(seq.seq_id)
        state.take(out)
        if not state.matcher.is_terminated():
            state.matcher.fill_next_token_bitmask(bitmask, i)
    if logits.device.type == "cuda":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)


def _row_of(token: int) -> int:
    """The in-flight row a placeholder id stands for."""
    row = -1 - token
    assert token < 0 and placeholder(row) == token, "not a placeholder"
    return row


def _in_flight_tokens(launched) -> list[int]:
    """The in-flight step's sampled tokens on the host (waits for their copy)."""
    if launched.ready is not None:
        launched.ready.synchronize()
    return launched.host[0].tolist()
