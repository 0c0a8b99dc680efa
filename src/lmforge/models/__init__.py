"""Model architectures. Importing this package registers every architecture."""

from lmforge.models import encoder, gpt, rnn, seq2seq  # noqa: F401  (registers every architecture)
from lmforge.models.registry import MODELS, build_model, register

__all__ = ["MODELS", "build_model", "register"]
