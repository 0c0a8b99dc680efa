"""The checkpoint format, and the one place that opens any checkpoint.

An lmforge checkpoint is a directory of safetensors and JSON, never pickle:

    DIR/config.json          {"format": "lmforge-checkpoint", "version": 2, "config": {...},
                              "step": .., "val_loss": .., "chat_template": .., "task": ..}
    DIR/model.safetensors    the best weights so far (what `lmforge generate DIR` uses)
    DIR/tokenizer.json       the tokenizer
    DIR/adapter.safetensors  LoRA runs only: the adapters alone
    DIR/train_state/         what `--resume` needs (written by lmforge.training.state)

`open_checkpoint(path)` reads the metadata of any checkpoint without loading weights:
an lmforge run, an lmforge classifier, or a foreign format through its reader below
this module (a Hugging Face model directory: `lmforge.interop.hf`). Every command and
library function that takes a checkpoint goes through it; nothing else reads
`config.json` by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.config import Config, check_size, config_from_dict
from lmforge.errors import UserError
from lmforge.families import family_of
from lmforge.io import atomic_write_json
from lmforge.settings import check_fields
from lmforge.tokenizers import SOURCE_TOKENIZER, TextTokenizer, load_tokenizer
from lmforge.weights import load_weights, save_tensors, unique_state_dict, without_tied

FORMAT = "lmforge-checkpoint"
FORMAT_VERSION = 2  # 2: the config holds only the settings that apply (1: every field; still read)
LANGUAGE_MODEL, CLASSIFIER, HUGGING_FACE, GGUF = "lmforge", "classifier", "huggingface", "gguf"


@dataclass(frozen=True)
class GenerationDefaults:
    """What the checkpoint says about generating with it."""

    eos_token_ids: tuple[int, ...] = ()  # every id that ends a sequence (besides the tokenizer's end-of-text)
    sampling: dict[str, Any] = field(default_factory=dict)  # recommended temperature, top_p, top_k, ...
    bos_token_id: int | None = None  # the token a text starts from, when the model declares one


@dataclass
class Checkpoint:
    """A checkpoint's metadata, read without loading its weights."""

    path: Path
    kind: str  # LANGUAGE_MODEL, CLASSIFIER, HUGGING_FACE or GGUF
    config: Config | None  # the language model's run config (None for a classifier)
    metadata: dict[str, Any]  # the rest: step, val_loss, labels, finetuned_from, ...
    chat_template: str | None = None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    @property
    def is_classifier(self) -> bool:
        return self.kind == CLASSIFIER

    def require(self, command: str, instead: str = "") -> Checkpoint:
        """This checkpoint, or one sentence naming the commands that take it (or `instead`) when its
        model's family does not serve `command` (an encoder–decoder given to `generate`, say)."""
        if self.config is not None:
            family_of(self.config.model.arch).require(command, str(self.path), instead)
        return self

    def load(self, device: torch.device | str = "cpu") -> tuple[nn.Module, TextTokenizer]:
        """The language model (eval mode, float32) and its tokenizer."""
        if self.kind == CLASSIFIER:
            raise UserError(
                f"{self.path} is a text classifier; label texts with it (`lmforge classify`) or "
                f"evaluate it on labeled data (`lmforge eval` with data).",
                settings=("data",),
            )
        if self.kind == HUGGING_FACE:
            from lmforge.interop.hf import import_hf

            model, tokenizer, _ = import_hf(self.path, device)
        elif self.kind == GGUF:
            from lmforge.interop.gguf import import_gguf

            model, tokenizer, _ = import_gguf(self.path, device)
        else:
            from lmforge.models import build_model

            model = build_model(self.config.model)
            load_weights(self.path / "model.safetensors", model)
            model, tokenizer = model.to(device).eval(), load_tokenizer(self.path / "tokenizer.json")
        return model, self._checked(tokenizer)

    def tokenizer(self) -> TextTokenizer:
        if self.kind == HUGGING_FACE or self.metadata.get("hf_classifier"):
            from lmforge.interop.hf import load_hf_tokenizer

            tokenizer = load_hf_tokenizer(self.path)
        elif self.kind == GGUF:
            from lmforge.interop.gguf import load_gguf_tokenizer

            tokenizer = load_gguf_tokenizer(self.path)
        else:
            tokenizer = load_tokenizer(self.path / "tokenizer.json")
        return self._checked(tokenizer)

    def _checked(self, tokenizer: TextTokenizer) -> TextTokenizer:
        """The tokenizer, checked against the model, ending generation at every end-of-sequence
        id the checkpoint declares."""
        if self.config and tokenizer.vocab_size > self.config.model.vocab_size:
            raise UserError(f"{self.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{self.config.model.vocab_size}; the checkpoint's files do not belong together.")  # fmt: skip
        sources = self.config.model.source_vocab_size if self.config else 0
        if bool(sources) != (tokenizer.source is not None) or (
            sources and tokenizer.source.vocab_size > sources
        ):
            has = f"{tokenizer.source.vocab_size} source tokens" if tokenizer.source else "one vocabulary"
            wants = f"its own {sources} source tokens" if sources else "one vocabulary for both sides"
            raise UserError(f"{self.path}: the model has {wants} but the tokenizer files {has}; the checkpoint's "
                            f"files do not belong together.")  # fmt: skip
        tokenizer.extra_end_ids = tuple(self.generation.eos_token_ids)
        tokenizer.bos_id = self.generation.bos_token_id
        return tokenizer


