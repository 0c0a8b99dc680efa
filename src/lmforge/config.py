"""Run configuration: dataclasses, TOML presets and command-line overrides.

A language model's run is described by one `Config` with its sections (data, model, optim, train, and
finetune and privacy when used). Presets are TOML files in `lmforge/presets/` that set some fields;
command-line overrides (`--train.max_iters 200`) are applied on top. The resolved config (the settings
that apply to its model's family, `Config.to_dict`) is printed at the start of training and saved in
`config.json` in the run directory. A classifier's run (`ClassifierRunConfig`, at the end) has the
same optim, train and privacy sections, checked by the same rules, beside its labeled data, its
model and where its body starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import tomllib

from lmforge.errors import UserError
from lmforge.families import FAMILIES, family_of, family_of_field
from lmforge.settings import check_fields, option

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "relu2", "silu", "swiglu", "geglu")


@dataclass
class DataConfig:
    path: str = ""  # text file, folder, .jsonl, or prepared dir; "" = tiny Shakespeare
    tokenizer: str = "char"  # "char", "word", "bpe", or a path to a tokenizer.json
    vocab_size: int = option(4096, "target size of a trained BPE or word vocabulary", ge=2, le=4_194_304)
    min_frequency: int = option(1, "word tokenizer: rarer words become <unk>", ge=1)
    val_fraction: float = option(0.1, "last fraction of the token stream kept for validation", gt=0.0, lt=1.0)
    val_path: str = ""  # explicit validation text instead of a fraction
    text_field: str = "text"  # field of each JSONL record that holds the text
    encoding: str = "utf-8"
    errors: str = "strict"  # "strict" refuses undecodable bytes; "replace" substitutes U+FFFD
    clean: bool = False  # strip control characters and collapse runs of spaces
    dedup: bool = False  # drop documents that occur more than once
    chat_template: str = ""  # Jinja template that formats instruction/chat JSONL ("" = lmforge's default)
    # Encoder–decoder (model.arch = "seq2seq") data: source/target pairs
    task: str = "translation"  # translation | summarization: what `lmforge eval` scores (BLEU/chrF or ROUGE)
    source_field: str = (
        ""  # column (TSV/CSV header) or JSONL field of the source ("" = first of a headerless TSV)
    )
    target_field: str = ""  # ... of the target ("" = second column)
    target_path: str = ""  # targets in a second file, line-aligned with data.path (and val_target_path)
    val_target_path: str = ""
    max_source_tokens: int = option(
        0, "pairs with a longer source are left out of training (0 = model's)", ge=0
    )
    max_target_tokens: int = option(
        0, "pairs with a longer target are left out of training (0 = model's)", ge=0
    )


@dataclass
class LabeledDataConfig:
    """The data section of a classifier run (`lmforge train-classifier`): labeled texts in a TSV/CSV
    file with a header, or JSONL."""

    path: str = ""  # training examples
    val_path: str = ""  # validation examples ("" = hold out 10% of path, every label represented)
    text_column: str = ""  # "" = the first of sentence/text/review/...
    label_column: str = ""  # "" = the first of label/sentiment/class/...
    vocab_size: int = option(20000, "word vocabulary of a body trained from scratch", ge=2, le=4_194_304)
    class_weights: bool = False  # weight the loss by each label's inverse frequency


@dataclass
class ModelConfig:
    arch: str = "gpt"
    vocab_size: int = option(0, "0 = take the tokenizer's size", ge=0, le=4_194_304)
    block_size: int = option(256, "context length in tokens", ge=1, le=1_048_576)
    n_layer: int = option(6, "layers", ge=1, le=1024)
    n_head: int = option(6, "attention heads", ge=1, le=1024)
    n_kv_head: int = option(
        0, "key/value heads: 0 = n_head (grouped-query attention when smaller)", ge=0, le=1024
    )
    n_embd: int = option(384, "embedding width (and the Transformer's width)", ge=1, le=65_536)
    hidden_size: int = option(0, "recurrent models: hidden state size (0 = n_embd)", ge=0, le=65_536)
    n_encoder_layer: int = option(0, "encoder–decoder: encoder layers (0 = n_layer)", ge=0, le=1024)
    embedding_norm: bool = False  # encoder–decoder: a norm right after the embeddings (BART, mBART)
    scale_embedding: bool = False  # encoder–decoder: token embeddings times sqrt(n_embd) (mBART's option)
    copy_attention: bool = False  # encoder–decoder: may copy source tokens (pointer-generator; summaries)
    source_vocab_size: int = option(0, "encoder–decoder: the sources' own vocabulary (some Marian models; "
                                    "0 = one vocabulary for both sides)", ge=0, le=4_194_304)  # fmt: skip
    relative_buckets: int = option(
        32, "encoder–decoder, relative positions: buckets of distances", ge=2, le=1024
    )
    relative_max_distance: int = option(128, "encoder–decoder, relative positions: the farthest bucket starts "
                                        "here", ge=2, le=1_048_576)  # fmt: skip
    attn_scale: float = option(0.0, "attention scores times this (0 = 1/sqrt(head size); T5: 1)", ge=0.0)
    scale_decoder_output: bool = (
        False  # encoder–decoder: the decoder's output × 1/sqrt(n_embd) before the head (T5)
    )
    post_norm: bool = False  # encoder–decoder: the norm after each residual sum, no final norm (BART, Marian)
    logits_bias: bool = (
        False  # encoder–decoder: a bias on the output head (final_logits_bias of BART, Marian)
    )
    # The encoder–decoder's token protocol; -1 = lmforge's own (<|endoftext|> starts and ends an output,
    # sources go in as they are). Pretrained models bring theirs (Marian: sources end with </s>; the
    # decoder starts from <pad>).
    decoder_start_id: int = option(-1, "encoder–decoder: the token an output starts from (-1 = <|endoftext|>)",
                                   ge=-1)  # fmt: skip
    eos_id: int = option(-1, "encoder–decoder: the token that ends an output (-1 = <|endoftext|>)", ge=-1)
    source_bos_id: int = option(-1, "encoder–decoder: a token put before every source (-1 = none)", ge=-1)
    source_eos_id: int = option(-1, "encoder–decoder: a token put after every source (-1 = none)", ge=-1)
    forced_bos_id: int = option(-1, "encoder–decoder: the first token of every output (-1 = none)", ge=-1)
    source_block_size: int = option(0, "encoder–decoder: longest source in tokens (0 = block_size)", ge=0,
                                    le=1_048_576)  # fmt: skip
    mlp_ratio: float = option(4.0, "hidden width of the MLP relative to n_embd", gt=0.0, le=64.0)
    mlp_hidden: int = option(
        0, "exact hidden width of the MLP (overrides mlp_ratio when set)", ge=0, le=1_048_576
    )
    dropout: float = option(0.0, "dropout probability", ge=0.0, lt=1.0)
    bias: bool = True  # biases in linear layers and LayerNorm
    qkv_bias: bool = False  # biases on the query/key/value projection even when bias is false (Qwen2)
    # learned | sinusoidal | sinusoidal_halves (Marian's layout) | rope | relative (T5's, encoder–decoders)
    pos_encoding: str = "learned"
    rope_theta: float = option(10000.0, "rotary base frequency", gt=0.0)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = option(1e-5, "epsilon of the norms", gt=0.0, lt=1.0)
    # gelu | gelu_tanh | relu | relu2 | silu (Marian's "swish") | swiglu | geglu (T5 v1.1's gated GELU)
    activation: str = "gelu"
    tie_embeddings: bool = True
    qk_norm: bool = False  # normalise queries and keys before attention
    logit_softcap: float = option(0.0, "0 = off; else logits = cap * tanh(logits / cap)", ge=0.0)
    zero_init_proj: bool = False  # start residual projections at zero
    attn_fp32: bool = True  # under bf16/fp16 autocast, compute attention in float32


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    lr: float = option(1e-3, "peak learning rate", gt=0.0, le=10.0)
    min_lr: float = option(1e-4, "learning rate at the end of the decay", ge=0.0, le=10.0)
    weight_decay: float = option(0.1, "decoupled weight decay", ge=0.0, le=10.0)
    beta1: float = option(0.9, "AdamW's first-moment decay", ge=0.0, lt=1.0)
    beta2: float = option(0.99, "AdamW's second-moment decay", ge=0.0, lt=1.0)
    eps: float = option(1e-8, "AdamW's epsilon", gt=0.0, le=1.0)
    warmup_iters: int = option(100, "steps of linear warm-up", ge=0)
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, decay) | constant
    decay_iters: int = option(0, "length of the cosine (0 = max_iters)", ge=0)
    wsd_decay_frac: float = option(0.2, "final fraction of the run spent decaying (wsd)", ge=0.0, le=1.0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)", ge=0.0)
    fused: bool = True  # fused AdamW kernel where the device has one
    muon_lr: float = option(0.02, "Muon's learning rate", gt=0.0, le=10.0)
    muon_momentum: float = option(0.95, "Muon's momentum", ge=0.0, lt=1.0)
    muon_ns_steps: int = option(
        5, "Muon's Newton-Schulz iterations (fewer: cheaper, less orthogonal)", ge=1, le=10
    )


@dataclass
class TrainConfig:
    out: str = ""  # run directory; "" = out/<preset>
    max_iters: int = option(2000, "optimizer steps", ge=1)
    batch_size: int = option(12, "sequences per micro-batch", ge=1, le=1_048_576)
    grad_accum: int = option(1, "micro-batches per optimizer step", ge=1)
    eval_interval: int = option(250, "steps between evaluations (a classifier run: 0 = once per epoch)", ge=0)
    eval_batches: int = option(20, "validation batches per evaluation (fixed windows)", ge=1)
    eval_at_start: bool = False
    final_full_eval: bool = True  # at the end, also score the whole validation split (as `lmforge eval` does)
    log_interval: int = option(50, "steps between metrics records", ge=1)
    patience: int = option(0, "stop after this many evaluations without improvement (0 = off)", ge=0)
    target_loss: float = option(0.0, "stop once validation loss reaches this (0 = off)", ge=0.0)
    max_time_s: float = option(
        0.0,
        "stop (with a final evaluation) after this many seconds (0 = off); the learning-rate "
        "schedule then ends with the budget (single-process runs)",
        ge=0.0,
    )
    seed: int = option(1337, "seed of every random generator", ge=0, le=2**63 - 1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (mixed precision via autocast)
    compile: bool = False
    strategy: str = "ddp"  # under torchrun: ddp (every rank holds the model) | fsdp (parameters sharded)
    threads: int = option(0, "CPU threads (0 = number of physical cores)", ge=0, le=4096)
    init_embeddings: str = ""  # word2vec/GloVe vectors for the embedding of a word-level model
    label_smoothing: float = option(
        0.0, "encoder–decoder: label smoothing of the training loss", ge=0.0, lt=1.0
    )
    sample_tokens: int = option(300, "length of the sample printed at the end (0 = none)", ge=0)
    epochs: int = option(3, "classifier runs: passes over the training examples", ge=1)
    group_by_length: bool = True  # classifier runs: batches of similar-length texts (less padding)
    progress: bool = True
    loggers: str = (
        ""  # beside metrics.jsonl, comma-separated: csv (metrics.csv), tensorboard (OUT/tensorboard)
    )


@dataclass
class FinetuneConfig:
    init_from: str = ""  # checkpoint, Hugging Face folder or hub id, or .gguf file ("" = train from scratch)
    seq_len: int = option(256, "training window when fine-tuning (at most the model's block_size)", ge=1)
    lora_rank: int = option(0, "0 = full fine-tuning; else train rank-r adapters on the target layers", ge=0)
    lora_alpha: float = option(16.0, "adapter output is scaled by alpha / rank", gt=0.0)
    lora_dropout: float = option(0.0, "dropout on the adapters' input", ge=0.0, lt=1.0)
    lora_targets: str = (
        "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_gate,mlp.c_proj"  # or HF names, or "all-linear"
    )
    layer_lr_decay: float = option(
        1.0, "< 1: each layer below the top learns this much slower", gt=0.0, le=1.0
    )


@dataclass
class PrivacyConfig:
    """Differentially private training (DP-SGD through Opacus): off unless a target ε or a noise
    multiplier is given."""

    target_epsilon: float = option(
        0.0, "ε to reach at the end of training (0 = off, or noise_multiplier)", ge=0.0
    )
    noise_multiplier: float = option(
        0.0, "noise std / max_grad_norm (0 = solved from target_epsilon)", ge=0.0
    )
    max_grad_norm: float = option(1.0, "each example's gradient is clipped to this norm", gt=0.0)
    delta: float = option(
        0.0, "δ of the (ε, δ) guarantee (0 = min(1e-5, 1 / (10 × examples)))", ge=0.0, lt=1.0
    )


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def to_dict(self) -> dict[str, Any]:
        """The settings that apply to this run, as printed at its start and saved in its checkpoints
        (format 2): the model and data fields of its model's family (the switches of pretrained
        layouts only when set), the train fields but another family's own, and the finetune and
        privacy sections only when used. `config_from_dict`
        reads it back (what is left out is at its default)."""
        out = dataclasses.asdict(self)
        for section, name, _ in _foreign_fields(self):
            del out[section][name]
        defaults = ModelConfig()
        for name in family_of(self.model.arch).pretrained_fields:  # a pretrained layout's switches: when set
            if getattr(self.model, name) == getattr(defaults, name):
                out["model"].pop(name, None)
        if not self.finetune.init_from:
            del out["finetune"]
        if not (self.privacy.target_epsilon > 0 or self.privacy.noise_multiplier > 0):
            del out["privacy"]
        return out


SECTIONS = ("data", "model", "optim", "train", "finetune", "privacy")

# The train fields of classifier runs alone, and every train field that applies to them (the rest,
# such as max_iters or dtype, belong to language-model runs).
CLASSIFIER_ONLY_TRAIN_FIELDS = frozenset({"epochs", "group_by_length"})
CLASSIFIER_TRAIN_FIELDS = CLASSIFIER_ONLY_TRAIN_FIELDS | {
    "out", "batch_size", "eval_interval", "patience", "max_time_s", "seed", "device", "threads", "progress",
    "loggers", "init_embeddings"}  # fmt: skip


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def field_types() -> dict[str, type]:
    """Every overridable field as 'section.field' -> its Python type."""
    out: dict[str, type] = {}
    for section, cls in _section_types().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = hints[f.name]
    return out


def parse_value(key: str, raw: Any, kind: type) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or explain why not."""
    if isinstance(raw, str) and kind is not str:
        text = raw.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{key} must be true or false, not {raw!r}.")
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"{key} must be {kind.__name__}, not {raw!r}.") from None
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        raise UserError(f"{key} must be {kind.__name__}, not {raw!r}.")
    return raw


