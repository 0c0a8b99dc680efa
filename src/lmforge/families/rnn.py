"""The recurrent family (`model.arch` lstm, gru or rnn; lmforge/models/rnn.py): trained by truncated
back-propagation through time on contiguous streams whose hidden state carries from one window to
the next; scored over the whole stream (no context limit). No Hugging Face layout fits it."""

from __future__ import annotations

from lmforge.families.base import COMMON_MODEL_FIELDS, LANGUAGE_MODEL_COMMANDS, TEXT_DATA_FIELDS, Family, lazy


def _parameters(m) -> int:  # embeddings, gates (4 of an LSTM's size, counted for every cell), head
    width = m.hidden_size or m.n_embd
    embeddings = m.vocab_size * m.n_embd * (1 if m.tie_embeddings else 2)
    return embeddings + m.n_layer * 4 * width * (m.n_embd + width) * 2


FAMILY = Family(
    name="rnn",
    summary="a recurrent (LSTM, GRU or RNN) language model",
    archs=("lstm", "gru", "rnn"),
    model_fields=COMMON_MODEL_FIELDS | {"hidden_size"},
    data_fields=TEXT_DATA_FIELDS - {"chat_template"},
    commands=LANGUAGE_MODEL_COMMANDS - {"export"},
    parameters=_parameters,
    prepare_data=lazy("lmforge.training.sources:text_data"),
    pipelines=frozenset({"text-generation"}),
    pipeline=lazy("lmforge.inference.generation:text_generation_pipeline"),
    batch_source=lazy("lmforge.training.sources:stream_source"),
    heads=False,
    carries_state=True,
)
