"""`lmforge generate` and `lmforge chat`: text from a language model, in one go or turn by turn."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from lmforge.cli.common import (
    add_generation_flags,
    add_shared,
    generation_config,
    note,
    open_for,
    read_prompts,
)
from lmforge.errors import UserError


def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint, streaming",
        description="Continue one or more prompts. Text streams to the terminal as it is "
        "produced; several prompts (or --no-stream) print when done.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", help="one prompt per line ('-' reads standard input)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--no-stream", action="store_true", help="print each result when it is complete")
    add_shared(p, "--device", "--dtype", "--quantize", "--adapter", "--revision", "--compile")
    add_draft_flag(p)
    add_generation_flags(p, max_new_tokens=200, temperature=0.8)


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal")
    p.add_argument("checkpoint")
    p.add_argument("--system", default=None, help="system prompt")
    add_shared(p, "--device", "--dtype", "--quantize", "--adapter", "--revision", "--compile")
    add_draft_flag(p)
    add_generation_flags(p, temperature=0.8, top_p=0.95, max_new_tokens=None)


def add_draft_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft",
        metavar="MODEL",
        help="speculative decoding: a smaller checkpoint with the same tokenizer drafts tokens that the "
        "model checks several at a time (same text when greedy; see --num-assistant-tokens)",
    )


def load_for_generation(args: argparse.Namespace, opened):
    """The model and tokenizer of `generate` and `chat`, as their flags ask."""
    from lmforge.inference.loading import load_for_inference

    return load_for_inference(
        opened,
        args.device,
        args.dtype,
        args.quantize,
        args.adapter,
        notice=note,
        compile=args.compile,
    )


def load_draft(args: argparse.Namespace, model, tokenizer):
    """The draft model of `--draft` (on the model's device, dtype and quantization), or None."""
    if not args.draft:
        return None
    if not hasattr(model, "blocks"):
        raise UserError("--draft needs a Transformer decoder as the model; this one decodes without a draft.")
    from lmforge.inference.loading import load_for_inference

    draft, draft_tokenizer = load_for_inference(
        open_for(args.draft, "generate"), args.device, args.dtype, args.quantize, None, notice=note
    )
    if draft_tokenizer.hf.get_vocab() != tokenizer.hf.get_vocab() or not hasattr(draft, "blocks"):
        raise UserError(f"The draft model {args.draft} does not share the model's tokenizer (or is not a "
                        "Transformer decoder); give a smaller model trained with the same tokenizer.")  # fmt: skip
    return draft


def report_speculation(stats, asked: bool) -> None:
    if stats.drafted:
        note(f"speculative decoding kept {stats.accepted} of {stats.drafted} drafted tokens "
             f"({100 * stats.acceptance:.0f}%)")  # fmt: skip
    elif asked:
        note("speculative decoding drafted nothing: on this machine checking the drafts would have cost "
             "more than it saved (or the text left no room for them)")  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.inference.generation import generate, stream
    from lmforge.inference.speculative import SpeculationStats

    opened = open_for(args.checkpoint, "generate")
    config = generation_config(args, opened.generation.sampling)  # checked before the model loads
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1.")
    model, tokenizer = load_for_generation(args, opened)
    draft = load_draft(args, model, tokenizer)
    stats = SpeculationStats()
    prompts = read_prompts(args)
    warn = lambda message: print(f"lmforge: warning: {message}", file=sys.stderr)  # noqa: E731
    for i in range(args.num_samples):
        cfg = replace(config, seed=None if config.seed is None else config.seed + i)
        if args.no_stream or len(prompts) > 1:
            for prompt, text in zip(
                prompts, generate(model, tokenizer, prompts, cfg, warn, draft, stats), strict=True
            ):
                print(prompt + text)
                if len(prompts) > 1 or args.num_samples > 1:
                    print("---")
        else:
            print(prompts[0], end="", flush=True)
            for piece in stream(model, tokenizer, prompts[0], cfg, warn, draft, stats):
                print(piece, end="", flush=True)
            print()
            if args.num_samples > 1:
                print("---")
    report_speculation(stats, bool(draft) or config.prompt_lookup_num_tokens > 0)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.chat import chat_template_of, terminal_chat

    opened = open_for(args.checkpoint, "chat")
    recommended = opened.generation.sampling
    generation_config(args, recommended, max_new_tokens=args.max_new_tokens or 1)  # checked before loading
    model, tokenizer = load_for_generation(args, opened)
    draft = load_draft(args, model, tokenizer)
    if args.max_new_tokens is None:
        args.max_new_tokens = min(256, model.block_size // 2)
    if args.max_new_tokens >= model.block_size:
        raise UserError(f"--max-new-tokens must be below the model's context ({model.block_size}).")
    config = generation_config(args, recommended)
    from contextlib import nullcontext

    from lmforge.chat import line_editing
    from lmforge.io import cache_dir

    interactive = sys.stdin.isatty()  # line editing and history for a person typing, not for piped input
    with line_editing(cache_dir() / "chat_history") if interactive else nullcontext():
        terminal_chat(model, tokenizer, chat_template_of(opened, args.adapter), config, system=args.system,
                      draft=draft)  # fmt: skip
    return 0
