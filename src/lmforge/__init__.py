"""lmforge: prepare text, train, evaluate, generate with, fine-tune and serve language models.

    import lmforge
    result = lmforge.train(lmforge.load_preset("shakespeare-char"))
    model, tokenizer, config = lmforge.load("out/shakespeare-char")
    generator = lmforge.pipeline("text-generation", model="out/shakespeare-char")
    print(lmforge.evaluate("out/shakespeare-char"))

The names below are imported on first use (PEP 562), so `import lmforge` (and the
`lmforge` command's `--help`) does not load PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "Config": "lmforge.config",
    "load_preset": "lmforge.config",
    "preset_names": "lmforge.config",
    "UserError": "lmforge.errors",
    "GenerationConfig": "lmforge.generation_config",
    "Checkpoint": "lmforge.checkpoint",
    "open_checkpoint": "lmforge.checkpoint",
    "load_checkpoint": "lmforge.checkpoint",
    "TrainResult": "lmforge.training.trainer",
    "train": "lmforge.training.trainer",
}

if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from lmforge.checkpoint import Checkpoint, load_checkpoint, open_checkpoint
    from lmforge.config import Config, load_preset, preset_names
    from lmforge.errors import UserError
    from lmforge.generation_config import GenerationConfig
    from lmforge.training.trainer import TrainResult, train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


def load(path: str, device: str = "cpu"):
    """Open a checkpoint (lmforge or Hugging Face directory): returns (model, tokenizer, config)."""
    from lmforge.checkpoint import load_checkpoint

    return load_checkpoint(path, device)


def pipeline(task: str, model: str, **options):
    """`lmforge.pipeline("text-generation", model=DIR)(prompt, max_new_tokens=...)`."""
    from lmforge.pipelines import pipeline as make_pipeline

    return make_pipeline(task, model, **options)


def evaluate(checkpoint: str, data: str | None = None, **options) -> dict:
    """Loss, perplexity and bits per byte/char of a checkpoint (default: its validation split)."""
    from lmforge.evaluation.run import evaluate as run_evaluation

    return run_evaluation(checkpoint, data, **options)


def finetune(checkpoint: str, data: str, out: str, **overrides) -> TrainResult:
    """Fine-tune `checkpoint` on `data` (text, or prompt/response JSONL) with the `finetune` preset;
    `overrides` are config keys with dots as double underscores: `finetune__lora_rank=8`."""
    from lmforge.config import apply_overrides, load_preset
    from lmforge.training.trainer import train

    settings = {"data.path": data, "train.out": out, "finetune.init_from": checkpoint}
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return train(apply_overrides(load_preset("finetune"), settings))


__all__ = [
    "Checkpoint",
    "Config",
    "GenerationConfig",
    "TrainResult",
    "UserError",
    "evaluate",
    "finetune",
    "load",
    "load_checkpoint",
    "load_preset",
    "open_checkpoint",
    "pipeline",
    "preset_names",
    "train",
    "__version__",
]
