"""The resumable training state: resuming continues a run exactly from it.

    OUT/train_state/
        model.safetensors    the latest weights
        state.safetensors    optimizer moments, RNG states, the batch source's position
        state.json           step, best score, early-stopping count, elapsed time, optimizer groups

The state is written into a fresh folder that replaces the old one only once complete,
so a crash at any moment leaves either the old state or the new one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmforge.errors import UserError
from lmforge.io import atomic_write_json, new_temp_dir
from lmforge.weights import load_weights, read_tensors, save_tensors, save_weights, with_tied, without_tied

STATE_DIR = "train_state"


def _flatten_optimizers(states: list[dict]) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer state dicts as named tensors and a JSON description. Parameters are named by
    index (an optimizer's own state dict) or by their dotted name (a sharded run's whole state)."""
    tensors: dict[str, torch.Tensor] = {}
    described = []
    for i, sd in enumerate(states):
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
    state: dict[int | str, dict[str, Any]] = {}
    prefix = f"opt{i}."
    for name, tensor in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix) :].rsplit(".", 1)
            state.setdefault(_parameter_key(index), {})[key] = tensor
    for index, values in described["scalars"].items():
        state.setdefault(_parameter_key(index), {}).update(values)
    return {"state": state, "param_groups": described["param_groups"]}


def _parameter_key(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def save_train_state(
    out: Path,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    rng: dict[str, torch.Tensor],
    progress: dict[str, Any],
    whole: tuple[dict[str, torch.Tensor], list[dict]] | None = None,
) -> None:
    """Write the resumable state into a fresh folder, then swap it in for the old one.
    `whole`: the model's tensors and the optimizers' states gathered from a sharded (fsdp) run."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(out, f".{STATE_DIR}-")
    try:
        if whole is None:
            save_weights(tmp / "model.safetensors", model)
            tensors, described = _flatten_optimizers([opt.state_dict() for opt in optimizers])
        else:
            save_tensors(tmp / "model.safetensors", without_tied(model, whole[0]))
            tensors, described = _flatten_optimizers(whole[1])
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
    out: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], load_whole: Callable | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore weights and optimizers from `out/train_state`; returns (rng states, progress).
    `load_whole(model, tensors, optimizers, states)` puts whole tensors into a sharded model."""
    folder = out / STATE_DIR
    if not folder.is_dir() and (out / f"{STATE_DIR}.old").is_dir():
        folder = out / f"{STATE_DIR}.old"  # a crash between the two renames of a save
    needed = ("model.safetensors", "state.safetensors", "state.json")
    if not all((folder / n).is_file() for n in needed):
        raise UserError(
            f"{out} has no complete training state to resume from; start again with overwrite.",
            settings=("overwrite",),
        )
    if load_whole is None:
        load_weights(folder / "model.safetensors", model)
    try:
        tensors = read_tensors(folder / "state.safetensors")
        progress = json.loads((folder / "state.json").read_text("utf-8"))
    except (UserError, OSError, ValueError) as e:
        raise UserError(
            f"The training state in {folder} is corrupt ({e}); start again with overwrite.",
            settings=("overwrite",),
        ) from None
    described = progress.pop("optimizers")
    if len(described) != len(optimizers):
        raise UserError(f"The training state in {folder} was made with another optimizer setting.")
    states = [_unflatten_optimizer(i, tensors, described[i]) for i in range(len(optimizers))]
    if load_whole is None:
        for opt, state in zip(optimizers, states, strict=True):
            opt.load_state_dict(state)
    else:
        load_whole(model, with_tied(model, read_tensors(folder / "model.safetensors")), optimizers, states)
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return rng, progress


def rng_state(source, device: torch.device) -> dict[str, torch.Tensor]:
    """The random generators and the batch source's position: what makes a resume exact."""
    rng = {"torch": torch.get_rng_state(), **{f"source.{k}": v for k, v in source.state_dict().items()}}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict[str, torch.Tensor], source, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    source.load_state_dict({k[len("source.") :]: v for k, v in rng.items() if k.startswith("source.")})
