"""Conversations as prompts: which chat template a checkpoint uses, and rendering with it.

A checkpoint fine-tuned on instruction data, or imported from Hugging Face with a
`chat_template`, carries its template; anything else (a model trained on plain
text) gets lmforge's default template, which is at least a readable transcript.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.data.instructions import DEFAULT_CHAT_TEMPLATE, Conversation, chat_stop_strings, render_chat  # noqa: F401  (chat_stop_strings re-exported)
from lmforge.errors import UserError

ROLES = ("system", "user", "assistant")


def chat_template_of(checkpoint, adapter: str | Path | None = None) -> str:
    """The chat template stored with a checkpoint (a path, or a Checkpoint already opened; lmforge or
    Hugging Face), else the default. With a LoRA `adapter`, the template of the fine-tuning run that
    wrote it comes first: its replies were trained in that format."""
    from lmforge.checkpoint import Checkpoint, open_checkpoint

    if adapter is not None:
        run = Path(adapter) if Path(adapter).is_dir() else Path(adapter).parent
        if (run / "config.json").is_file():
            return chat_template_of(run)
    opened = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    return opened.chat_template or DEFAULT_CHAT_TEMPLATE


def chat_prompt(template: str, messages: Conversation, tools: list[dict] | None = None) -> str:
    """The prompt that asks the model for the assistant's next reply (`tools`: the functions it may
    call, for templates that list them)."""
    return render_chat(template, messages, add_generation_prompt=True, tools=tools)


HELP = (
    "Commands: /reset (forget the conversation), /system TEXT, /temperature X, /quit. Ctrl-C stops a reply."
)


@contextmanager
def line_editing(history_file: Path | None) -> Iterator[None]:
    """Within the block, input() has line editing (arrows, Ctrl-A/E, Ctrl-R search) and the lines
    of earlier sessions as history (GNU readline), saved back to `history_file` at the end."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input()
        yield
        return
    readline.set_history_length(1000)
    if history_file is not None and history_file.is_file():
        try:
            readline.read_history_file(history_file)
        except OSError:
            pass
    try:
        yield
    finally:
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history_file)
            except OSError:  # a read-only home: the chat worked, only its history is not kept
                pass


def terminal_chat(
    model, tokenizer, template: str, config, system: str | None = None, read=input, write=print, draft=None
) -> None:
    """A chat loop in the terminal: streaming replies, history, and a few slash commands.

    `config` is a GenerationConfig (temperature, max_new_tokens, ...); `draft`: a draft model for
    speculative decoding; `read`/`write` are swappable so that tests can drive the loop.
    """
    from dataclasses import replace

    from lmforge.inference.generation import stream

    history: Conversation = []
    stops = chat_stop_strings(template)
    write(f"Chatting with the model ({HELP})")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
            write("")
            continue
        except UnicodeDecodeError as e:
            raise UserError(f"Standard input is not valid utf-8 text (byte 0x{e.object[e.start]:02x} at offset "
                            f"{e.start} of the line); type or pipe UTF-8 text.") from None  # fmt: skip
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/help":
            write(HELP)
            continue
        if text == "/reset":
            history = []
            write("(conversation forgotten)")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            write(f"(system prompt {'set' if system else 'cleared'})")
            continue
        if text.startswith("/temperature"):
            try:
                value = float(text.split(maxsplit=1)[1])
                config = replace(config, temperature=value)  # checked against the setting's range
            except (IndexError, ValueError, UserError):
                write("(usage: /temperature 0.7 — a number from 0 to 5)")
                continue
            write(f"(temperature {value:g})")
            continue
        if text.startswith("/"):
            write(f"(unknown command {text.split()[0]}; {HELP})")
            continue
        history.append({"role": "user", "content": text})
        prompt = _fitting_prompt(
            tokenizer, template, system, history, model.block_size - config.max_new_tokens
        )
        reply = ""
        write("model> ", end="")
        try:
            notice = lambda message: write(f"({message})\nmodel> ", end="")  # noqa: E731  (one line, no warning)
            for piece in stream(
                model, tokenizer, prompt, replace(config, stop=list(config.stop) + stops), notice, draft
            ):
                reply += piece
                write(piece, end="", flush=True)
        except KeyboardInterrupt:  # stop this reply, stay in the chat
            write(" [stopped]", end="")
        write("")
        history.append({"role": "assistant", "content": reply.strip()})


def _fitting_prompt(tokenizer, template: str, system: str | None, history: Conversation, budget: int) -> str:
    """The prompt for the next reply, dropping the oldest turns until it fits the context."""
    head = [{"role": "system", "content": system}] if system else []
    turns = list(history)
    while True:
        prompt = chat_prompt(template, head + turns)
        if len(tokenizer.encode(prompt)) <= max(budget, 1) or len(turns) <= 1:
            return prompt
        turns = turns[2:] if len(turns) > 2 else turns[-1:]
