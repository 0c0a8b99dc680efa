"""Instruction and chat data: JSONL conversations, rendered with a chat template.

Accepted records (one per line):
    {"prompt": "...", "response": "..."}            (also "completion"; optional "system")
    {"instruction": "...", "input": "...", "output": "..."}   (the Alpaca layout)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Each conversation is rendered with a Jinja chat template (the imported model's
own when it has one, else `DEFAULT_CHAT_TEMPLATE`) and encoded into the token
stream together with a mask: 1 on the tokens of the assistant's replies (the
loss is computed there only), 0 on everything the model is given.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from lmforge.data.corpus import json_lines
from lmforge.errors import UserError
from lmforge.tokenizers import EOT, TextTokenizer

# A plain template for models without one. The end-of-text token closes each reply,
# so a fine-tuned model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

Conversation = list[dict[str, str]]


ROLES = {"system", "user", "assistant", "tool"}  # the roles chat templates know


def _as_conversation(record: Any, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object.")
    if "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok or not any(m["role"] == "assistant" for m in messages):
            raise UserError(
                f"{where}: 'messages' must be a list of {{role, content}} objects with at least "
                f"one assistant reply."
            )
        unknown = sorted({m["role"] for m in messages} - ROLES)
        if unknown:  # (a template would drop or mangle it, and the model learn from that)
            raise UserError(
                f"{where}: the role {unknown[0]!r} is not one of {', '.join(sorted(ROLES))}; rename it."
            )
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record and "output" in record:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        reply = record["output"]
    else:
        prompt = record.get("prompt")
        reply = record.get("response", record.get("completion"))
    if not isinstance(prompt, str) or not isinstance(reply, str):
        raise UserError(
            f"{where} needs string fields prompt and response (or instruction and output, "
            f"or a messages list)."
        )
    conversation = (
        [{"role": "system", "content": record["system"]}] if isinstance(record.get("system"), str) else []
    )
    return conversation + [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def is_instruction_file(path: Path, encoding: str = "utf-8") -> bool:
    """A .jsonl file whose first record is a conversation rather than a {"text": ...} document."""
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding=encoding, errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and (
                    "messages" in record
                    or {"prompt", "response"} <= record.keys()
                    or {"prompt", "completion"} <= record.keys()
                    or {"instruction", "output"} <= record.keys()
                )
    return False


def read_conversations(path: Path, text: str) -> list[Conversation]:
    """Every conversation of an instruction JSONL file whose content is `text`."""
    conversations = [
        _as_conversation(record, f"{path}:{lineno}") for lineno, record in json_lines(path, text)
    ]
    if not conversations:
        raise UserError(f"{path} holds no conversations; give one JSON object per line.")
    return conversations


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The compiled template (cached: a server renders the same one for every request)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        # Sandboxed, as transformers does: a template comes with downloaded files.
        return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"The chat template is not valid Jinja ({e}).") from None


def render_chat(
    template: str, messages: Conversation, add_generation_prompt: bool, tools: list[dict] | None = None
) -> str:
    """The text of `messages` as the model was trained to see it."""
    extra = {"tools": tools} if tools else {}
    return compile_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, eos_token=EOT, bos_token="", **extra
    )


def encode_conversation(
    tokenizer: TextTokenizer, template: str, messages: Conversation
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and the loss mask (1 on assistant replies)."""
    compiled = compile_template(template)
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # the text encoded so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = compiled.render(
            messages=messages[:i], add_generation_prompt=True, eos_token=EOT, bos_token=""
        )
        after = compiled.render(
            messages=messages[: i + 1], add_generation_prompt=False, eos_token=EOT, bos_token=""
        )
        if not before.startswith(done) or not after.startswith(before):
            raise UserError(
                "The chat template does not render conversations incrementally (a prefix of a "
                "conversation changes when a message is added); lmforge cannot mask it."
            )
        given = tokenizer.encode(before[len(done) :])
        reply = tokenizer.encode(after[len(before) :])
        ids += given + reply
        mask += [0] * len(given) + [1] * len(reply)
        done = after
    return ids, mask


def chat_stop_strings(template: str) -> list[str]:
    """Text that marks the end of a reply besides the end-of-text token."""
    if template == DEFAULT_CHAT_TEMPLATE:
        return ["\n### User:", "\n### Assistant:"]
    if "<|im_end|>" in template:  # ChatML (Qwen2, SmolLM)
        return ["<|im_end|>"]
    if "<|eot_id|>" in template:  # Llama 3
        return ["<|eot_id|>"]
    if "</s>" in template:  # Llama 2, Mistral
        return ["</s>"]
    return []
