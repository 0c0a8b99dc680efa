"""Model architectures. Importing this package registers every architecture."""

from lmforge.models import gpt, rnn  # noqa: F401  (registers "gpt", "lstm", "gru", "rnn")
from lmforge.models.registry import MODELS, build_model, register

__all__ = ["MODELS", "build_model", "register"]
