"""Tool calls as text: the format a constrained answer is written in, and its parsing into OpenAI `tool_calls`.

The format is the Hermes / Qwen one (xgrammar's "qwen_3" structural tag), one call per block:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import re
import uuid

TOOL_FORMAT = "qwen_3"  # xgrammar's structural-tag template for the format above
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls): the text outside complete <tool_call> blocks (None if only whitespace), and each
    block as an OpenAI tool call with its arguments as JSON text. A block that is not valid JSON (an answer cut by
    max_tokens) stays in the content."""
    calls, kept, pos = [], [], 0
    for m in _CALL.finditer(text):
        try:
            body = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": body["name"],
                                   "arguments": json.dumps(body.get("arguments", {}), ensure_ascii=False)}})
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None), calls


def template_supports_tools(tokenizer) -> bool:
    """Does the chat template render a `tools` list (so that the model sees the functions it may call)?"""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = " ".join(template.values())
    return bool(template) and "tools" in template
