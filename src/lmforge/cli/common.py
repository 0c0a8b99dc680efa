"""The flags and readers that several commands share: short config flags, generation settings,
standard input and text files, opening a checkpoint for a command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.errors import UserError

# Short flags for the settings people change most; every field also has --section.field.
SHORT_FLAGS = {
    "--data": "data.path",
    "--tokenizer": "data.tokenizer",
    "--out": "train.out",
    "--max-iters": "train.max_iters",
    "--device": "train.device",
    "--dtype": "train.dtype",
    "--seed": "train.seed",
    "--batch-size": "train.batch_size",
    "--lr": "optim.lr",
    "--init-embeddings": "train.init_embeddings",
    "--loggers": "train.loggers",
    "--strategy": "train.strategy",
}


# Flags that several commands share, declared once with one default each.
SHARED_FLAGS: dict[str, dict] = {
    "--device": {"default": "auto", "help": "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"},
    "--dtype": {
        "default": "float32",
        "choices": ["float32", "bfloat16", "float16"],
        "help": "precision of the weights",
    },
    "--quantize": {
        "default": "none",
        "choices": ["none", "int8", "int4"],
        "help": "weight-only quantisation of the linear layers: int8, or int4 (4 bits per weight in blocks of 32)",
    },
    "--adapter": {
        "default": None,
        "help": "a LoRA adapter.safetensors (or its folder) to merge into CHECKPOINT",
    },
    "--revision": {"default": None, "help": "for a Hugging Face hub id: the branch, tag or commit to use"},
    "--compile": {
        "action": "store_true",
        "help": "decode one sequence at a time with a compiled one-token step (torch.compile; GPT "
        "models): slow to start (10-100 s), then faster per token (float32, AVX2 CPU: 34 vs 42 ms)",
    },
}


def add_shared(parser: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        parser.add_argument(flag, **SHARED_FLAGS[flag])


def unescape(text: str) -> str:
    r"""`--stop "\n\n"` means two newlines, as in C, Python and the shell's printf."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def add_generation_flags(parser: argparse.ArgumentParser, **defaults) -> None:
    """One flag per GenerationConfig setting (`top_p` → `--top-p`), with its help. A flag left
    out takes the checkpoint's recommended value (generation_config.json) if it has one, else
    this command's default, else GenerationConfig's."""
    from lmforge.generation_config import generation_settings

    parser.set_defaults(generation_defaults=defaults)
    group = parser.add_argument_group("generation settings")
    for name, kind, default, help, _, _ in generation_settings():
        flag = "--" + name.replace("_", "-")
        shown = f"{help} (default {defaults.get(name, default)})"
        if kind is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=shown
            )
        elif name == "stop":
            group.add_argument(flag, dest=name, action="append", type=unescape, default=None,
                               help=help + r" (repeatable; \n and \t are understood)")  # fmt: skip
        else:
            number = int if kind in (int, int | None) else float
            group.add_argument(flag, dest=name, type=number, default=None, help=shown)


def generation_config(args: argparse.Namespace, recommended: dict | None = None, **changes):
    """The GenerationConfig of a command: its flags over the checkpoint's recommendation over
    the command's defaults."""
    from lmforge.generation_config import GenerationConfig, generation_settings

    values = {**args.generation_defaults, **(recommended or {})}
    for name, *_ in generation_settings():
        given = getattr(args, name)
        if given is not None:
            values[name] = tuple(given) if name == "stop" else given
    values.update(changes)
    return GenerationConfig(**{k: v for k, v in values.items() if v is not None})


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    from lmforge.config import field_types

    group = parser.add_argument_group(
        "config overrides (any field of the config; see `lmforge presets --show NAME`)"
    )
    for flag, key in SHORT_FLAGS.items():
        group.add_argument(flag, dest=key, metavar="VALUE", default=None, help=f"= --{key}")
    for key, kind in field_types().items():
        names = [f"--{key}"]
        if "_" in key:
            names.append(f"--{key.replace('_', '-')}")
        if names[0] in SHORT_FLAGS:
            continue
        group.add_argument(*names, dest=key, metavar=kind.__name__.upper(), default=None)


def config_overrides(args: argparse.Namespace) -> dict[str, str]:
    from lmforge.config import field_types

    return {k: v for k, v in vars(args).items() if k in field_types() and v is not None}


def add_run_flags(p: argparse.ArgumentParser, what: str = "run") -> None:
    p.add_argument("--resume", action="store_true", help=f"continue the {what} in --out from its saved state")
    p.add_argument("--overwrite", action="store_true", help=f"replace a {what} already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def note(message: str) -> None:
    print(f"lmforge: note: {message}", file=sys.stderr)


def read_stdin() -> str:
    """Standard input as text: the one reader of every command that takes it (UTF-8, or one error)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"Standard input is not valid utf-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None  # fmt: skip


def read_lines_of(path: str, what: str) -> list[str]:
    """The non-empty lines of a file, or of standard input for "-"; an empty source is one error."""
    text = read_stdin() if path == "-" else read_text(path)
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        raise UserError(
            f"{'Standard input' if path == '-' else path} holds no {what}; give at least one line."
        )
    return lines


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_lines_of(args.prompt_file, "prompts")
    elif not prompts and not sys.stdin.isatty():
        try:  # piped prompts: `echo "ROMEO:" | lmforge generate out/run`
            prompts += [line for line in read_stdin().split("\n") if line.strip()]
        except (OSError, ValueError):  # no readable standard input
            pass
    return prompts or [""]


def read_text(path: str) -> str:
    from lmforge.data.corpus import read_text_file

    return read_text_file(Path(path))


def open_for(path: str, command: str):
    """The checkpoint, opened once for the whole command, if its model's family serves `command`."""
    from lmforge.checkpoint import open_checkpoint

    return open_checkpoint(path).require(command)


def checkpoint_family(path: str):
    """The family of the checkpoint's model (None: a classifier, or not a checkpoint)."""
    from lmforge.checkpoint import open_checkpoint
    from lmforge.families import family_of

    try:
        config = open_checkpoint(path).config  # (a classifier has no language-model config)
    except UserError:
        return None
    return config and family_of(config.model.arch)


def is_classifier_checkpoint(path: str) -> bool:
    from lmforge.classification.inference import is_classifier

    return is_classifier(path)


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite or choose another --out.")
