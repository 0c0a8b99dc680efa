"""Moved to lmforge.classification (training.py, and inference.py for checkpoints and predict); this
name keeps working for now."""

import warnings

from lmforge.classification.inference import *  # noqa: F403
from lmforge.classification.training import *  # noqa: F403

warnings.warn("lmforge.training.classify moved to lmforge.classification.", DeprecationWarning, stacklevel=2)
