"""`lmforge convert` and `lmforge export`: checkpoints in and out of Hugging Face and GGUF formats."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import add_shared, check_target
from lmforge.errors import UserError
from lmforge.families import family_of
from lmforge.io import check_output, write_folder


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="import a Hugging Face model directory or a GGUF file as an lmforge checkpoint"
    )
    p.add_argument("hf_dir", metavar="MODEL", help="Hugging Face folder or hub id, or a .gguf file")
    add_shared(p, "--revision")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory or a GGUF file")
    p.add_argument("checkpoint")
    add_shared(p, "--revision")
    p.add_argument("--out", required=True, help="directory that transformers loads, or a .gguf file")
    p.add_argument(
        "--format",
        choices=["hf", "gguf"],
        default=None,
        help="hf (a transformers directory) or gguf (llama.cpp, Ollama); default: from --out",
    )
    p.add_argument(
        "--quantize",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"],
        default="f32",
        help="GGUF: how the matrices are stored (norms stay f32); q4_0/q4_1: 4 bits a weight, rows a multiple of 32",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="GGUF: write only the LoRA adapters of a finetune run, for llama.cpp's --lora beside the base's GGUF",
    )
    p.add_argument("--overwrite", action="store_true")


def cmd_convert(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import GGUF, HUGGING_FACE, open_checkpoint, save_checkpoint

    source, out = Path(args.hf_dir), check_output(args.out, "folder", "out")
    opened = open_checkpoint(source)
    if opened.kind not in (HUGGING_FACE, GGUF):
        raise UserError(f"{source} is neither a Hugging Face model directory (config.json with a model_type) "
                        f"nor a GGUF file; it is already an lmforge checkpoint.")  # fmt: skip
    check_target(out, args.overwrite)
    model, tokenizer = opened.load()
    config = opened.config
    info = {"imported_from": str(source.resolve()), "chat_template": opened.chat_template,
            "eos_token_ids": list(opened.generation.eos_token_ids),
            "sampling_defaults": opened.generation.sampling, "bos_token_id": opened.generation.bos_token_id}  # fmt: skip
    write_folder(out, lambda tmp: save_checkpoint(tmp, model, config, tokenizer, info), args.overwrite)
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
    check_output(out, "file" if fmt == "gguf" else "folder", "out")
    if fmt == "gguf" and out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite or choose another --out.")
    if fmt == "hf":
        check_target(out, args.overwrite)
    opened = open_checkpoint(args.checkpoint)
    if args.lora:
        if fmt != "gguf":
            raise UserError("--lora writes a GGUF LoRA adapter: give --out a .gguf file (a LoRA run's folder is "
                            "already a PEFT adapter for transformers).")  # fmt: skip
        from lmforge.interop.gguf import export_gguf_lora

        export_gguf_lora(opened, out)
        print(f"Wrote {out}: apply it with llama.cpp beside the base's GGUF export (llama-cli -m BASE.gguf "
              f"--lora {out}).")  # fmt: skip
        return 0
    model, tokenizer = opened.load()
    if fmt == "gguf":
        from lmforge.interop.gguf import export_gguf

        export_gguf(model, tokenizer, opened.config, out, args.quantize, opened.chat_template,
                    opened.generation.eos_token_ids)  # fmt: skip
        print(f"Wrote {out} ({args.quantize}): run it with llama.cpp (llama-cli -m {out}) or Ollama.")
        return 0
    from lmforge.interop.hf import export_hf

    def write(folder: Path) -> None:
        export_hf(model, tokenizer, opened.config, folder, opened.chat_template, opened.generation.eos_token_ids,
                  opened.generation.sampling)  # fmt: skip

    write_folder(out, write, args.overwrite)  # (over a training run: none of the run's files stay)
    auto = family_of(opened.config.model.arch).hf_auto_class
    print(f"Wrote {out}: load it with transformers' {auto}.from_pretrained({str(out)!r}).")
    return 0
