"""Running a trained model: everything between an opened checkpoint and the tokens it produces.

    loading.py       load_for_inference: device, precision (float32, bfloat16, int8, int4 weights),
                     adapters, the compiled step; the quantized linear layers
    kernels.py       which product is fastest for each weight shape on this CPU (timed once, cached
                     by timing_cache.py)
    native/          lmforge's own C kernels: int8 / 4-bit / float products and a whole decode step
    compiled.py      a torch.compile'd one-token step
    generation.py    generate, stream, beam search, batched decoding (the one decoding loop)
    sampling.py      logits processing: penalties, filters, the sampler
    speculative.py   prompt-lookup and draft-model drafts, checked in one multi-token step
    structured.py    output held to a JSON schema or a regular expression

The common names are importable from here, on first use (`import lmforge.inference` loads no torch):

    from lmforge.inference import load_for_inference, generate, stream
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "load_for_inference": "lmforge.inference.loading",
    "generate": "lmforge.inference.generation",
    "stream": "lmforge.inference.generation",
    "GenerationConfig": "lmforge.generation_config",
}

if TYPE_CHECKING:
    from lmforge.generation_config import GenerationConfig
    from lmforge.inference.generation import generate, stream
    from lmforge.inference.loading import load_for_inference

__all__ = ["GenerationConfig", "generate", "load_for_inference", "stream"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lmforge.inference' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
