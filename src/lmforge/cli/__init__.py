"""The `lmforge` command: parse arguments, build a config, call the library.

Exit codes: 0 success; 2 bad input or usage (one line on stderr); 1 anything
unexpected (traceback shown); 130 after Ctrl-C (training saves its state first).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from lmforge.cli.classify import (
    add_classify_parser,
    add_explain_parser,
    add_train_classifier_parser,
    cmd_classify,
    cmd_explain,
    cmd_train_classifier,
)
from lmforge.cli.convert import add_convert_parser, add_export_parser, cmd_convert, cmd_export
from lmforge.cli.embeddings import add_embeddings_parser, cmd_embeddings
from lmforge.cli.evaluate import add_eval_parser, cmd_eval
from lmforge.cli.generate import add_chat_parser, add_generate_parser, cmd_chat, cmd_generate
from lmforge.cli.seq2seq import add_summarize_parser, add_translate_parser, cmd_transduce
from lmforge.cli.serve import add_serve_parser, cmd_serve
from lmforge.cli.train import (
    add_finetune_parser,
    add_prepare_parser,
    add_presets_parser,
    add_train_parser,
    add_tune_parser,
    cmd_finetune,
    cmd_prepare,
    cmd_presets,
    cmd_train,
    cmd_tune,
)
from lmforge.errors import TrainingInterrupted, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train, evaluate, generate with and serve autoregressive language models.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_parser in PARSERS:
        add_parser(sub)
    return parser


def _version() -> str:
    from lmforge import __version__

    return __version__


# name: (parser, command); the parser functions above each add one subcommand.
SUBCOMMANDS = {
    "train": (add_train_parser, cmd_train),
    "finetune": (add_finetune_parser, cmd_finetune),
    "prepare": (add_prepare_parser, cmd_prepare),
    "generate": (add_generate_parser, cmd_generate),
    "eval": (add_eval_parser, cmd_eval),
    "train-classifier": (add_train_classifier_parser, cmd_train_classifier),
    "classify": (add_classify_parser, cmd_classify),
    "translate": (add_translate_parser, cmd_transduce),
    "summarize": (add_summarize_parser, cmd_transduce),
    "serve": (add_serve_parser, cmd_serve),
    "chat": (add_chat_parser, cmd_chat),
    "convert": (add_convert_parser, cmd_convert),
    "export": (add_export_parser, cmd_export),
    "explain": (add_explain_parser, cmd_explain),
    "tune": (add_tune_parser, cmd_tune),
    "embeddings": (add_embeddings_parser, cmd_embeddings),
    "presets": (add_presets_parser, cmd_presets),
}


PARSERS = [parser for parser, _ in SUBCOMMANDS.values()]


def flags_for(parser: argparse.ArgumentParser, command: str, settings: tuple[str, ...]) -> list[str]:
    """The flags of `command` that set the named settings (`data.encoding` → `--data.encoding`,
    `stride` → `--stride`, `device` → `--device`)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    found = []
    for setting in settings:
        for action in sub._actions:
            names = {action.dest, action.dest.rsplit(".", 1)[-1]}
            dashed = {"--" + setting, "--" + setting.replace("_", "-")}
            if (setting in names or dashed & set(action.option_strings)) and action.option_strings:
                flag = min(action.option_strings, key=len)
                if flag not in found:
                    found.append(flag)
                break
    return found


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _pin_revision(args: argparse.Namespace) -> None:
    """`--revision R` for a hub id travels with it as `org/name@R`, which every reader accepts."""
    from lmforge.interop.hub import looks_like_hub_id

    if getattr(args, "revision", None):
        for field in ("checkpoint", "hf_dir"):
            value = getattr(args, field, None)
            if value and not Path(value).exists() and looks_like_hub_id(value):
                setattr(args, field, f"{value}@{args.revision}")


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    for given in raw:  # bytes that are not UTF-8 arrive as lone surrogates: refuse them by name
        if any("\udc80" <= ch <= "\udcff" for ch in given):
            shown = given.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            print(f"lmforge: error: the argument {shown!r} is not valid UTF-8 text; pass text in UTF-8.",
                  file=sys.stderr)  # fmt: skip
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    # `kill`, a job scheduler's preemption or torchrun stopping a run send SIGTERM: treat it
    # like Ctrl-C, so that training saves a state that --resume continues exactly.
    training = (
        args.command in ("train", "finetune", "tune")
        and threading.current_thread() is threading.main_thread()
    )
    previous = signal.signal(signal.SIGTERM, _interrupt) if training else None
    try:
        _pin_revision(args)
        return SUBCOMMANDS[args.command][1](args)
    except UserError as e:
        flags = flags_for(parser, args.command, e.settings)
        hint = f" (command line: {', '.join(flags)})" if flags else ""
        print(f"lmforge: error: {e}{hint}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        advice = " Continue with the same command plus --resume." if e.resumable else ""
        print(f"lmforge: {e}{advice}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("lmforge: interrupted.", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno == errno.EPIPE:  # the reader went away (`lmforge presets --show x | head`): nothing to say
            sys.stderr = open(os.devnull, "w")  # (and nothing to flush at exit)
            return 0
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            traceback.print_exc()
            return 1
        where = f" {e.filename}" if e.filename else ""
        print(f"lmforge: error: cannot write{where} ({e.strerror}); free some space or choose a writable "
              f"folder, then run the command again (training: with --resume).", file=sys.stderr)  # fmt: skip
        return 2
    except UnicodeDecodeError as e:  # standard input or a file read as text
        print(f"lmforge: error: the input is not valid {e.encoding} text (byte 0x{e.object[e.start]:02x} at "
              f"offset {e.start}); convert it to UTF-8.", file=sys.stderr)  # fmt: skip
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        if training:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
