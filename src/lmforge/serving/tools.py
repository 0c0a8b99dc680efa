"""Tool calling for the chat endpoint: putting tools and earlier calls into the prompt, constraining
a reply to a call, and reading calls back out of a reply.

The format is the one most open chat models with tools were trained on (Hermes, Qwen 2.5): the
tools are listed as JSON schemas in the system prompt, and a call is a JSON object between
`<tool_call>` tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows about tools (it mentions `tools`) gets them, and the messages' tool calls,
the way Hugging Face's `apply_chat_template` passes them; any other template gets the tools written
into the system message, earlier calls as `<tool_call>` text and tool results as
`<tool_response>` user turns, so that every model can be offered tools.

With `tool_choice` "required" or a named function the reply is constrained (`structured`) to one
call whose arguments follow that function's parameter schema; with "auto" the model chooses, and
calls it writes are returned as `tool_calls`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from lmforge.inference.structured import COMPACT_JSON

TOOLS_PREAMBLE = (
    "You can call functions to help answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call one, reply with only a JSON object holding its name and arguments inside <tool_call></tool_call> "
    'tags:\n<tool_call>\n{{"name": "the function\'s name", "arguments": {{"argument": "value"}}}}\n</tool_call>'
)
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def template_takes_tools(template: str) -> bool:
    """Whether a chat template renders `tools` itself (Hugging Face's convention)."""
    return re.search(r"\btools\b", template) is not None


def _call_text(call: dict) -> str:
    function = call["function"]
    return (
        "<tool_call>\n"
        + json.dumps({"name": function["name"], "arguments": _arguments(function)})
        + "\n</tool_call>"
    )


def _arguments(function: dict) -> Any:
    """A call's arguments as a value: OpenAI sends them as a JSON string."""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def messages_for_template(messages: list[dict], tools: list[dict] | None, takes_tools: bool) -> list[dict]:
    """The request's messages (role, content, tool_calls, tool_call_id) as the template can render them."""
    if takes_tools:
        out = []
        for m in messages:
            entry = {**m, "content": m.get("content") or ""}
            if m.get("tool_calls"):
                entry["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": _arguments(c["function"])}}
                    for c in m["tool_calls"]
                ]
            out.append(entry)
        return out
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
            )
        elif m.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            out.append({"role": m["role"], "content": ((m.get("content") or "") + "\n" + calls).strip()})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        listed = "\n".join(json.dumps(t) for t in tools)
        preamble = TOOLS_PREAMBLE.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def tool_call_lark(tools: list[dict], name: str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one `<tool_call>` of one of `tools` (or the
    one called `name`), its arguments valid under the function's parameter schema."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if name in (None, t["function"]["name"])
    ]
    schema = {"anyOf": options, "x-guidance": COMPACT_JSON}
    return 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json ' + json.dumps(schema)


def read_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply: every well-formed call of a known function becomes an
    OpenAI tool call; the rest of the text stays content (None when nothing is left). A reply that is
    only a bare JSON call (some models' format) counts too."""
    names = {t["function"]["name"] for t in tools}
    calls, spans = [], []
    for match in _CALL.finditer(text):
        call = _call_of(match.group(1), names)
        if call is not None:
            calls.append(call)
            spans.append(match.span())
    if not calls:
        bare = _call_of(text.strip(), names)
        if bare is not None:
            return None, [bare]
    rest = text
    for begin, end in reversed(spans):
        rest = rest[:begin] + rest[end:]
    return (rest.strip() or None), calls


def _call_of(raw: str, names: set[str]) -> dict | None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(arguments)},
    }
