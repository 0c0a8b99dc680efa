"""How to generate: `GenerationConfig`, the one definition of every sampling and decoding setting.

Each field carries its help text and its valid range. From these the library validates
a config, the CLI makes the flags of `generate` and `chat` (`top_p` → `--top-p`), and
the server makes the sampling fields of its requests. This module imports no torch, so
the CLI can build its flags quickly.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, fields, replace
from typing import Any

from lmforge.settings import check_fields, option


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: the one definition of every sampling and decoding setting."""

    max_new_tokens: int = option(
        128, "tokens to generate (translate and summarize: 0 = up to the model's length)", ge=0, api=False
    )
    temperature: float = option(1.0, "0 = greedy; higher = more random", ge=0.0, le=5.0)
    top_k: int = option(0, "keep the k most likely tokens (0 = all)", ge=0)
    top_p: float = option(1.0, "keep the smallest set of tokens whose probability reaches p", gt=0.0, le=1.0)
    min_p: float = option(0.0, "drop tokens less likely than min_p times the most likely one", ge=0.0, lt=1.0)
    repetition_penalty: float = option(
        1.0, "> 1 discourages tokens already in the text (prompt included)", ge=0.01, le=100.0
    )
    presence_penalty: float = option(
        0.0, "subtracted once from the logit of each token already generated", ge=-10.0, le=10.0
    )
    frequency_penalty: float = option(
        0.0, "subtracted per occurrence of each token already generated", ge=-10.0, le=10.0
    )
    stop: tuple[str, ...] = option((), "cut the text before the first of these strings", api=False)
    stop_at_eot: bool = option(True, "end a sequence at the end-of-text token", api=False)
    num_beams: int = option(
        1, "beam search with this many beams when > 1 (deterministic)", ge=1, le=64, api=False
    )
    length_penalty: float = option(
        1.0, "beam score = log-probability / length ** length_penalty", ge=-10.0, le=10.0, api=False
    )
    early_stopping: bool = option(True, "beam search ends once num_beams hypotheses are finished", api=False)
    no_repeat_ngram_size: int = option(
        0, "no n-gram of this many tokens twice in the generated text (0 = off)", ge=0, le=1024, api=False
    )
    prompt_lookup_num_tokens: int = option(
        0, "speculative decoding: draft up to this many tokens from the text so far (0 = off)", ge=0, le=64
    )
    num_assistant_tokens: int = option(
        5, "speculative decoding with a draft model: tokens it drafts at first", ge=1, le=64, api=False
    )
    seed: int | None = option(None, "seed of the sampler (same seed, same text)", ge=0, le=2**63 - 1)
    strict: bool = option(False, "refuse prompts longer than the context instead of cropping them", api=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string given alone
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        """Every setting within its range (the bounds in the field definitions)."""
        check_fields(self, label="Generation setting ")

    @functools.cached_property  # (in the instance's __dict__: not a field, so not in ==, hash or replace)
    def _sampling_key(self) -> GenerationConfig:
        return replace(self, max_new_tokens=0, stop=(), strict=False, prompt_lookup_num_tokens=0)

    def sampling_key(self) -> GenerationConfig:
        """The settings that must agree for sequences to be decoded in one batch (asked for every row
        at every step of the server: made once per config)."""
        return self._sampling_key


def generation_settings() -> list[tuple[str, type, Any, str, dict[str, float], bool]]:
    """(name, type, default, help, bounds, in the API) of every generation setting, in order."""
    hints = typing.get_type_hints(GenerationConfig)
    return [
        (f.name, hints[f.name], f.default, f.metadata["help"], f.metadata["bounds"], f.metadata["api"])
        for f in fields(GenerationConfig)
    ]