def set_setting(run: Any, key: str, raw: Any, types: dict[str, type], what: str) -> None:
    """Set 'section.field' `key` of a run's config (a language model's or a classifier's) to `raw`,
    parsed to the field's type (`types`: every settable key); an unknown key is refused in one sentence
    listing the valid keys of its section (or the sections)."""
    if key not in types:
        section = key.split(".")[0]
        valid = [k for k in types if k.startswith(section + ".")] or list(
            dict.fromkeys(k.split(".")[0] for k in types)
        )
        raise UserError(f"Unknown {what} {key!r}; valid keys: {', '.join(valid)}.")
    section, name = key.split(".", 1)
    setattr(getattr(run, section), name, parse_value(key, raw, types[key]))


def apply_overrides(config: Config, overrides: dict[str, Any], check_family: bool = True) -> Config:
    """Set 'section.field' keys on a copy of `config`; unknown keys list the valid ones, and (with
    `check_family`) a key of another model family than the resulting model.arch's is refused; the
    settings of other families left from the base config go back to their defaults."""
    config = dataclasses.replace(config, **{s: dataclasses.replace(getattr(config, s)) for s in SECTIONS})
    types = field_types()
    for key, raw in overrides.items():
        if key in ("name", "description"):
            setattr(config, key, str(raw))
            continue
        set_setting(config, key, raw, types, "config key")
    if check_family:
        check_family_fields(config, list(overrides))
    keep_what_applies(config)
    return config


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from nested dicts (TOML preset or saved config.json)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"{source}: [{key}] must be a table of settings.")
            for name, v in value.items():
                flat[f"{key}.{name}"] = v
        elif key in ("name", "description"):
            flat[key] = value
        else:
            raise UserError(f"{source}: unknown section {key!r}; valid sections: {', '.join(SECTIONS)}.")
    try:
        return apply_overrides(Config(), flat, check_family=False)  # (a saved v1 config holds every field)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def preset_names() -> list[str]:
    files = resources.files("lmforge.presets").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".toml"))


