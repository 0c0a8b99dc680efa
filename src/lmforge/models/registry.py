"""The model registry: architecture name -> class built from a ModelConfig.

The trainer, generator and checkpoint code only ever call `build_model`, so a
new architecture joins by registering itself here, without touching them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError

MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        MODELS[name] = cls
        return cls

    return add


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch not in MODELS:
        raise UserError(f"Unknown model.arch {cfg.arch!r}; available: {', '.join(sorted(MODELS))}.")
    if cfg.vocab_size < 1:
        raise UserError("model.vocab_size must be set (it is taken from the tokenizer when 0).")
    return MODELS[cfg.arch](cfg)
