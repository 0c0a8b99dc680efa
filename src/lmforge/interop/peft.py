"""Moved to lmforge.adapters.peft (beside LoRA, below the checkpoint code); this name keeps working
for now."""

import warnings

from lmforge.adapters.peft import *  # noqa: F403

warnings.warn("lmforge.interop.peft moved to lmforge.adapters.peft.", DeprecationWarning, stacklevel=2)
