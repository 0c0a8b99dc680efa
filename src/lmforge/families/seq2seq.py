"""The encoder–decoder family (`model.arch = "seq2seq"`, lmforge/seq2seq/model.py): translation and
summarization, trained on source/target pairs (lmforge/seq2seq/data.py, lmforge/seq2seq/training.py),
decoded and scored by lmforge/seq2seq/decoding.py (BLEU/chrF or ROUGE); BART, Marian and mBART checkpoints
map onto it (lmforge/seq2seq/bart.py), and T5 / Flan-T5 ones (lmforge/seq2seq/t5.py)."""

from __future__ import annotations

from lmforge.families.base import (
    COMMON_MODEL_FIELDS,
    PAIR_DATA_FIELDS,
    TRAINED,
    TRANSFORMER_FIELDS,
    Family,
    lazy,
    transformer_parameters,
)


def _parameters(m) -> int:
    """The decoder's and the encoder's layers (counted with a cross-attention each, as before), and
    the copy mechanism's query, key and gate."""
    copy = (2 * m.n_embd * m.n_embd + m.n_embd + 1) if m.copy_attention else 0
    copy += m.source_vocab_size * m.n_embd  # (the sources' own embedding, where they have one)
    return (
        transformer_parameters(m, m.n_layer + (m.n_encoder_layer or m.n_layer), 2 * m.n_embd * m.n_embd)
        + copy
    )


FAMILY = Family(
    name="seq2seq",
    summary="an encoder–decoder (translation, summaries)",
    archs=("seq2seq",),
    model_fields=COMMON_MODEL_FIELDS
    | TRANSFORMER_FIELDS
    | {
        "pos_encoding",
        "rope_theta",
        "norm",
        "n_encoder_layer",
        "embedding_norm",
        "scale_embedding",
        "copy_attention",
        "source_block_size",
        "post_norm",
        "relative_buckets",
        "relative_max_distance",
        "attn_scale",
        "scale_decoder_output",
        "logits_bias",
        "decoder_start_id",
        "eos_id",
        "source_bos_id",
        "source_eos_id",
        "forced_bos_id",
        "source_vocab_size",
    },  # fmt: skip
    pretrained_fields=frozenset(
        {
            "post_norm",
            "logits_bias",
            "relative_buckets",
            "relative_max_distance",
            "attn_scale",
            "scale_decoder_output",
            "decoder_start_id",
            "eos_id",
            "source_bos_id",
            "source_eos_id",
            "forced_bos_id",
            "source_vocab_size",
        }
    ),  # fmt: skip
    data_fields=PAIR_DATA_FIELDS,
    data_kind="pairs",
    commands=TRAINED | {"translate", "summarize", "serve", "finetune"},
    parameters=_parameters,
    prepare_data=lazy("lmforge.seq2seq.training:pair_data"),
    batch_source=lazy("lmforge.seq2seq.training:pair_source"),
    train_fields=frozenset({"label_smoothing"}),
    language_model=False,
    transduces=True,
    after_training=lazy("lmforge.seq2seq.decoding:training_report"),
    evaluate=lazy("lmforge.seq2seq.decoding:evaluate_checkpoint"),
    hf_export=lazy("lmforge.interop.hf:encoder_decoder_export"),
    hf_auto_class="AutoModelForSeq2SeqLM",
    pipelines=frozenset({"translation", "summarization"}),
    pipeline=lazy("lmforge.seq2seq.decoding:seq2seq_pipeline"),
    private=False,
)
