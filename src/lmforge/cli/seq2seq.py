"""`lmforge translate` and `lmforge summarize`: an encoder–decoder (or a decoder) on source texts."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.common import add_shared, read_lines_of
from lmforge.errors import UserError


def add_translate_parser(sub) -> None:
    add_transduce_flags(
        sub.add_parser("translate", help="translate texts with an encoder–decoder checkpoint")
    )


def add_summarize_parser(sub) -> None:
    add_transduce_flags(
        sub.add_parser("summarize", help="summarize texts with an encoder–decoder checkpoint")
    )


def add_transduce_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--text", action="append", default=None, help="a text (repeatable)")
    p.add_argument("--file", help="one text per line ('-' = standard input)")
    p.add_argument("--beams", type=int, default=4, help="beam width (1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="a finished hypothesis scores log-probability / length**this (> 1 favours longer)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the model's target length")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="no n-gram twice in an output (0 = off; default 3 for summarize, 0 for translate)")  # fmt: skip
    p.add_argument("--prefix", default=None,
                   help="text put before every source (default: the model's own for the task, as T5's 'summarize: ')")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=0,
                   help="texts decoded together (0 = 64-256 hypotheses, fewer for longer texts)")  # fmt: skip
    add_shared(p, "--device", "--dtype")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def cmd_transduce(args: argparse.Namespace) -> int:

    from lmforge.generation_config import GenerationConfig
    from lmforge.inference.loading import load_for_inference
    from lmforge.seq2seq.decoding import source_prefix, task_defaults, transduce

    texts = list(args.text or [])
    if args.file:
        texts += read_lines_of(args.file, "texts")
    if not texts:
        raise UserError(f"Give texts to {args.command} with --text or --file.")
    task = "translation" if args.command == "translate" else "summarization"
    settings = task_defaults(task, no_repeat_ngram_size=args.no_repeat_ngram_size)
    negative = min(args.batch_size, args.max_new_tokens, settings["no_repeat_ngram_size"]) < 0
    if args.beams < 1 or negative:
        raise UserError("--beams must be at least 1, --batch-size, --max-new-tokens and --no-repeat-ngram-size "
                        "at least 0.")  # fmt: skip
    prefix = source_prefix(args.checkpoint, task, args.prefix)
    model, tokenizer = load_for_inference(args.checkpoint, args.device, args.dtype)
    cfg = GenerationConfig(num_beams=args.beams, length_penalty=args.length_penalty,
                           max_new_tokens=args.max_new_tokens, **settings)  # fmt: skip
    key = "translation" if args.command == "translate" else "summary"
    warn = lambda message: print(f"lmforge: warning: {message}", file=sys.stderr)  # noqa: E731
    for text, output in zip(
        texts,
        transduce(model, tokenizer, texts, cfg, batch_size=args.batch_size, warn=warn, prefix=prefix),
        strict=True,
    ):
        print(json.dumps({"text": text, key: output}, ensure_ascii=False) if args.json else output)
    return 0