def open_checkpoint(path: str | Path, revision: str | None = None) -> Checkpoint:
    """Read any checkpoint's metadata; a clear error when `path` is none.

    `path` is a local folder or file, or a Hugging Face hub id (`org/name`, `org/name@revision`)
    that is fetched into the hub cache on first use."""
    from lmforge.interop import gguf, hf, hub

    if not Path(path).exists() and hub.looks_like_hub_id(str(path)):
        path = hub.fetch(str(path), revision)
    path = Path(path)
    if not path.exists():
        raise UserError(f"Checkpoint {path} does not exist.")
    foreign = None
    if hf.is_hf_dir(path) and (classifier := hf.read_hf_classifier(path)) is not None:
        return Checkpoint(path, CLASSIFIER, None, classifier)
    if hf.is_hf_dir(path):
        foreign = HUGGING_FACE, hf.read_hf_metadata(path)
    elif path.suffix == ".gguf" or gguf.is_gguf(path):
        foreign = GGUF, gguf.read_gguf_metadata(path)
    if foreign:
        kind, (config, template, eos_ids, sampling, bos) = foreign
        defaults = GenerationDefaults(tuple(eos_ids), sampling, bos)
        checkpoint = Checkpoint(
            path, kind, config, {"imported_from": str(path.resolve())}, template, defaults
        )
    else:
        checkpoint = _open_lmforge(path)
    if checkpoint.config is not None:  # a damaged or hostile config must not reach the model's constructor
        try:
            check_fields(checkpoint.config.model, "model.")
            check_size(checkpoint.config.model)
        except UserError as e:
            raise UserError(
                f"{path}: {e} The checkpoint's config is damaged or not meant for this machine."
            ) from None
    return checkpoint


def _open_lmforge(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise UserError(f"{path} is not an lmforge checkpoint (no config.json); give a run directory.")
    try:
        data = json.loads(config_file.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file} is not valid JSON ({e}); the checkpoint is corrupt.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an lmforge checkpoint ({config_file} was written by another tool).")
    version = data.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{config_file}: its version must be a whole number, not {version!r}; the checkpoint is "
                        f"damaged.")  # fmt: skip
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer lmforge; upgrade lmforge to read it.")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise UserError(f"Checkpoint {path} is incomplete: {name} is missing.")
    template = data.get("chat_template") if isinstance(data.get("chat_template"), str) else None
    if data.get("task") == "classification":
        return Checkpoint(path, CLASSIFIER, None, data, template)
    config = config_from_dict(data.get("config", {}), source=str(config_file))
    eos = tuple(i for i in data.get("eos_token_ids", []) if isinstance(i, int))  # kept from an imported model
    sampling = data.get("sampling_defaults") if isinstance(data.get("sampling_defaults"), dict) else {}
    bos = data.get("bos_token_id") if isinstance(data.get("bos_token_id"), int) else None
    return Checkpoint(path, LANGUAGE_MODEL, config, data, template, GenerationDefaults(eos, sampling, bos))


def load_checkpoint(
    path: str | Path | Checkpoint, device: torch.device | str = "cpu"
) -> tuple[nn.Module, TextTokenizer, Config]:
    """Open a language-model checkpoint (or load one already opened): the model (in eval mode), its
    tokenizer and its config."""
    checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    model, tokenizer = checkpoint.load(device)
    return model, tokenizer, checkpoint.config


def write_checkpoint(
    out: Path, tensors: dict[str, torch.Tensor], tokenizer: TextTokenizer, metadata: dict[str, Any]
) -> None:
    """Write weights, tokenizer and config.json (last, so a complete directory has a config)."""
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", tensors)
    tokenizer.save(out / "tokenizer.json")
    if tokenizer.source is not None:  # an encoder–decoder whose sources have their own vocabulary
        tokenizer.source.save(out / SOURCE_TOKENIZER)
    atomic_write_json(out / "config.json", {"format": FORMAT, "version": FORMAT_VERSION, **metadata})


def save_checkpoint(
    out: Path,
    model: nn.Module,
    config: Config,
    tokenizer: TextTokenizer,
    info: dict[str, Any],
    whole: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a language model, its config and tokenizer: the checkpoint that other commands use.

    A model with LoRA adapters is written merged (a plain model every command reads);
    the adapters alone go to adapter.safetensors beside it, and for a Llama-family model also
    to PEFT's adapter_config.json + adapter_model.safetensors. `whole`: the model's tensors
    gathered from a sharded (fsdp) model, written instead of the model's own.
    """
    from lmforge.adapters.lora import adapter_state_dict, base_fingerprint, has_lora, merged_state_dict

    tensors = unique_state_dict(model) if whole is None else without_tied(model, whole)
    if has_lora(model):
        tensors = {k: v.cpu() for k, v in merged_state_dict(model, tensors).items()}
        adapters = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
        ft = config.finetune
        adapter_info = {
            "base": ft.init_from,
            "rank": str(ft.lora_rank),
            "alpha": str(ft.lora_alpha),
            "targets": ft.lora_targets,
            "format": "pt",
            "base_fingerprint": base_fingerprint(model),
        }
        save_tensors(out / "adapter.safetensors", adapters, adapter_info)
        from lmforge.adapters.peft import exchangeable, save_peft_adapter

        # The same adapters for peft.PeftModel on the transformers model, where they have names there.
        if exchangeable(model, config.model):
            save_peft_adapter(
                model, config.model, out, ft.init_from, ft.lora_rank, ft.lora_alpha, ft.lora_dropout
            )
    write_checkpoint(out, tensors, tokenizer, {"config": config.to_dict(), **info})
