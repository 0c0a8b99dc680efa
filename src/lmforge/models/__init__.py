"""Model architectures. Importing this package registers every architecture."""

from lmforge.models import gpt  # noqa: F401  (registers "gpt")
from lmforge.models.registry import MODELS, build_model, register

__all__ = ["MODELS", "build_model", "register"]
