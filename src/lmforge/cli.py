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
from dataclasses import replace
from pathlib import Path

from lmforge.errors import TrainingInterrupted, UserError

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


def _shared(parser: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        parser.add_argument(flag, **SHARED_FLAGS[flag])


def _unescape(text: str) -> str:
    r"""`--stop "\n\n"` means two newlines, as in C, Python and the shell's printf."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _generation_flags(parser: argparse.ArgumentParser, **defaults) -> None:
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
            group.add_argument(flag, dest=name, action="append", type=_unescape, default=None,
                               help=help + r" (repeatable; \n and \t are understood)")  # fmt: skip
        else:
            number = int if kind in (int, int | None) else float
            group.add_argument(flag, dest=name, type=number, default=None, help=shown)


def _generation_config(args: argparse.Namespace, recommended: dict | None = None, **changes):
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


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
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


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    from lmforge.config import field_types

    return {k: v for k, v in vars(args).items() if k in field_types() and v is not None}


def _run_flags(p: argparse.ArgumentParser, what: str = "run") -> None:
    p.add_argument("--resume", action="store_true", help=f"continue the {what} in --out from its saved state")
    p.add_argument("--overwrite", action="store_true", help=f"replace a {what} already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a preset (default: shakespeare-char)",
        description="Train a model. Text files are prepared on the fly into the cache.",
    )
    p.add_argument("--preset", default="shakespeare-char", help="preset name or a .toml file")
    p.add_argument(
        "--compile",
        dest="train.compile",
        action="store_const",
        const="true",
        help="use torch.compile (= --train.compile true)",
    )
    _run_flags(p)
    _add_config_flags(p)


def _parser_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint or Hugging Face model on text or instruction data",
        description="Fine-tune a pretrained model (full or LoRA). --data takes plain text, or "
        "JSONL with prompt/response or chat messages (loss on the replies only).",
    )
    p.add_argument("checkpoint", help="lmforge checkpoint or Hugging Face model directory")
    p.add_argument("--preset", default="finetune", help="preset with the training settings")
    p.add_argument("--lora-rank", dest="finetune.lora_rank", help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", dest="finetune.lora_alpha")
    p.add_argument(
        "--lora-targets",
        dest="finetune.lora_targets",
        help="comma-separated layers (attn.c_attn, mlp.c_fc, ... or q_proj, up_proj, ...; all-linear)",
    )
    p.add_argument("--layer-lr-decay", dest="finetune.layer_lr_decay", help="layer-wise learning-rate decay")
    p.add_argument("--seq-len", dest="finetune.seq_len", help="training window in tokens")
    _shared(p, "--revision")
    _run_flags(p)
    _add_config_flags(p)


def _parser_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize text into a prepared data directory",
        description="Read text (files, folders, JSONL), train or load a tokenizer, "
        "split, and write token files plus meta.json.",
    )
    p.add_argument("paths", nargs="+", help="text files, folders of text files, or .jsonl files")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--tokenizer", default="char", help="char, word, bpe, or a tokenizer.json path")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size for bpe/word")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-file", default="", help="validation text instead of a fraction")
    p.add_argument("--text-field", default="text", help="JSONL field that holds the text")
    p.add_argument("--encoding", default="utf-8")
    p.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"])
    p.add_argument("--clean", action="store_true", help="strip control characters, collapse spaces")
    p.add_argument("--dedup", action="store_true", help="drop duplicate documents")
    p.add_argument("--overwrite", action="store_true")


def _parser_generate(sub) -> None:
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
    _shared(p, "--device", "--dtype", "--quantize", "--adapter", "--revision", "--compile")
    _generation_flags(p, max_new_tokens=200, temperature=0.8)


def _parser_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (perplexity, bits/byte) or score hypotheses",
        description="Language-model metrics of CHECKPOINT on --data (default: its validation "
        "split), or BLEU/chrF/ROUGE/accuracy of --hyp (or of greedy "
        "continuations of --prompts) against --ref files.",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory")
    p.add_argument(
        "--data", help="text file or prepared directory (default: the checkpoint's validation split)"
    )
    p.add_argument("--context", type=int, help="window length in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: = context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--metric", default="bleu,chrf", help="comma-separated: bleu, chrf, rouge, accuracy")
    p.add_argument("--hyp", help="hypotheses, one per line")
    p.add_argument(
        "--ref", action="append", default=[], help="references, one per line (repeat for more sets)"
    )
    p.add_argument("--prompts", help="generate hypotheses from these prompts (one per line) with CHECKPOINT")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--beams", type=int, default=4, help="encoder–decoder checkpoints: beam width (1 = greedy)"
    )
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="encoder–decoder checkpoints: no n-gram twice in an output (default: the task's)")  # fmt: skip
    _shared(p, "--device", "--dtype", "--quantize", "--adapter", "--revision")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--output", help="also write the JSON result to this file")


def _parser_train_classifier(sub) -> None:
    p = sub.add_parser(
        "train-classifier",
        help="train a text classifier (e.g. sentiment) on labeled data",
        description="Train a classifier on TSV/CSV (with a header) or JSONL: a bidirectional "
        "LSTM from scratch, or the body of a language-model checkpoint (--init).",
    )
    p.add_argument("--data", required=True, help="training examples")
    p.add_argument("--val", default="", help="validation examples (default: 10%% of --data held out)")
    p.add_argument("--text-column", default="", help="default: sentence/text/review/...")
    p.add_argument("--label-column", default="", help="default: label/sentiment/class/...")
    p.add_argument("--init", default="", help="language-model checkpoint: reuse its tokenizer and body")
    p.add_argument(
        "--init-layers",
        type=int,
        default=0,
        metavar="N",
        help="keep only the first N blocks of the --init body (0 = all): faster per example",
    )
    p.add_argument("--init-embeddings", default="", metavar="VECTORS",
                   help="word2vec/GloVe vectors (e.g. from `lmforge embeddings train`) for the word embedding; "
                   "their width must equal --n-embd")  # fmt: skip
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="keep the pretrained embeddings (--init or --init-embeddings) fixed: faster steps")  # fmt: skip
    p.add_argument(
        "--body",
        choices=["bilstm", "gpt"],
        default="bilstm",
        help="from scratch: bidirectional LSTM, or a Transformer decoder (gpt)",
    )
    p.add_argument("--n-head", type=int, default=4, help="attention heads of a gpt body")
    p.add_argument("--out", default="out/classifier")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab-size", type=int, default=20000, help="word vocabulary (from scratch)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--pooling", choices=["mean", "max", "last"], default="max")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--class-weights", action="store_true", help="weight classes by inverse frequency")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batches of similar-length texts (less padding); off: batches drawn purely at random")  # fmt: skip
    p.add_argument("--patience", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0 = each epoch)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this many minutes (the learning rate then decays over them)",
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--loggers", default="", help="beside metrics.jsonl, comma-separated: csv, tensorboard")
    _privacy_flags(p)
    _shared(p, "--device")
    _run_flags(p, "training")


def _privacy_flags(parser: argparse.ArgumentParser) -> None:
    """--privacy.target_epsilon and the rest, from PrivacyConfig (as `train` has them for every section)."""
    import dataclasses

    from lmforge.config import PrivacyConfig

    group = parser.add_argument_group("differential privacy (DP-SGD through Opacus)")
    for f in dataclasses.fields(PrivacyConfig):
        flags = [f"--privacy.{f.name}", f"--privacy.{f.name.replace('_', '-')}"]
        group.add_argument(*dict.fromkeys(flags), dest=f"privacy.{f.name}", type=float, default=f.default,
                           metavar="FLOAT", help=f.metadata.get("help"))  # fmt: skip


def _parser_translate(sub) -> None:
    _transduce_flags(sub.add_parser("translate", help="translate texts with an encoder–decoder checkpoint"))


def _parser_summarize(sub) -> None:
    _transduce_flags(sub.add_parser("summarize", help="summarize texts with an encoder–decoder checkpoint"))


def _transduce_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--text", action="append", default=None, help="a text (repeatable)")
    p.add_argument("--file", help="one text per line ('-' = standard input)")
    p.add_argument("--beams", type=int, default=4, help="beam width (1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="a finished hypothesis scores log-probability / length**this (> 1 favours longer)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the model's target length")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="no n-gram twice in an output (0 = off; default 3 for summarize, 0 for translate)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=0,
                   help="texts decoded together (0 = 64-256 hypotheses, fewer for longer texts)")  # fmt: skip
    _shared(p, "--device", "--dtype")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _parser_classify(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a classifier checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--text", action="append", default=None, help="a text (repeatable)")
    p.add_argument("--file", help="one text per line ('-' = standard input)")
    _shared(p, "--device")
    p.add_argument("--json", action="store_true")


def _parser_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API with a web chat page"
    )
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 requests (visible "
        "in `ps`: prefer $LMFORGE_API_KEY or --api-key-file)",
    )
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument("--allowed-host", action="append", default=None,
                   help="a Host name the server answers to (repeatable; default: loopback names when bound to "
                        "loopback, any otherwise)")  # fmt: skip
    _shared(p, "--device", "--dtype", "--quantize", "--adapter", "--revision")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (1 = no batching)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting sequences before answering 503")
    p.add_argument("--max-tokens-cap", type=int, default=2048, help="the most tokens one request may ask for")


def _parser_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal")
    p.add_argument("checkpoint")
    p.add_argument("--system", default=None, help="system prompt")
    _shared(p, "--device", "--dtype", "--quantize", "--adapter", "--revision", "--compile")
    _generation_flags(p, temperature=0.8, top_p=0.95, max_new_tokens=None)


def _parser_convert(sub) -> None:
    p = sub.add_parser(
        "convert", help="import a Hugging Face model directory or a GGUF file as an lmforge checkpoint"
    )
    p.add_argument("hf_dir", metavar="MODEL", help="Hugging Face folder or hub id, or a .gguf file")
    _shared(p, "--revision")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true")


def _parser_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory or a GGUF file")
    p.add_argument("checkpoint")
    _shared(p, "--revision")
    p.add_argument("--out", required=True, help="directory that transformers loads, or a .gguf file")
    p.add_argument(
        "--format",
        choices=["hf", "gguf"],
        default=None,
        help="hf (a transformers directory) or gguf (llama.cpp, Ollama); default: from --out",
    )
    p.add_argument(
        "--quantize",
        choices=["f32", "f16", "bf16", "q8_0"],
        default="f32",
        help="GGUF: how the matrices are stored (norms stay f32)",
    )
    p.add_argument("--overwrite", action="store_true")


def _parser_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="why a model decided: attention maps, attributions, per-token loss",
        description="Explain a classifier's label or a language model's next token for a text: attention "
        "maps per layer and head, integrated-gradients attributions per token (captum), and for language "
        "models the loss of each token. Writes PNG figures, explain.html (self-contained) and explain.json.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--text", required=True)
    p.add_argument(
        "--target", default=None, help="the label / next token to explain (default: the predicted one)"
    )
    p.add_argument(
        "--out", default="out/explain", help="folder for the figures, explain.html and explain.json"
    )
    p.add_argument(
        "--steps", type=int, default=64, help="integration steps (more: a smaller convergence delta)"
    )
    _shared(p, "--device")


def _parser_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="search hyper-parameters with Optuna (TPE, pruning, a resumable SQLite study)",
        description="Train a preset many times with settings sampled from a search space (TOML: one "
        "table per setting, e.g. [optim.lr] low = 1e-4, high = 1e-2, log = true; or choices = [...]). "
        "Bad trials are pruned from their validation loss. The study lives in OUT/study.db: the same "
        "command continues it, and several processes can share it. Writes OUT/best.toml (a preset) and "
        "OUT/search.png.",
    )
    p.add_argument("--preset", default="shakespeare-char", help="the config the search starts from")
    p.add_argument("--space", required=True, help="search space TOML file")
    p.add_argument("--trials", type=int, default=20, help="trials in the study (over all runs and workers)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the study on this machine")
    p.add_argument("--timeout", type=float, default=0.0, help="stop starting trials after this many seconds")
    p.add_argument("--trial-time", type=float, default=0.0,
                   help="training-time budget of each trial in seconds (= --train.max_time_s)")  # fmt: skip
    p.add_argument("--no-pruning", action="store_true", help="let every trial finish")
    _add_config_flags(p)


def _parser_embeddings(sub) -> None:
    p = sub.add_parser(
        "embeddings",
        help="train word vectors (Word2Vec) and query them",
        description="Word vectors with gensim: train skip-gram or CBOW vectors on text, list a word's "
        "neighbors, solve analogies. Use them to start a model with --init-embeddings.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    t = actions.add_parser("train", help="train vectors on text files (TSV/CSV/JSONL: the text column)")
    t.add_argument("corpus", nargs="+", help="text files, one sentence per line")
    t.add_argument("--out", default="out/vectors.txt", help="word2vec text format; a .bin name writes binary")
    defaults = _embeddings_defaults()
    t.add_argument("--method", choices=["skipgram", "cbow"], default=defaults.method)
    for name in ("dim", "window", "min_count", "epochs", "negative", "seed", "workers"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    t.add_argument("--lowercase", action="store_true", help="fold words to lower case")
    t.add_argument(
        "--text-column",
        default="",
        help="TSV/CSV/JSONL corpora: the text column (default: text/sentence/...)",
    )
    t.add_argument("--overwrite", action="store_true")
    n = actions.add_parser("neighbors", help="the words nearest to a word")
    n.add_argument("vectors", help="word2vec text/binary or GloVe text file")
    n.add_argument("--word", required=True)
    n.add_argument("--topn", type=int, default=10)
    a = actions.add_parser("analogy", help="a - b + c: --positive king woman --negative man")
    a.add_argument("vectors")
    a.add_argument("--positive", nargs="+", required=True)
    a.add_argument("--negative", nargs="*", default=[])
    a.add_argument("--topn", type=int, default=5)


def _embeddings_defaults():
    from lmforge.embeddings import EmbeddingsConfig

    return EmbeddingsConfig()


def _parser_presets(sub) -> None:
    p = sub.add_parser("presets", help="list presets, or show one")
    p.add_argument("--show", metavar="NAME", help="print the full resolved config of a preset")


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


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.config import apply_overrides, load_preset, validate

    config = apply_overrides(load_preset(args.preset), _overrides(args))
    validate(config)  # before importing torch: a mistake is reported at once
    from lmforge.training.trainer import train

    if args.quiet:
        config.train.progress = False
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    spent = f", privacy spent ε = {result.privacy['epsilon']:.2f}" if result.privacy else ""
    print(
        f"Done: {result.step} steps in {result.elapsed_s:.1f}s, best validation loss "
        f"{result.best_val_loss:.4f}{spent}. Checkpoint: {result.out}"
    )
    if result.sample:
        print("---- sample ----")
        print(result.sample)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.config import apply_overrides, load_preset, validate

    overrides = _overrides(args)
    if not overrides.get("data.path"):
        raise UserError("Give the fine-tuning data with --data FILE (text, or JSONL with prompt/response).")
    overrides["finetune.init_from"] = args.checkpoint
    config = apply_overrides(load_preset(args.preset), overrides)
    if not config.train.out:
        config.train.out = f"out/{Path(args.checkpoint).resolve().name}-finetuned"
    validate(config)
    from lmforge.training.trainer import train

    if args.quiet:
        config.train.progress = False
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    print(
        f"Done: {result.step} steps in {result.elapsed_s:.1f}s, best validation loss {result.best_val_loss:.4f}; "
        f"{result.trainable_params:,} trainable parameters, optimizer state "
        f"{result.optimizer_state_bytes / 2**20:.1f} MiB, peak memory {result.peak_memory_bytes / 2**20:.0f} MiB. "
        f"Checkpoint: {result.out}"
    )
    if result.sample:
        print("---- sample ----")
        print(result.sample)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmforge.config import DataConfig
    from lmforge.data.prepare import prepare

    out = Path(args.out)
    if (out / "meta.json").exists() and not args.overwrite:
        raise UserError(f"{out} already holds prepared data; pass --overwrite to replace it.")
    cfg = DataConfig(
        path=",".join(args.paths),
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        val_path=args.val_file,
        text_field=args.text_field,
        encoding=args.encoding,
        errors=args.errors,
        clean=args.clean,
        dedup=args.dedup,
    )
    if not 0.0 < cfg.val_fraction < 1.0 and not cfg.val_path:
        raise UserError("--val-fraction must be between 0 and 1.")
    data = prepare([Path(p) for p in args.paths], out, cfg)
    meta = data.meta
    print(
        f"Wrote {out}: {meta['tokenizer']['kind']} tokenizer with {meta['tokenizer']['vocab_size']} tokens, "
        f"{meta['train_tokens']:,} training and {meta['val_tokens']:,} validation tokens ({meta['dtype']})."
    )
    return 0


def _note(message: str) -> None:
    print(f"lmforge: note: {message}", file=sys.stderr)


def _read_stdin() -> str:
    """Standard input as text: the one reader of every command that takes it (UTF-8, or one error)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"Standard input is not valid utf-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None  # fmt: skip


def _read_lines_of(path: str, what: str) -> list[str]:
    """The non-empty lines of a file, or of standard input for "-"; an empty source is one error."""
    text = _read_stdin() if path == "-" else _read_text(path)
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        raise UserError(
            f"{'Standard input' if path == '-' else path} holds no {what}; give at least one line."
        )
    return lines


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += _read_lines_of(args.prompt_file, "prompts")
    elif not prompts and not sys.stdin.isatty():
        try:  # piped prompts: `echo "ROMEO:" | lmforge generate out/run`
            prompts += [line for line in _read_stdin().split("\n") if line.strip()]
        except (OSError, ValueError):  # no readable standard input
            pass
    return prompts or [""]


def _read_text(path: str) -> str:
    from lmforge.data.corpus import read_text_file

    return read_text_file(Path(path))


def _open(path: str, command: str):
    """The checkpoint, opened once for the whole command, if its model's family serves `command`."""
    from lmforge.checkpoint import open_checkpoint

    return open_checkpoint(path).require(command)


def _load_for_generation(args: argparse.Namespace, opened):
    """The model and tokenizer of `generate` and `chat`, as their flags ask."""
    from lmforge.inference import load_for_inference

    return load_for_inference(
        opened,
        args.device,
        args.dtype,
        args.quantize,
        args.adapter,
        notice=_note,
        compile=args.compile,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.generation import generate, stream

    opened = _open(args.checkpoint, "generate")
    config = _generation_config(args, opened.generation.sampling)  # checked before the model loads
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1.")
    model, tokenizer = _load_for_generation(args, opened)
    prompts = _read_prompts(args)
    warn = lambda message: print(f"lmforge: warning: {message}", file=sys.stderr)  # noqa: E731
    for i in range(args.num_samples):
        cfg = replace(config, seed=None if config.seed is None else config.seed + i)
        if args.no_stream or len(prompts) > 1:
            for prompt, text in zip(prompts, generate(model, tokenizer, prompts, cfg, warn), strict=True):
                print(prompt + text)
                if len(prompts) > 1 or args.num_samples > 1:
                    print("---")
        else:
            print(prompts[0], end="", flush=True)
            for piece in stream(model, tokenizer, prompts[0], cfg, warn):
                print(piece, end="", flush=True)
            print()
            if args.num_samples > 1:
                print("---")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from lmforge.evaluation.run import (
        _read_lines,
        evaluate,
        format_report,
        generate_hypotheses,
        score_files,
        score_lines,
    )

    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    if args.hyp:
        result = score_files(args.hyp, args.ref, metrics)
    elif args.prompts:
        if not args.checkpoint:
            raise UserError("--prompts needs a CHECKPOINT to generate with.")
        if not args.ref:
            raise UserError("Give the references for the prompts with --ref.")
        hyps = generate_hypotheses(
            args.checkpoint, args.prompts, args.max_new_tokens, args.device, args.adapter
        )
        result = score_lines(hyps, [_read_lines(r) for r in args.ref], metrics)
    elif args.checkpoint and (family := _family(args.checkpoint)) and family.evaluate:
        from lmforge.checkpoint import open_checkpoint

        opened = open_checkpoint(args.checkpoint)
        result = family.evaluate(opened, args.data, args.beams, args.no_repeat_ngram_size, args.device)
    elif args.checkpoint and _is_classifier(args.checkpoint):
        if not args.data:
            raise UserError("Evaluating a classifier needs labeled examples: pass --data FILE.tsv.")
        from lmforge.data.labeled import read_labeled
        from lmforge.training.classify import evaluate_classifier, load_classifier

        model, tokenizer, labels = load_classifier(args.checkpoint, args.device)
        texts, gold = read_labeled(args.data)
        result = {
            "checkpoint": args.checkpoint,
            "data": args.data,
            "examples": len(texts),
            **evaluate_classifier(model, tokenizer, labels, texts, gold, args.device),
        }
    elif args.checkpoint:
        result = evaluate(
            args.checkpoint,
            args.data,
            args.context,
            args.stride,
            args.batch_size,
            args.device,
            progress=sys.stderr.isatty(),
            dtype=args.dtype,
            quantize=args.quantize,
            adapter=args.adapter,
        )
    else:
        raise UserError("Give a CHECKPOINT to evaluate, or --hyp and --ref files to score.")
    if args.output:
        from lmforge.io import atomic_write_json

        atomic_write_json(args.output, result)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from lmforge.config import PrivacyConfig
    from lmforge.models.classifier import ClassifierConfig
    from lmforge.training.classify import ClassifierTrainConfig, train_classifier

    cfg = ClassifierTrainConfig(
        train_path=args.data,
        val_path=args.val,
        text_column=args.text_column,
        label_column=args.label_column,
        out=args.out,
        init=args.init,
        init_layers=args.init_layers,
        init_embeddings=args.init_embeddings,
        freeze_embeddings=args.freeze_embeddings,
        group_by_length=args.group_by_length,
        vocab_size=args.vocab_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        class_weights=args.class_weights,
        patience=args.patience,
        eval_every=args.eval_every,
        max_minutes=args.max_minutes,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        loggers=args.loggers,
        gpt_heads=args.n_head,
        privacy=PrivacyConfig(
            **{k.split(".")[1]: v for k, v in vars(args).items() if k.startswith("privacy.")}
        ),
        model=ClassifierConfig(
            body=args.body,
            n_embd=args.n_embd,
            hidden_size=args.hidden_size,
            n_layer=args.n_layer,
            dropout=args.dropout,
            pooling=args.pooling,
            max_length=args.max_length,
        ),
    )
    result = train_classifier(cfg, overwrite=args.overwrite, resume=args.resume)
    print(
        f"Done: {result['steps']} steps in {result['elapsed_s']:.0f}s, best validation accuracy "
        f"{result['best_val_accuracy']:.4f}"
        + (f", privacy spent ε = {result['epsilon']:.2f}" if result["epsilon"] is not None else "")
        + f". Checkpoint: {result['out']}"
    )
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    import json

    from lmforge.training.classify import load_classifier, predict

    texts = list(args.text or [])
    if args.file:
        texts += _read_lines_of(args.file, "texts")
    if not texts:
        raise UserError("Give texts to classify with --text or --file.")
    model, tokenizer, labels = load_classifier(args.checkpoint, args.device)
    probs = predict(model, tokenizer, texts, device=args.device)
    for text, p in zip(texts, probs.tolist(), strict=True):
        best = max(range(len(labels)), key=lambda i: p[i])
        if args.json:
            print(
                json.dumps(
                    {
                        "text": text,
                        "label": labels[best],
                        "probabilities": {lb: round(x, 5) for lb, x in zip(labels, p, strict=True)},
                    }
                )
            )
        else:
            shown = "  ".join(f"{lb}: {x:.3f}" for lb, x in zip(labels, p, strict=True))
            print(f"{labels[best]}\t({shown})\t{text}")
    return 0


def cmd_transduce(args: argparse.Namespace) -> int:
    import json

    from lmforge.inference import load_for_inference
    from lmforge.seq2seq import Seq2SeqConfig, task_defaults, transduce

    texts = list(args.text or [])
    if args.file:
        texts += _read_lines_of(args.file, "texts")
    if not texts:
        raise UserError(f"Give texts to {args.command} with --text or --file.")
    task = "translation" if args.command == "translate" else "summarization"
    settings = task_defaults(task, no_repeat_ngram_size=args.no_repeat_ngram_size)
    negative = min(args.batch_size, args.max_new_tokens, settings["no_repeat_ngram_size"]) < 0
    if args.beams < 1 or negative:
        raise UserError("--beams must be at least 1, --batch-size, --max-new-tokens and --no-repeat-ngram-size "
                        "at least 0.")  # fmt: skip
    model, tokenizer = load_for_inference(args.checkpoint, args.device, args.dtype)
    cfg = Seq2SeqConfig(beams=args.beams, length_penalty=args.length_penalty, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, **settings)  # fmt: skip
    key = "translation" if args.command == "translate" else "summary"
    for text, output in zip(texts, transduce(model, tokenizer, texts, cfg), strict=True):
        print(json.dumps({"text": text, key: output}, ensure_ascii=False) if args.json else output)
    return 0


def _family(path: str):
    """The family of the checkpoint's model (None: a classifier, or not a checkpoint)."""
    from lmforge.checkpoint import open_checkpoint
    from lmforge.families import family_of

    try:
        config = open_checkpoint(path).config  # (a classifier has no language-model config)
    except UserError:
        return None
    return config and family_of(config.model.arch)


def _is_classifier(path: str) -> bool:
    from lmforge.training.classify import is_classifier

    return is_classifier(path)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lmforge.serving.server import serve
    except ImportError as e:
        raise UserError(
            f"Serving needs FastAPI and uvicorn ({e.name} is missing): pip install 'lmforge[serve]'."
        ) from None
    if args.max_batch < 1 or args.max_queue < 1 or args.max_tokens_cap < 1:
        raise UserError("--max-batch, --max-queue and --max-tokens-cap must be at least 1.")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, not {args.port}.")
    serve(
        args.checkpoint,
        args.host,
        args.port,
        _api_key(args),
        args.device,
        args.dtype,
        args.quantize,
        args.max_batch,
        args.max_queue,
        args.max_tokens_cap,
        adapter=args.adapter,
        allowed_hosts=args.allowed_host,
    )
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file, else $LMFORGE_API_KEY (None: no key needed)."""
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text("utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"Cannot read the API key file {args.api_key_file} ({e}).") from None
        if not key or not key[0].strip():
            raise UserError(f"The API key file {args.api_key_file} is empty.")
        return key[0].strip()
    return args.api_key or os.environ.get("LMFORGE_API_KEY") or None


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.chat import chat_template_of, terminal_chat

    opened = _open(args.checkpoint, "chat")
    recommended = opened.generation.sampling
    _generation_config(args, recommended, max_new_tokens=args.max_new_tokens or 1)  # checked before loading
    model, tokenizer = _load_for_generation(args, opened)
    if args.max_new_tokens is None:
        args.max_new_tokens = min(256, model.block_size // 2)
    if args.max_new_tokens >= model.block_size:
        raise UserError(f"--max-new-tokens must be below the model's context ({model.block_size}).")
    config = _generation_config(args, recommended)
    from contextlib import nullcontext

    from lmforge.chat import line_editing
    from lmforge.io import cache_dir

    interactive = sys.stdin.isatty()  # line editing and history for a person typing, not for piped input
    with line_editing(cache_dir() / "chat_history") if interactive else nullcontext():
        terminal_chat(
            model, tokenizer, chat_template_of(args.checkpoint, args.adapter), config, system=args.system
        )
    return 0


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite or choose another --out.")


def cmd_convert(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import GGUF, HUGGING_FACE, open_checkpoint, save_checkpoint

    source, out = Path(args.hf_dir), Path(args.out)
    opened = open_checkpoint(source)
    if opened.kind not in (HUGGING_FACE, GGUF):
        raise UserError(f"{source} is neither a Hugging Face model directory (config.json with a model_type) "
                        f"nor a GGUF file; it is already an lmforge checkpoint.")  # fmt: skip
    _check_target(out, args.overwrite)
    model, tokenizer = opened.load()
    config = opened.config
    info = {"imported_from": str(source.resolve()), "chat_template": opened.chat_template,
            "eos_token_ids": list(opened.generation.eos_token_ids),
            "sampling_defaults": opened.generation.sampling, "bos_token_id": opened.generation.bos_token_id}  # fmt: skip
    save_checkpoint(out, model, config, tokenizer, info)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"Wrote {out}: {config.description}, {params / 1e6:.2f}M parameters, "
        f"{config.model.n_layer} layers, vocabulary {tokenizer.vocab_size}."
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import open_checkpoint

    out = Path(args.out)
    fmt = args.format or ("gguf" if out.suffix == ".gguf" else "hf")
    if fmt == "gguf" and out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite or choose another --out.")
    if fmt == "hf":
        _check_target(out, args.overwrite)
    opened = open_checkpoint(args.checkpoint)
    model, tokenizer = opened.load()
    if fmt == "gguf":
        from lmforge.interop.gguf import export_gguf

        export_gguf(model, tokenizer, opened.config, out, args.quantize, opened.chat_template,
                    opened.generation.eos_token_ids)  # fmt: skip
        print(f"Wrote {out} ({args.quantize}): run it with llama.cpp (llama-cli -m {out}) or Ollama.")
        return 0
    from lmforge.interop.hf import export_hf

    export_hf(model, tokenizer, opened.config, out, opened.chat_template, opened.generation.eos_token_ids,
              opened.generation.sampling)  # fmt: skip
    print(f"Wrote {out}: load it with transformers' AutoModelForCausalLM.from_pretrained({str(out)!r}).")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from lmforge.config import load_preset, preset_names

    if args.show:
        import json

        print(json.dumps(load_preset(args.show).to_dict(), indent=2))
        return 0
    names = preset_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {load_preset(name).description}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from lmforge.explain import explain, load_for_explaining, write_report

    model, tokenizer, labels = load_for_explaining(args.checkpoint, args.device)
    e = explain(model, tokenizer, args.text, labels, args.target, args.steps)
    written = write_report(e, args.out)
    ranked = sorted(zip(e.tokens, e.attributions, strict=True), key=lambda pair: -abs(pair[1]))[:5]
    print(f"{e.kind}: {e.decision!r} (p = {e.probability:.3f})")
    print("most influential tokens: " + ", ".join(f"{t!r} {a:+.3f}" for t, a in ranked))
    print(
        f"attributions add up to {sum(e.attributions):.4f}; logit change from the baseline {e.output_difference:.4f}"
    )
    print(f"Wrote {', '.join(str(p) for p in written.values())}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from lmforge.config import apply_overrides, load_preset

    overrides = _overrides(args)
    out = overrides.pop("train.out", None) or "out/tune"  # the study's folder; each trial gets one inside
    if args.trial_time:
        overrides["train.max_time_s"] = args.trial_time
    base = apply_overrides(load_preset(args.preset), overrides)
    from lmforge.tune import TuneSettings, tune

    settings = TuneSettings(out=out, trials=args.trials, workers=args.workers, seed=base.train.seed,
                            timeout_s=args.timeout, pruning=not args.no_pruning)  # fmt: skip
    tune(base, args.space, settings)
    return 0


def cmd_embeddings(args: argparse.Namespace) -> int:
    from lmforge import embeddings

    if args.action == "train":
        if Path(args.out).exists() and not args.overwrite:
            raise UserError(f"{args.out} already exists; pass --overwrite or choose another --out.")
        cfg = embeddings.EmbeddingsConfig(method=args.method, dim=args.dim, window=args.window,
                                          min_count=args.min_count, epochs=args.epochs, negative=args.negative,
                                          lowercase=args.lowercase, seed=args.seed, workers=args.workers,
                                          text_column=args.text_column)  # fmt: skip
        info = embeddings.train_vectors(args.corpus, args.out, cfg)
        print(f"Wrote {info['out']}: {info['words']:,} words x {info['dim']} ({cfg.method}, "
              f"{info['corpus_words']:,} words of text in {info['sentences']:,} lines).")  # fmt: skip
        return 0
    if args.topn < 1:
        raise UserError("--topn must be at least 1.")
    vectors = embeddings.load_vectors(args.vectors)
    if args.action == "neighbors":
        found = embeddings.neighbors(vectors, args.word, args.topn)
    else:
        found = embeddings.analogy(vectors, args.positive, args.negative, args.topn)
    for word, similarity in found:
        print(f"{similarity:.4f}  {word}")
    return 0


# name: (parser, command); the parser functions above each add one subcommand.
SUBCOMMANDS = {
    "train": (_parser_train, cmd_train),
    "finetune": (_parser_finetune, cmd_finetune),
    "prepare": (_parser_prepare, cmd_prepare),
    "generate": (_parser_generate, cmd_generate),
    "eval": (_parser_eval, cmd_eval),
    "train-classifier": (_parser_train_classifier, cmd_train_classifier),
    "classify": (_parser_classify, cmd_classify),
    "translate": (_parser_translate, cmd_transduce),
    "summarize": (_parser_summarize, cmd_transduce),
    "serve": (_parser_serve, cmd_serve),
    "chat": (_parser_chat, cmd_chat),
    "convert": (_parser_convert, cmd_convert),
    "export": (_parser_export, cmd_export),
    "explain": (_parser_explain, cmd_explain),
    "tune": (_parser_tune, cmd_tune),
    "embeddings": (_parser_embeddings, cmd_embeddings),
    "presets": (_parser_presets, cmd_presets),
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
