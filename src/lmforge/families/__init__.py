"""Model families: one object per family that the rest of lmforge asks, never the architecture's name.

    family_of("lstm")  ->  the recurrent family: its model fields, data kind, commands, and the
                           functions the stages call (data preparation, batch source, after-training
                           report, evaluation of a checkpoint, Hugging Face export)

The families are the GPT decoder (`gpt`), the recurrent models (`rnn`: arch lstm, gru, rnn), the
encoder–decoder (`seq2seq`) and the BERT-style masked-LM encoder (`encoder`). Each one is declared in
its own module here; its model is `lmforge/models/<family>.py`. The trainer, CLI,
evaluation, serving and export ask `family_of(arch)`; tests/test_structure.py fails on a family check
anywhere else.

This package imports no torch: the config layer asks it which fields apply, before any model exists.
"""

from __future__ import annotations

from lmforge.errors import UserError
from lmforge.families.base import Family, describe_archs
from lmforge.families.encoder import FAMILY as ENCODER
from lmforge.families.gpt import FAMILY as GPT
from lmforge.families.rnn import FAMILY as RNN
from lmforge.families.seq2seq import FAMILY as SEQ2SEQ

FAMILIES: tuple[Family, ...] = (GPT, RNN, SEQ2SEQ, ENCODER)


def family_of(arch: str) -> Family:
    """The family that builds `model.arch = arch`, or one sentence listing the ones there are."""
    for family in FAMILIES:
        if arch in family.archs:
            return family
    raise UserError(
        f"Unknown model.arch {arch!r}; available: {describe_archs(FAMILIES)}.", settings=("model.arch",)
    )


def family_of_field(name: str) -> tuple[Family, ...]:
    """The families whose model section has the field `name`."""
    return tuple(f for f in FAMILIES if name in f.model_fields)


__all__ = ["ENCODER", "FAMILIES", "GPT", "RNN", "SEQ2SEQ", "Family", "family_of", "family_of_field"]
