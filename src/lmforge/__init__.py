"""lmforge: prepare text, train, evaluate, generate with, fine-tune and serve language models."""

from __future__ import annotations

__version__ = "0.1.0"

from lmforge.config import Config, load_preset, preset_names  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.training.checkpoint import load_checkpoint  # noqa: E402
from lmforge.training.trainer import TrainResult, train  # noqa: E402


def load(path: str, device: str = "cpu"):
    """Open a checkpoint directory: returns (model, tokenizer, config)."""
    return load_checkpoint(path, device)


__all__ = ["Config", "TrainResult", "UserError", "load", "load_checkpoint", "load_preset",
           "preset_names", "train", "__version__"]