def load_preset(name: str) -> Config:
    """Load a named preset (or a path to a TOML file)."""
    if name.endswith(".toml"):
        from pathlib import Path

        path = Path(name)
        if not path.is_file():
            raise UserError(f"Preset file {name} does not exist.")
        text = path.read_text(encoding="utf-8")
    else:
        if name not in preset_names():
            raise UserError(f"Unknown preset {name!r}; available presets: {', '.join(preset_names())}.")
        text = resources.files("lmforge.presets").joinpath(f"{name}.toml").read_text("utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"Preset {name} is not valid TOML: {e}.") from None
    config = config_from_dict(data, source=f"preset {name}")
    if config.name == "custom":
        config.name = name.rsplit("/", 1)[-1].removesuffix(".toml")
    return config


def validate(config: Config) -> None:
    """Catch impossible or inconsistent settings before any work starts: every declared range
    (settings.py), then the rules that tie settings together, then the model's size."""
    check_fields(config)
    m, t, o = config.model, config.train, config.optim
    gpt = family_of(m.arch).heads  # the Transformers
    checks = [
        (not gpt or m.n_embd % m.n_head == 0,
         f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}).", "model.n_embd"),
        (not gpt or m.n_kv_head == 0 or m.n_head % m.n_kv_head == 0,
         "model.n_head must be a multiple of model.n_kv_head.", "model.n_kv_head"),
        (m.pos_encoding in ("learned", "sinusoidal", "sinusoidal_halves", "rope", "relative"),
         "model.pos_encoding must be learned, sinusoidal, sinusoidal_halves, rope or relative.", "model.pos_encoding"),
        (not gpt or m.pos_encoding != "rope" or (m.n_embd // m.n_head) % 2 == 0,
         "rope needs an even head size (model.n_embd / model.n_head).", "model.n_head"),
        (m.norm in ("layernorm", "rmsnorm"), "model.norm must be layernorm or rmsnorm.", "model.norm"),
        (m.activation in ACTIVATIONS, f"model.activation must be one of {', '.join(ACTIVATIONS)}.", "model.activation"),
        (m.pos_encoding != "relative" or "relative_buckets" in family_of(m.arch).model_fields,
         "model.pos_encoding relative (T5's buckets of distances) is for encoder–decoders (model.arch seq2seq).",
         "model.pos_encoding"),
        (t.eval_interval >= 1, "train.eval_interval must be at least 1.", "train.eval_interval"),
        (config.data.task in ("translation", "summarization"), "data.task must be translation or summarization.",
         "data.task"),
        (not (m.copy_attention and m.source_vocab_size), "model.copy_attention copies source tokens into the "
         "output, so it needs one vocabulary for both sides (model.source_vocab_size 0).", "model.copy_attention"),
    ]  # fmt: skip
    for ok, message, setting in checks:
        if not ok:
            raise UserError(message, settings=(setting,))
    check_training_sections(o, t)
    check_family_fields(config)  # (a config built in Python, not through overrides)
    check_size(m, bytes_per_parameter=16)  # weights, gradients and two optimizer moments in float32


def check_training_sections(o: OptimConfig, t: TrainConfig) -> None:
    """The rules of the optim and train sections that every run shares, language model or classifier
    (their ranges are checked with the rest of the fields)."""
    checks = [
        (t.dtype in ("auto", "float32", "bfloat16", "float16"),
         "train.dtype must be auto, float32, bfloat16 or float16.", "train.dtype"),
        (t.strategy in ("ddp", "fsdp"), "train.strategy must be ddp or fsdp.", "train.strategy"),
        (o.optimizer in ("adamw", "muon"), "optim.optimizer must be adamw or muon.", "optim.optimizer"),
        (o.schedule in ("cosine", "wsd", "constant"), "optim.schedule must be cosine, wsd or constant.",
         "optim.schedule"),
        (o.min_lr <= o.lr, f"optim.min_lr ({o.min_lr:g}) must not exceed optim.lr ({o.lr:g}).", "optim.min_lr"),
    ]  # fmt: skip
    for ok, message, setting in checks:
        if not ok:
            raise UserError(message, settings=(setting,))
    from lmforge.training.metrics import parse_loggers

    parse_loggers(t.loggers)


def estimated_parameters(m: ModelConfig) -> int:
    """About how many parameters the model section describes (the tokenizer's vocabulary,
    when vocab_size is 0, is not known yet and counted as 0)."""
    return family_of(m.arch).parameters(m)


def _foreign_fields(config: Config) -> list[tuple[str, str, str]]:
    """(section, field, where it belongs) of every model, data and train setting that does not apply
    to the run's model family (a GPT has no model.hidden_size; a text has no data.target_path)."""
    family = family_of(config.model.arch)
    only_others = {name for other in FAMILIES if other is not family for name in other.train_fields}
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name not in family.model_fields:
            owners = " or ".join(
                f"{o.summary} (model.arch {'/'.join(o.archs)})" for o in family_of_field(f.name)
            )
            out.append(("model", f.name, f"it is a setting of {owners}"))
    for f in dataclasses.fields(DataConfig):
        if f.name not in family.data_fields:
            kind = "source/target pairs" if family.data_kind == "text" else "text data"
            out.append(("data", f.name, f"it is a setting of {kind}"))
    for name in sorted(only_others - family.train_fields):
        out.append(("train", name, "it is a setting of " + " or ".join(o.summary for o in FAMILIES
                                                                       if name in o.train_fields)))  # fmt: skip
    for name in sorted(CLASSIFIER_ONLY_TRAIN_FIELDS):
        out.append(("train", name, "it is a setting of classifier runs (`lmforge train-classifier`)"))
    return out


def keep_what_applies(config: Config) -> None:
    """Put back at their defaults the settings that do not apply to the run's model family (a GPT
    preset's head count after `--model.arch lstm`, the every-field config of a version-1 checkpoint):
    they have no effect, and are neither shown nor saved."""
    for section, name, _ in _foreign_fields(config):
        setattr(getattr(config, section), name, getattr(type(getattr(config, section))(), name))


def check_family_fields(config: Config, keys: list[str] | None = None) -> None:
    """A setting of another model family, or of another kind of data, is refused in one sentence
    naming where it belongs: each of `keys` (overrides) that names one, or (None) each one whose
    value is not its default."""
    family = family_of(config.model.arch)
    for section, name, where in _foreign_fields(config):
        key, values = f"{section}.{name}", getattr(config, section)
        named = key in keys if keys is not None else getattr(values, name) != getattr(type(values)(), name)
        if named:
            raise UserError(f"{key} does not apply to {family.summary} (model.arch {config.model.arch}): {where}; "
                            f"leave it out.", settings=(key,))  # fmt: skip


def check_size(m: ModelConfig, bytes_per_parameter: int = 4) -> None:
    """Refuse a model this machine cannot hold (4 bytes a parameter to load it, 16 to train it)."""
    import os

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return
    needed = bytes_per_parameter * estimated_parameters(m)
    if needed > memory:
        raise UserError(
            f"The model section describes about {estimated_parameters(m) / 1e9:.1f} billion parameters, which "
            f"need about {needed / 2**30:.0f} GiB {'to train' if bytes_per_parameter > 4 else 'to load'}; "
            f"this machine has {memory / 2**30:.0f} GiB. "
            f"Lower model.vocab_size, model.n_embd or model.n_layer.",
            settings=("model.n_embd", "model.n_layer"),
        )


# Classifier runs (`lmforge train-classifier`): the same optim, train and privacy sections as above


@dataclass
class ClassifierConfig:
    """The model section of a classifier run (and the `classifier` settings its checkpoint saves)."""

    body: str = "bilstm"  # bilstm | gpt (from scratch) | lm (the body of a language-model checkpoint)
    vocab_size: int = option(0, "the tokenizer's size (set when the body is built)", ge=0)
    n_embd: int = option(128, "bilstm: embedding width; gpt: model width", ge=1)
    hidden_size: int = option(128, "bilstm: hidden size per direction", ge=1)
    n_layer: int = option(1, "bilstm or gpt (from scratch): layers", ge=1)
    n_head: int = option(4, "gpt (from scratch): attention heads", ge=1)
    dropout: float = option(0.3, "dropout of the body and before the head", ge=0.0, lt=1.0)
    pooling: str = "max"  # mean | max | last | first
    max_length: int = option(128, "longer texts keep their first max_length tokens", ge=1)
    pre_head: str = ""  # "" | tanh | relu: a dense layer and this activation before the head
    special_tokens: bool = False  # frame texts with the tokenizer's special tokens ([CLS] ... [SEP])


@dataclass
class ClassifierInitConfig:
    """Where a classifier's body starts from (word vectors for a from-scratch embedding are
    train.init_embeddings, as for a word-level language model)."""

    checkpoint: str = ""  # a language-model checkpoint whose tokenizer and body to reuse ("" = from scratch)
    layers: int = option(0, "keep only the first N blocks of the checkpoint's body (0 = all): faster", ge=0)
    freeze_embeddings: bool = False  # keep the pretrained embeddings (token, positions) fixed: faster steps


@dataclass
class ClassifierRunConfig:
    """A classifier run, in the sections every run has: its data (labeled texts), its model, where its
    body starts, and the same optim, train and privacy sections (and checks) as a language model's run,
    with a classifier's defaults. `to_dict` holds the settings that apply, as printed and saved."""

    data: LabeledDataConfig = field(default_factory=LabeledDataConfig)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    init: ClassifierInitConfig = field(default_factory=ClassifierInitConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=2e-4, weight_decay=0.01))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="out/classifier", batch_size=32,
                                                                   eval_interval=0))  # fmt: skip
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # DP-SGD (off by default)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["train"] = {k: v for k, v in out["train"].items() if k in CLASSIFIER_TRAIN_FIELDS}
        if self.init == ClassifierInitConfig():
            del out["init"]
        if not (self.privacy.target_epsilon > 0 or self.privacy.noise_multiplier > 0):
            del out["privacy"]
        return out


def classifier_field_types() -> dict[str, type]:
    """Every setting of a classifier run as 'section.field' -> its Python type (the train section's
    that apply to classifiers)."""
    sections = typing.get_type_hints(ClassifierRunConfig)
    return {
        f"{section}.{f.name}": typing.get_type_hints(kind)[f.name]
        for section, kind in sections.items()
        for f in dataclasses.fields(kind)
        if section != "train" or f.name in CLASSIFIER_TRAIN_FIELDS
    }


def classifier_run(settings: dict[str, Any] | None = None) -> ClassifierRunConfig:
    """A classifier run from 'section.field' settings (the command line's strings, or Python values) over
    a classifier's defaults, each parsed and named like a language model run's overrides; an unknown key
    lists the valid ones. optim.lr without optim.min_lr sets the latter to a tenth of it."""
    cfg = ClassifierRunConfig()
    types = classifier_field_types()
    settings = dict(settings or {})
    for key, raw in settings.items():
        set_setting(cfg, key, raw, types, "classifier setting")
    if "optim.lr" in settings and "optim.min_lr" not in settings:
        cfg.optim.min_lr = cfg.optim.lr / 10
    return cfg
