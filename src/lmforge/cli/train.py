"""`lmforge train`, `finetune`, `prepare`, `tune` and `presets`: runs built from a preset and overrides."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmforge.cli.common import add_config_flags, add_run_flags, add_shared, config_overrides
from lmforge.errors import UserError
from lmforge.io import check_output


def add_train_parser(sub) -> None:
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
    add_run_flags(p)
    add_config_flags(p)


def add_finetune_parser(sub) -> None:
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
    add_shared(p, "--revision")
    add_run_flags(p)
    add_config_flags(p)


def add_prepare_parser(sub) -> None:
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


def add_tune_parser(sub) -> None:
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
    add_config_flags(p)


def add_presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="list presets, or show one")
    p.add_argument("--show", metavar="NAME", help="print the full resolved config of a preset")


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.config import apply_overrides, load_preset, validate

    config = apply_overrides(load_preset(args.preset), config_overrides(args))
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

    overrides = config_overrides(args)
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

    out = check_output(args.out, "folder", "out")
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


def cmd_tune(args: argparse.Namespace) -> int:
    from lmforge.config import apply_overrides, load_preset

    overrides = config_overrides(args)
    out = overrides.pop("train.out", None) or "out/tune"  # the study's folder; each trial gets one inside
    if args.trial_time:
        overrides["train.max_time_s"] = args.trial_time
    base = apply_overrides(load_preset(args.preset), overrides)
    from lmforge.tune import TuneSettings, tune

    settings = TuneSettings(out=out, trials=args.trials, workers=args.workers, seed=base.train.seed,
                            timeout_s=args.timeout, pruning=not args.no_pruning)  # fmt: skip
    tune(base, args.space, settings)
    return 0
