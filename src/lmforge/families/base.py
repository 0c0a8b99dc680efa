"""The family interface: what a model family tells the rest of lmforge.

A `Family` holds facts (the model and data fields that apply, the commands it serves) and
functions (how its data is prepared, how batches are drawn, what a run reports at its end, how a
checkpoint is evaluated, how it is written in Hugging Face's layout). The functions take the
trainer's run (`run.config`, `run.data`, `run.model`, `run.window`, `run.device`, `run.dist`,
`run.log`) or plain values. They live with the code of their stage and are named here as
"module:function" (`lazy`), imported when first called: so the families sit below every stage that
asks them (no import climbs up) and, like the config layer that asks which fields apply, load no
torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import UserError

ModelConfig = Any  # lmforge.config.ModelConfig (the config layer imports this package, not the reverse)

# The model section's fields every family has, and those every Transformer has.
COMMON_MODEL_FIELDS = frozenset({"arch", "vocab_size", "block_size", "n_layer", "n_embd", "dropout",
                                 "tie_embeddings"})  # fmt: skip
TRANSFORMER_FIELDS = frozenset({"n_head", "mlp_ratio", "mlp_hidden", "activation", "bias", "norm_eps"})

# The data section's fields: those of every data kind, then each kind's own.
COMMON_DATA_FIELDS = frozenset(
    {"path", "tokenizer", "vocab_size", "min_frequency", "val_fraction", "val_path"}
)
TEXT_DATA_FIELDS = COMMON_DATA_FIELDS | {
    "text_field",
    "encoding",
    "errors",
    "clean",
    "dedup",
    "chat_template",
}
PAIR_DATA_FIELDS = COMMON_DATA_FIELDS | {"task", "source_field", "target_field", "target_path",
                                         "val_target_path", "max_source_tokens", "max_target_tokens"}  # fmt: skip

# The commands of every language model (a text in, text out), and of every trained model.
TRAINED = frozenset({"train", "eval", "export", "tune"})
LANGUAGE_MODEL_COMMANDS = TRAINED | {"generate", "chat", "serve", "explain", "finetune"}


@dataclass(frozen=True)
class Family:
    name: str  # "gpt", "rnn", "seq2seq", "encoder"
    summary: str  # for messages, with its article: "an encoder–decoder (translation, summaries)"
    archs: tuple[str, ...]  # the model.arch values it builds
    model_fields: frozenset[str]  # the model section's fields that apply
    data_fields: frozenset[str]  # the data section's fields that apply
    commands: frozenset[str]  # the CLI commands it serves
    parameters: Callable[[ModelConfig], int]  # about how many parameters a model section describes
    prepare_data: Callable[[Any], Any]  # (run) -> the prepared data (token splits or pairs)
    batch_source: Callable[[Any], Any]  # (run) -> the trainer's BatchSource
    data_kind: str = "text"  # "text" (a token stream) or "pairs" (source/target)
    language_model: bool = True  # next-token perplexity and samples apply
    transduces: bool = False  # its prompts are sources to translate or summarize (serving, pipelines)
    embeds: bool = False  # `serve` answers embeddings of texts (an encoder), not generated text
    heads: bool = True  # attention heads split the width (n_embd % n_head == 0)
    carries_state: bool = False  # a recurrent state: scored over the whole stream, not in windows
    train_fields: frozenset[str] = field(default_factory=frozenset)  # train fields of this family alone
    # model fields that describe pretrained layouts (T5's, BART's): printed and saved only when set
    pretrained_fields: frozenset[str] = field(default_factory=frozenset)
    after_training: Callable[[Any, Any], str] | None = None  # (run, metrics) -> the sample shown
    evaluate: Callable[..., dict[str, Any]] | None = None  # (checkpoint, data, beams, ...) -> scores
    hf_export: Callable[[ModelConfig, dict, int | None], tuple[dict, dict]] | None = None
    hf_auto_class: str = "AutoModelForCausalLM"  # what loads its Hugging Face export in transformers
    pipelines: frozenset[str] = frozenset()  # the `lmforge.pipeline` tasks it serves
    pipeline: Callable[..., Any] | None = None  # (task, model, tokenizer, chat_template) -> the pipeline
    private: bool = True  # trains under differential privacy

    def supports(self, command: str) -> bool:
        return command in self.commands

    def require(self, command: str, what: str = "this model", instead: str = "") -> None:
        """Refuse `command` in one sentence when the family does not serve it, naming what does."""
        if self.supports(command):
            return
        others = sorted(self.commands - TRAINED - {"serve", "explain", "finetune"}) or ["eval"]
        suggestion = instead or " or ".join(f"`lmforge {c}`" for c in others)
        raise UserError(f"`lmforge {command}` does not work on {what}, {self.summary}; use {suggestion}.")


def lazy(target: str) -> Callable[..., Any]:
    """The function named "package.module:function", imported when first called."""
    module, name = target.split(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = target
    return call


def describe_archs(families: tuple[Family, ...]) -> str:
    return ", ".join(arch for family in families for arch in family.archs)


def transformer_parameters(m: ModelConfig, layers: int, per_layer_extra: int = 0) -> int:
    """Embeddings, `layers` Transformer layers (attention + MLP, plus `per_layer_extra` each) and
    learned positions."""
    embeddings = m.vocab_size * m.n_embd * (1 if m.tie_embeddings else 2)
    hidden = m.mlp_hidden or int(m.mlp_ratio * m.n_embd)
    per_layer = (
        4 * m.n_embd * m.n_embd + (3 if m.activation in ("swiglu", "geglu") else 2) * m.n_embd * hidden
    )
    positions = m.block_size * m.n_embd * 2 if m.pos_encoding == "learned" else 0
    return embeddings + layers * (per_layer + per_layer_extra) + positions
