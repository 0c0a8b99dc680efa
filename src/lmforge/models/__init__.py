"""Model architectures. Importing this package registers every architecture."""

from lmforge.models import gpt, rnn, seq2seq  # noqa: F401  (registers "gpt", "lstm", "gru", "rnn", "seq2seq")
from lmforge.models.registry import MODELS, build_model, register

__all__ = ["MODELS", "build_model", "register"]
