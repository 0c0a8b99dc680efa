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
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmforge.errors import UserError
from lmforge.io import atomic_write_json, new_temp_dir
from lmforge.weights import load_weights, read_tensors, save_weights

STATE_DIR = "train_state"


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
            index, key = name[len(prefix) :].split(".", 1)
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
    tmp = new_temp_dir(out, f".{STATE_DIR}-")
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
            f"{out} has no complete training state to resume from; start again with overwrite.",
            settings=("overwrite",),
        )
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
    for i, opt in enumerate(optimizers):
        opt.load_state_dict(_unflatten_optimizer(i, tensors, described[i]))
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
