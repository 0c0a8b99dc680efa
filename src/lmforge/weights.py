"""Model weights in safetensors files: the one place that writes and reads tensors of a model.

Both the checkpoint format (`lmforge.checkpoint`) and the readers of foreign formats
(`lmforge.interop`) sit on top of this module, so neither needs the other.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import UserError
from lmforge.io import atomic_write


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


def tied_sources(model: nn.Module) -> dict[str, str]:
    """{name: the name it repeats} for every parameter that is another one (tied weights), found
    by identity: also right for a sharded model, whose tensors have no single storage."""
    first: dict[int, str] = {}
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


def without_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (a whole state dict) without the names of tied copies, contiguous, on the CPU."""
    tied = tied_sources(model)
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items() if k not in tied}


def with_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every tied copy filled in from the tensor it repeats."""
    return {
        **tensors,
        **{k: tensors[source] for k, source in tied_sources(model).items() if source in tensors},
    }


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file atomically."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    save_tensors(path, unique_state_dict(model), metadata)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or a clear error when the file is damaged."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt."
        ) from None


def load_weights(path: Path, model: nn.Module) -> None:
    """Load safetensors weights into `model`, refusing missing or mismatched tensors clearly."""
    load_state(read_tensors(path), model, str(path))


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
