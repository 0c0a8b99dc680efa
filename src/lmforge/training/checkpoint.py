"""The checkpoint format: a directory of safetensors and JSON, never pickle.

    DIR/config.json          {"format": "lmforge-checkpoint", "config": {...}, "step": .., "val_loss": ..}
    DIR/model.safetensors    the best weights so far (what `lmforge generate DIR` uses)
    DIR/tokenizer.json       the tokenizer
    DIR/train_state/         everything needed to resume exactly:
        model.safetensors    the latest weights
        state.safetensors    optimizer moments, RNG states (data sampler, dropout)
        state.json           step, best loss, early-stopping count, elapsed time, optimizer groups

Each file is written atomically. The training state is written into a fresh
folder that replaces the old one only once complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import Config, config_from_dict
from lmforge.errors import UserError
from lmforge.io import atomic_write, atomic_write_json
from lmforge.tokenizers import TextTokenizer, load_tokenizer

FORMAT = "lmforge-checkpoint"
FORMAT_VERSION = 1
STATE_DIR = "train_state"


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied copies removed (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    tensors = unique_state_dict(model)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {}))


def load_weights(path: Path, model: nn.Module) -> None:
    """Load safetensors weights into `model`, refusing missing or mismatched tensors clearly."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt.") from None
    load_state(tensors, model, str(path))


def load_state(tensors: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Copy `tensors` into `model` after checking that names and shapes match exactly."""
    expected = model.state_dict()
    tied = set(expected) - set(unique_state_dict(model))
    missing = [k for k in expected if k not in tensors and k not in tied]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{source} does not match the model in its config (missing: {missing[:3]}, "
            f"unexpected: {unexpected[:3]}); the checkpoint is corrupt or from another model."
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(expected[name].shape)}; the weights and the config do not belong together."
            )
    model.load_state_dict(tensors, strict=False)


def save_checkpoint(
    out: Path, model: nn.Module, config: Config, tokenizer: TextTokenizer, info: dict[str, Any]
) -> None:
    """Write the model, its config and tokenizer: the checkpoint that other commands use.

    A model with LoRA adapters is written merged (a plain model every command reads);
    the adapters alone go to adapter.safetensors beside it.
    """
    from lmforge.training.lora import adapter_state_dict, has_lora, merged_state_dict

    out.mkdir(parents=True, exist_ok=True)
    tensors = unique_state_dict(model)
    if has_lora(model):
        tensors = {k: v.cpu() for k, v in merged_state_dict(model, tensors).items()}
        adapters = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
        ft = config.finetune
        adapter_info = {"base": ft.init_from, "rank": str(ft.lora_rank), "alpha": str(ft.lora_alpha),
                        "targets": ft.lora_targets, "format": "pt"}
        atomic_write(out / "adapter.safetensors", lambda tmp: save_file(adapters, tmp, metadata=adapter_info))
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    tokenizer.save(out / "tokenizer.json")
    atomic_write_json(
        out / "config.json",
        {"format": FORMAT, "version": FORMAT_VERSION, "config": config.to_dict(), **info},
    )


def read_checkpoint_config(path: Path) -> tuple[Config, dict[str, Any]]:
    """The Config saved in a checkpoint directory, with the other fields of config.json."""
    if not path.exists():
        raise UserError(f"Checkpoint {path} does not exist.")
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise UserError(f"{path} is not an lmforge checkpoint (no config.json); give a run directory.")
    try:
        data = json.loads(config_file.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file} is not valid JSON ({e}); the checkpoint is corrupt.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an lmforge checkpoint ({config_file} was written by another tool).")
    if data.get("task") == "classification":
        raise UserError(f"{path} is a text classifier; use `lmforge classify {path}` or `lmforge eval {path} --data FILE`.")
    if data.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer lmforge; upgrade lmforge to read it.")
    return config_from_dict(data["config"], source=str(config_file)), data


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, TextTokenizer, Config]:
    """Open a checkpoint directory: the model (in eval mode), its tokenizer and its config."""
    from lmforge.interop.hf import import_hf, is_hf_dir
    from lmforge.models import build_model

    path = Path(path)
    if is_hf_dir(path):  # a Hugging Face model directory is converted on the fly
        return import_hf(path, device)
    config, _ = read_checkpoint_config(path)
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise UserError(f"Checkpoint {path} is incomplete: {name} is missing.")
    model = build_model(config.model)
    load_weights(path / "model.safetensors", model)
    tokenizer = load_tokenizer(path / "tokenizer.json")
    return model.to(device).eval(), tokenizer, config


# ---- training state -------------------------------------------------------------------


def _flatten_optimizers(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list]:
    tensors: dict[str, torch.Tensor] = {}
    described = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in sd["state"].items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"opt{i}.{index}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        described.append({"param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, described


def _unflatten_optimizer(i: int, tensors: dict[str, torch.Tensor], described: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"opt{i}."
    for name, tensor in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
    for index, values in described["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": described["param_groups"]}


def save_train_state(
    out: Path,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    rng: dict[str, torch.Tensor],
    progress: dict[str, Any],
) -> None:
    """Write the resumable state into a fresh folder, then swap it in for the old one."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{STATE_DIR}-", dir=out))
    try:
        save_weights(tmp / "model.safetensors", model)
        tensors, described = _flatten_optimizers(optimizers)
        tensors.update({f"rng.{k}": v.contiguous().cpu() for k, v in rng.items()})
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", {**progress, "optimizers": described})
        final, old = out / STATE_DIR, out / f"{STATE_DIR}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_train_state(
    out: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore weights and optimizers from `out/train_state`; returns (rng states, progress)."""
    folder = out / STATE_DIR
    if not folder.is_dir() and (out / f"{STATE_DIR}.old").is_dir():
        folder = out / f"{STATE_DIR}.old"  # a crash between the two renames of a save
    needed = ("model.safetensors", "state.safetensors", "state.json")
    if not all((folder / n).is_file() for n in needed):
        raise UserError(
            f"{out} has no complete training state to resume from; start again with --overwrite."
        )
    load_weights(folder / "model.safetensors", model)
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        progress = json.loads((folder / "state.json").read_text("utf-8"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"The training state in {folder} is corrupt ({e}); start again with --overwrite.") from None
    described = progress.pop("optimizers")
    if len(described) != len(optimizers):
        raise UserError(f"The training state in {folder} was made with another optimizer setting.")
    for i, opt in enumerate(optimizers):
        opt.load_state_dict(_unflatten_optimizer(i, tensors, described[i]))
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return rng, progress
