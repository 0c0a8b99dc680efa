"""Model architectures. Importing this package registers every architecture."""

import lmforge.seq2seq.model  # noqa: F401  (the encoder–decoder lives with the rest of its family)
from lmforge.models import encoder, gpt, rnn  # noqa: F401  (registers every architecture)
from lmforge.models.registry import MODELS, build_model, register

__all__ = ["MODELS", "build_model", "register"]
