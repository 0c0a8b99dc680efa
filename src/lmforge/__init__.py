"""lmforge: prepare text, train, evaluate, generate with, fine-tune and serve language models."""

from __future__ import annotations

__version__ = "0.1.0"

from lmforge.checkpoint import load_checkpoint  # noqa: E402
from lmforge.config import Config, load_preset, preset_names  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.training.trainer import TrainResult, train  # noqa: E402


def load(path: str, device: str = "cpu"):
    """Open a checkpoint directory (lmforge or Hugging Face): returns (model, tokenizer, config)."""
    return load_checkpoint(path, device)


def pipeline(task: str, model: str, **options):
    """`lmforge.pipeline("text-generation", model=DIR)(prompt, max_new_tokens=...)`."""
    from lmforge.generation import pipeline as make_pipeline

    return make_pipeline(task, model, **options)


def evaluate(checkpoint: str, data: str | None = None, **options) -> dict:
    """Loss, perplexity and bits per byte/char of a checkpoint (default: its validation split)."""
    from lmforge.evaluation.run import evaluate as run_evaluation

    return run_evaluation(checkpoint, data, **options)


def finetune(checkpoint: str, data: str, out: str, **overrides) -> TrainResult:
    """Fine-tune `checkpoint` on `data` (text, or prompt/response JSONL) with the `finetune` preset;
    `overrides` are config keys with dots as double underscores: `finetune__lora_rank=8`."""
    from lmforge.config import apply_overrides

    settings = {"data.path": data, "train.out": out, "finetune.init_from": checkpoint}
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    return train(apply_overrides(load_preset("finetune"), settings))


__all__ = ["Config", "TrainResult", "UserError", "evaluate", "finetune", "load", "load_checkpoint",
           "load_preset", "pipeline", "preset_names", "train", "__version__"]
