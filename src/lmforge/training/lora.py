"""Moved to lmforge.adapters.lora (LoRA sits below the checkpoint code that writes it); this name
keeps working for now."""

import warnings

from lmforge.adapters.lora import *  # noqa: F403

warnings.warn("lmforge.training.lora moved to lmforge.adapters.lora.", DeprecationWarning, stacklevel=2)
