"""Moved to lmforge.classification.model; this name keeps working for now."""

import warnings

from lmforge.classification.model import *  # noqa: F403

warnings.warn(
    "lmforge.models.classifier moved to lmforge.classification.model.", DeprecationWarning, stacklevel=2
)
