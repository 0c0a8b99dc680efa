"""The GPT decoder family (`model.arch = "gpt"`, lmforge/models/gpt.py): a causal Transformer
trained on random windows of a token stream, of plain text or of instruction data (loss on the
replies only). Hugging Face's Llama, Qwen2, GPT-2 and Persimmon layouts map onto it
(lmforge/interop/hf.py), and so do GGUF files (lmforge/interop/gguf.py)."""

from __future__ import annotations

from lmforge.families.base import (
    COMMON_MODEL_FIELDS,
    LANGUAGE_MODEL_COMMANDS,
    TEXT_DATA_FIELDS,
    TRANSFORMER_FIELDS,
    Family,
    lazy,
    transformer_parameters,
)

FAMILY = Family(
    name="gpt",
    summary="a GPT decoder",
    archs=("gpt",),
    model_fields=COMMON_MODEL_FIELDS
    | TRANSFORMER_FIELDS
    | {
        "n_kv_head",
        "qkv_bias",
        "pos_encoding",
        "rope_theta",
        "norm",
        "qk_norm",
        "logit_softcap",
        "zero_init_proj",
        "attn_fp32",
    },  # fmt: skip
    data_fields=TEXT_DATA_FIELDS,
    commands=LANGUAGE_MODEL_COMMANDS | {"train-classifier"},
    parameters=lambda m: transformer_parameters(m, m.n_layer),
    prepare_data=lazy("lmforge.training.sources:text_data"),
    pipelines=frozenset({"text-generation"}),
    pipeline=lazy("lmforge.inference.generation:text_generation_pipeline"),
    batch_source=lazy("lmforge.training.sources:window_source"),
    hf_export=lazy("lmforge.interop.hf:gpt_to_hf"),
)
