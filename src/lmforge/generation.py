"""Moved to lmforge.inference.generation (decoding lives in lmforge.inference); this name keeps
working for now."""

import warnings

from lmforge.inference.generation import *  # noqa: F403

warnings.warn("lmforge.generation moved to lmforge.inference.generation.", DeprecationWarning, stacklevel=2)
