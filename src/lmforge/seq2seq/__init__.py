"""The encoder–decoder family (`model.arch = "seq2seq"`: translation and summarization), in one place:

    model.py      the model: encoder, decoder with cross-attention and its caches, copy attention;
                  the switches of pretrained layouts (post-norm, T5's relative positions, ...)
    data.py       source/target pairs: reading (TSV, JSONL, two aligned files), the joint tokenizer, the cache
    training.py   the token protocol of a pair, length-bucketed batches, the loss
    decoding.py   batched greedy and beam search, translate/summarize, the pipelines, BLEU/chrF/ROUGE
    bart.py       BART, Marian and mBART checkpoints: import and export of Hugging Face's layout
    t5.py         T5 and Flan-T5 checkpoints: import and export

lmforge/families/seq2seq.py declares the family to the rest of lmforge (its fields, commands and these
functions). Decoding's names are importable from here too, on first use (`from lmforge.seq2seq import
transduce`), so importing the model (as lmforge.models does) loads nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("lmforge.seq2seq.decoding"), name)
