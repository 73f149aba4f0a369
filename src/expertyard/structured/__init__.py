"""Structured outputs and tool calls: grammars (xgrammar) that mask, at every step, the tokens a request's
answer may not continue with.

    grammars.py  compile a request's format (json_object, json_schema, tool calls) into an xgrammar grammar
    masks.py     per-sequence matchers, and the token bitmask applied to a batch's logits on the device
    tools.py     the tool-call text format, and parsing an answer into OpenAI `tool_calls`

The engine's only hook is in `LLMEngine._launch`: when a sequence of the step carries a `SamplingParams.grammar`,
`apply_grammars` masks its row of the logits before sampling; rows without one are left as they are, so
constrained and free requests share a batch.
"""

from expertyard.structured.grammars import Grammars
from expertyard.engine.grammar_masks import GrammarConstraint, apply_grammars

__all__ = ["Grammars", "GrammarConstraint", "apply_grammars"]
