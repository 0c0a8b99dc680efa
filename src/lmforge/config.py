"""Run configuration: dataclasses, TOML presets and command-line overrides.

A run is described by one `Config` with four sections (data, model, optim,
train). Presets are TOML files in `lmforge/presets/` that set some fields;
command-line overrides (`--train.max_iters 200`) are applied on top. The
resolved config is printed at the start of training and saved as
`config.json` in the run directory.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import tomllib

from lmforge.errors import UserError


@dataclass
class DataConfig:
    path: str = ""  # text file, folder, .jsonl, or prepared dir; "" = tiny Shakespeare
    tokenizer: str = "char"  # "char", "word", "bpe", or a path to a tokenizer.json
    vocab_size: int = 4096  # target size of a trained BPE or word vocabulary
    min_frequency: int = 1  # word tokenizer: rarer words become <unk>
    val_fraction: float = 0.1  # last fraction of the token stream kept for validation
    val_path: str = ""  # explicit validation text instead of a fraction
    text_field: str = "text"  # field of each JSONL record that holds the text
    encoding: str = "utf-8"
    errors: str = "strict"  # "strict" refuses undecodable bytes; "replace" substitutes U+FFFD
    clean: bool = False  # strip control characters and collapse runs of spaces
    dedup: bool = False  # drop documents that occur more than once
    chat_template: str = ""  # Jinja template that formats instruction/chat JSONL ("" = lmforge's default)


@dataclass
class ModelConfig:
    arch: str = "gpt"
    vocab_size: int = 0  # 0 = take the tokenizer's size
    block_size: int = 256  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0  # 0 = same as n_head (grouped-query attention when smaller)
    n_embd: int = 384  # embedding width (and the Transformer's width)
    hidden_size: int = 0  # recurrent models: hidden state size (0 = n_embd)
    mlp_ratio: float = 4.0  # hidden width of the MLP relative to n_embd
    mlp_hidden: int = 0  # exact hidden width of the MLP (overrides mlp_ratio when set)
    dropout: float = 0.0
    bias: bool = True  # biases in linear layers and LayerNorm
    qkv_bias: bool = False  # biases on the query/key/value projection even when bias is false (Qwen2)
    pos_encoding: str = "learned"  # learned | sinusoidal | rope
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    activation: str = "gelu"  # gelu | gelu_tanh | relu2 | swiglu
    tie_embeddings: bool = True
    qk_norm: bool = False  # normalise queries and keys before attention
    logit_softcap: float = 0.0  # 0 = off; else logits = cap * tanh(logits / cap)
    zero_init_proj: bool = False  # start residual projections at zero
    attn_fp32: bool = True  # under bf16/fp16 autocast, compute attention in float32


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    warmup_iters: int = 100
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, decay) | constant
    decay_iters: int = 0  # length of the cosine (0 = max_iters)
    wsd_decay_frac: float = 0.2  # final fraction of the run spent decaying (wsd)
    grad_clip: float = 1.0  # 0 = off
    fused: bool = True  # fused AdamW kernel where the device has one
    muon_lr: float = 0.02
    muon_momentum: float = 0.95


@dataclass
class TrainConfig:
    out: str = ""  # run directory; "" = out/<preset>
    max_iters: int = 2000
    batch_size: int = 12
    grad_accum: int = 1
    eval_interval: int = 250
    eval_batches: int = 20  # validation batches per evaluation (fixed windows)
    eval_at_start: bool = False
    final_full_eval: bool = True  # at the end, also score the whole validation split (as `lmforge eval` does)
    log_interval: int = 50
    patience: int = 0  # stop after this many evaluations without improvement; 0 = off
    target_loss: float = 0.0  # stop once validation loss reaches this; 0 = off
    max_time_s: float = 0.0  # stop (with a final evaluation) after this many seconds; 0 = off
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (mixed precision via autocast)
    compile: bool = False
    threads: int = 0  # CPU threads; 0 = number of physical cores
    sample_tokens: int = 300  # length of the sample printed at the end; 0 = none
    progress: bool = True


@dataclass
class FinetuneConfig:
    init_from: str = ""  # checkpoint or Hugging Face directory to start from ("" = train from scratch)
    seq_len: int = 256  # training window when fine-tuning (at most the model's block_size)
    lora_rank: int = 0  # 0 = full fine-tuning; else train rank-r adapters on the target layers only
    lora_alpha: float = 16.0  # adapter output is scaled by alpha / rank
    lora_dropout: float = 0.0
    lora_targets: str = (
        "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_gate,mlp.c_proj"  # or HF names, or "all-linear"
    )
    layer_lr_decay: float = 1.0  # < 1: each layer below the top learns this much slower (embeddings slowest)


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("data", "model", "optim", "train", "finetune")


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


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Set 'section.field' keys on a copy of `config`; unknown keys list the valid ones."""
    config = dataclasses.replace(config, **{s: dataclasses.replace(getattr(config, s)) for s in SECTIONS})
    types = field_types()
    for key, raw in overrides.items():
        if key in ("name", "description"):
            setattr(config, key, str(raw))
            continue
        if key not in types:
            section = key.split(".")[0]
            valid = [k for k in types if k.startswith(section + ".")] or list(SECTIONS)
            raise UserError(f"Unknown config key {key!r}; valid keys: {', '.join(valid)}.")
        section, name = key.split(".", 1)
        setattr(getattr(config, section), name, parse_value(key, raw, types[key]))
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
        return apply_overrides(Config(), flat)
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
    """Catch inconsistent settings before any work starts."""
    m, t, o = config.model, config.train, config.optim
    gpt = m.arch == "gpt"
    checks = [
        (
            not gpt or m.n_embd % m.n_head == 0,
            f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}).",
        ),
        (
            not gpt or m.n_kv_head == 0 or m.n_head % m.n_kv_head == 0,
            "model.n_head must be a multiple of model.n_kv_head.",
        ),
        (m.block_size >= 1, "model.block_size must be at least 1."),
        (
            m.pos_encoding in ("learned", "sinusoidal", "rope"),
            "model.pos_encoding must be learned, sinusoidal or rope.",
        ),
        (
            not gpt or m.pos_encoding != "rope" or (m.n_embd // m.n_head) % 2 == 0,
            "rope needs an even head size (n_embd / n_head).",
        ),
        (m.norm in ("layernorm", "rmsnorm"), "model.norm must be layernorm or rmsnorm."),
        (
            m.activation in ("gelu", "gelu_tanh", "relu2", "swiglu"),
            "model.activation must be gelu, gelu_tanh, relu2 or swiglu.",
        ),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)."),
        (m.n_layer >= 1 and m.n_embd >= 1, "model.n_layer and model.n_embd must be at least 1."),
        (t.max_iters >= 1, "train.max_iters must be at least 1."),
        (
            t.batch_size >= 1 and t.grad_accum >= 1,
            "train.batch_size and train.grad_accum must be at least 1.",
        ),
        (
            t.eval_interval >= 1 and t.eval_batches >= 1,
            "train.eval_interval and train.eval_batches must be at least 1.",
        ),
        (
            t.dtype in ("auto", "float32", "bfloat16", "float16"),
            "train.dtype must be auto, float32, bfloat16 or float16.",
        ),
        (o.optimizer in ("adamw", "muon"), "optim.optimizer must be adamw or muon."),
        (o.schedule in ("cosine", "wsd", "constant"), "optim.schedule must be cosine, wsd or constant."),
        (
            0.0 < config.data.val_fraction < 1.0 or config.data.val_path,
            "data.val_fraction must be between 0 and 1.",
        ),
        (config.finetune.lora_rank >= 0, "finetune.lora_rank must be at least 0 (0 = full fine-tuning)."),
        (0.0 < config.finetune.layer_lr_decay <= 1.0, "finetune.layer_lr_decay must be in (0, 1]."),
        (config.finetune.seq_len >= 1, "finetune.seq_len must be at least 1."),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
