"""`lmforge.pipeline(task, model=...)`: Hugging Face-style entry points, one per task a model family
serves ("text-generation" for decoders and recurrent models, "translation" and "summarization" for
encoder–decoders), over any checkpoint (a run, a Hugging Face folder or hub id, a GGUF file)."""

from __future__ import annotations

from typing import Any

from lmforge.checkpoint import open_checkpoint
from lmforge.errors import UserError
from lmforge.families import family_of
from lmforge.inference.loading import load_for_inference

# Each task, and the kind of model it needs (the families say which tasks they serve).
PIPELINE_TASKS = {
    "text-generation": "a decoder-only language model",
    "translation": "an encoder–decoder model",
    "summarization": "an encoder–decoder model",
}


def pipeline(
    task: str, model: str, device: str = "cpu", dtype: str = "float32", quantize: str | None = None
) -> Any:
    """The pipeline of `task` on the checkpoint `model` (opened once), at the precision asked."""
    if task.startswith("translation_"):  # (Hugging Face's translation_en_to_fr)
        task = "translation"
    if task not in PIPELINE_TASKS:
        raise UserError(f"Unknown pipeline task {task!r}; available: {', '.join(PIPELINE_TASKS)}.")
    opened = open_checkpoint(model)
    family = family_of(opened.config.model.arch) if opened.config is not None else None
    if family is None or task not in family.pipelines:
        raise UserError(f"The {task} pipeline needs {PIPELINE_TASKS[task]}; {model} is not one.")
    loaded, tokenizer = load_for_inference(opened, device, dtype, quantize)
    return family.pipeline(task, loaded, tokenizer, opened.chat_template)
