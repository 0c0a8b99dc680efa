"""The BERT-style encoder family (`model.arch = "encoder"`, lmforge/models/encoder.py): trained as a
masked language model on windows of a text (a [MASK] token joins the vocabulary); the body that text
classifiers pool; Hugging Face BERT checkpoints import with equal logits (lmforge/interop/bert.py)."""

from __future__ import annotations

from lmforge.families.base import (
    COMMON_MODEL_FIELDS,
    TEXT_DATA_FIELDS,
    TRAINED,
    TRANSFORMER_FIELDS,
    Family,
    lazy,
    transformer_parameters,
)

FAMILY = Family(
    name="encoder",
    summary="a masked-language-model encoder",
    archs=("encoder",),
    model_fields=COMMON_MODEL_FIELDS | TRANSFORMER_FIELDS,
    data_fields=TEXT_DATA_FIELDS - {"chat_template"},
    commands=(TRAINED - {"export"}) | {"train-classifier", "finetune", "serve"},  # serve: /v1/embeddings
    parameters=lambda m: transformer_parameters(m, m.n_layer),
    prepare_data=lazy("lmforge.training.sources:masked_text_data"),
    batch_source=lazy("lmforge.training.sources:masked_source"),
    language_model=False,
    embeds=True,
)
