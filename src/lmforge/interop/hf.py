"""Hugging Face checkpoints in and out: the GPT-2 and Llama families.

Import: a Hugging Face model directory (config.json; model.safetensors, sharded
safetensors with an index, or pytorch_model.bin read with `weights_only=True`;
tokenizer.json, or vocab.json + merges.txt) becomes lmforge's own GPT model,
tokenizer and config, so every command accepts such a directory as a checkpoint.
Supported `model_type`s: gpt2 (learned positions, LayerNorm, GELU-tanh, biases,
tied head) and llama / mistral / qwen2 (RoPE, RMSNorm, SwiGLU, grouped-query
attention; Qwen2's query/key/value biases).

Export: an lmforge GPT whose options match one of those families is written as a
directory that `transformers`' AutoModelForCausalLM and AutoTokenizer load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.config import Config, ModelConfig
from lmforge.errors import UserError
from lmforge.families import GPT, family_of
from lmforge.tokenizers import EOT, SOURCE_TOKENIZER, TextTokenizer, load_tokenizer
from lmforge.weights import load_state

LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED = ("gpt2", *LLAMA_LIKE, "bart", "marian", "mbart", "t5", "bert", "distilbert", "roberta")
BERT_LIKE = ("bert", "distilbert", "roberta")
BART_LIKE = ("bart", "marian", "mbart")


def is_hf_dir(path: str | Path) -> bool:
    """A directory whose config.json is a Hugging Face model config (has model_type)."""
    try:
        data = json.loads((Path(path) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data and data.get("format") != "lmforge-checkpoint"


# ---- configs -------------------------------------------------------------------------------


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UserError(f"RoPE scaling {kind!r} is not supported yet; only plain rotary positions are.")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The model section of a Hugging Face config.json, or one sentence naming what is missing or
    wrong in it (a damaged or hand-written file)."""
    from lmforge.settings import check_fields

    try:
        m = _model_config_from_hf(hf, source)
    except KeyError as e:
        raise UserError(f"{source} has no {e.args[0]!r}, which a {hf.get('model_type')} model needs; the folder is "
                        f"not a complete Hugging Face model.") from None  # fmt: skip
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{source} holds a value of the wrong kind ({e}); the folder is not a complete Hugging "
                        f"Face model.") from None  # fmt: skip
    try:
        check_fields(m, "model.")
    except UserError as e:
        raise UserError(f"{source}: {e} The folder is not a complete Hugging Face model.") from None
    return m


def _model_config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise UserError(f"{source}: model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}.")
    if kind in BART_LIKE:  # the encoder–decoder family (seq2seq/bart.py)
        from lmforge.seq2seq.bart import model_config_from_bart

        return model_config_from_bart(hf, source)
    if kind == "t5":  # the encoder–decoder family (seq2seq/t5.py)
        from lmforge.seq2seq.t5 import model_config_from_t5

        return model_config_from_t5(hf, source)
    if kind in BERT_LIKE:  # the encoder-only family (interop/bert.py)
        from lmforge.interop.bert import model_config_from_bert

        return model_config_from_bert(hf, source)
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise UserError(f"{source}: GPT-2 activation {act!r} is not supported (gelu_new or gelu).")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise UserError(
                f"{source}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                f"reorder_and_upcast_attn) are not supported."
            )
        return ModelConfig(
            arch="gpt",
            vocab_size=hf["vocab_size"],
            block_size=hf.get("n_positions", 1024),
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
            bias=True,
            pos_encoding="learned",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation="gelu" if act == "gelu" else "gelu_tanh",
            tie_embeddings=hf.get("tie_word_embeddings", True),
            dropout=0.0,
        )
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise UserError(
            f"{source}: head_dim {head_dim} × {n_head} heads ≠ hidden size {n_embd}; "
            f"such models are not supported yet."
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: activation {hf.get('hidden_act')!r} is not supported (silu).")
    if hf.get("mlp_bias"):
        raise UserError(f"{source}: MLP biases are not supported.")
    return ModelConfig(
        arch="gpt",
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        mlp_hidden=hf["intermediate_size"],
        bias=False,
        qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias")),
        pos_encoding="rope",
        rope_theta=_rope_theta(hf),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        dropout=0.0,
    )


def gpt_to_hf(
    m: ModelConfig, tensors: dict[str, torch.Tensor], eot_id: int | None = None
) -> tuple[dict, dict]:
    """The GPT family's Hugging Face export: the config and tensors of the layout that fits it."""
    hf_config = hf_config_from_model(m)
    kind = hf_config["model_type"] if hf_config["model_type"] in ("gpt2", "persimmon") else "llama"
    return hf_config, lmforge_to_hf(tensors, m, kind)


def hf_config_from_model(m: ModelConfig) -> dict[str, Any]:
    """The Hugging Face config of an lmforge GPT, or a clear refusal naming what does not fit."""
    if family_of(m.arch) is not GPT:  # (this module is the GPT family's Hugging Face mapping)
        raise UserError(f"This model cannot be exported to Hugging Face: transformers has no architecture for "
                        f"{m.arch} language models; export takes Transformer (gpt) models.")  # fmt: skip
    # A model without biases fits a family with biases exactly: its biases are written as zeros.
    full_heads = m.n_kv_head in (0, m.n_head)
    plain = m.logit_softcap == 0.0 and not m.qkv_bias
    gpt2 = (m.pos_encoding == "learned" and m.norm == "layernorm" and m.activation in ("gelu_tanh", "gelu")
            and m.tie_embeddings and not m.qk_norm and plain and full_heads)  # fmt: skip
    llama = dict(
        pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, qk_norm=False, logit_softcap=0.0
    )
    # Persimmon: rotary positions, LayerNorm, ReLU², a LayerNorm on each head's query and key
    # (lmforge's has no gain and eps 1e-5: written as gain 1, bias 0, with the model's eps).
    persimmon = (m.pos_encoding == "rope" and m.norm == "layernorm" and m.activation == "relu2" and m.qk_norm
                 and m.norm_eps == 1e-5 and plain and full_heads)  # fmt: skip
    hidden = m.mlp_hidden or int(m.mlp_ratio * m.n_embd)
    if persimmon:
        return {"model_type": "persimmon", "architectures": ["PersimmonForCausalLM"], "vocab_size": m.vocab_size,
                "hidden_size": m.n_embd, "intermediate_size": hidden, "num_hidden_layers": m.n_layer,
                "num_attention_heads": m.n_head, "max_position_embeddings": m.block_size, "hidden_act": "relu2",
                "layer_norm_eps": m.norm_eps, "qk_layernorm": True, "tie_word_embeddings": m.tie_embeddings,
                "rope_theta": m.rope_theta, "partial_rotary_factor": 1.0,
                "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta, "partial_rotary_factor": 1.0},
                "hidden_dropout": 0.0, "attention_dropout": 0.0}  # fmt: skip
    if gpt2:
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": m.vocab_size,
            "n_positions": m.block_size,
            "n_embd": m.n_embd,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_inner": hidden,
            "activation_function": "gelu_new" if m.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
        }
    if all(getattr(m, k) == v for k, v in llama.items()):
        kind = "qwen2" if m.qkv_bias else "llama"
        out = {
            "model_type": kind,
            "architectures": ["Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM"],
            "vocab_size": m.vocab_size,
            "hidden_size": m.n_embd,
            "intermediate_size": hidden,
            "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head,
            "num_key_value_heads": m.n_kv_head or m.n_head,
            "max_position_embeddings": m.block_size,
            "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": m.tie_embeddings,
            "attention_bias": m.qkv_bias,
        }
        return out
    raise UserError(
        "This model cannot be exported to Hugging Face: export needs the GPT-2 layout (learned positions, "
        "LayerNorm, GELU, tied head), the Llama layout (rope, rmsnorm, swiglu, no biases) or the Persimmon "
        "layout (rope, layernorm, relu2, QK-norm, full heads), without soft-capping; it has pos_encoding={m.pos_encoding}, norm={m.norm}, "
        f"activation={m.activation}, bias={m.bias}, qk_norm={m.qk_norm}, tie_embeddings={m.tie_embeddings}."
    )


# ---- weights -------------------------------------------------------------------------------


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory, from whichever weight files it has."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (ValueError, KeyError):
            raise UserError(f"{index} is not a valid safetensors index (no weight_map).") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"{index} lists shard(s) that are missing: {', '.join(missing)}; download them too."
            )
    elif (path / "pytorch_model.bin").is_file():
        import pickle

        try:
            loaded = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
            ):  # (weights_only admits lists, numbers and strings too)
                raise UserError(f"{path / 'pytorch_model.bin'} is not a table of named tensors (a state dict); "
                                f"it is not a model's weights.")  # fmt: skip
            return loaded
        except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
            raise UserError(
                f"{path / 'pytorch_model.bin'} holds more than plain tensors, and loading it would run "
                f"arbitrary pickled code, so lmforge refuses ({str(e).splitlines()[0][:120]}). Convert it "
                f"to model.safetensors with a tool you trust."
            ) from None
    else:
        raise UserError(
            f"{path} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)."
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}).") from None
    return tensors


# Parameter names, lmforge's → Hugging Face's; one table per family serves import and export.
# GPT-2's names are given without the "transformer." prefix that some of its checkpoints lack.
GPT2_NAMES = {
    "wte.weight": "wte.weight",
    "wpe.weight": "wpe.weight",
    "ln_f.weight": "ln_f.weight",
    "ln_f.bias": "ln_f.bias",
}
GPT2_LAYER_NAMES = {
    f"{module}.{p}": f"{module}.{p}" for p in ("weight", "bias") for module in ("ln_1", "ln_2")
} | {
    f"{linear}.bias": f"{linear}.bias" for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # HF stores these weights (in, out)
LLAMA_NAMES = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
LLAMA_LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_gate.weight": "mlp.gate_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}  # plus attn.c_attn = q_proj, k_proj and v_proj stacked


def _gpt2_to_lmforge(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in hf.items()}
    out = {ours: sd[theirs] for ours, theirs in GPT2_NAMES.items()}
    for i in range(m.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        out.update({b + ours: sd[h + theirs] for ours, theirs in GPT2_LAYER_NAMES.items()})
        for linear in GPT2_CONV1D:
            out[b + linear + ".weight"] = sd[h + linear + ".weight"].t().contiguous()
    if not m.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    return out


def llama_to_lmforge(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    out = {ours: hf[theirs] for ours, theirs in LLAMA_NAMES.items()}
    for i in range(m.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out.update({b + ours: hf[h + theirs] for ours, theirs in LLAMA_LAYER_NAMES.items()})
        out[b + "attn.c_attn.weight"] = torch.cat([hf[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        if m.qkv_bias:
            out[b + "attn.c_attn.bias"] = torch.cat([hf[h + f"self_attn.{p}_proj.bias"] for p in "qkv"])
    if not m.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    return out


def _with_zero_biases(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """`sd` with a zero bias for every linear and norm layer of a bias-free model."""
    out = dict(sd)
    for name, weight in sd.items():
        bias = name[: -len("weight")] + "bias"
        if name.endswith(".weight") and not name.startswith(("wte", "wpe", "lm_head")) and bias not in sd:
            out[bias] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


def _persimmon(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    head = m.n_embd // m.n_head
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.final_layernorm.weight": sd["ln_f.weight"],
           "model.final_layernorm.bias": sd["ln_f.bias"]}  # fmt: skip
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(m.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[h + f"input_layernorm.{p}"] = sd[b + f"ln_1.{p}"]
            out[h + f"post_attention_layernorm.{p}"] = sd[b + f"ln_2.{p}"]
            out[h + f"self_attn.dense.{p}"] = sd[b + f"attn.c_proj.{p}"]
            out[h + f"mlp.dense_h_to_4h.{p}"] = sd[b + f"mlp.c_fc.{p}"]
            out[h + f"mlp.dense_4h_to_h.{p}"] = sd[b + f"mlp.c_proj.{p}"]
            # lmforge stacks all queries, then keys, then values; Persimmon interleaves them per head.
            qkv = sd[b + f"attn.c_attn.{p}"]
            out[h + f"self_attn.query_key_value.{p}"] = (
                qkv.reshape(3, m.n_head, head, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape).contiguous()
            )
            for norm in ("q_layernorm", "k_layernorm"):
                out[h + f"self_attn.{norm}.{p}"] = torch.ones(head) if p == "weight" else torch.zeros(head)
    return out


def lmforge_to_hf(sd: dict[str, torch.Tensor], m: ModelConfig, kind: str) -> dict[str, torch.Tensor]:
    if kind in ("gpt2", "persimmon"):
        sd = _with_zero_biases(sd, m)
    if kind == "persimmon":
        return _persimmon(sd, m)
    if kind == "gpt2":
        out = {"transformer." + theirs: sd[ours] for ours, theirs in GPT2_NAMES.items()}
        for i in range(m.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            out.update({h + theirs: sd[b + ours] for ours, theirs in GPT2_LAYER_NAMES.items()})
            for linear in GPT2_CONV1D:
                out[h + linear + ".weight"] = sd[b + linear + ".weight"].t().contiguous()
        return out
    rows = [m.n_embd] + 2 * [(m.n_kv_head or m.n_head) * (m.n_embd // m.n_head)]  # q, k, v
    out = {theirs: sd[ours] for ours, theirs in LLAMA_NAMES.items()}
    for i in range(m.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out.update({h + theirs: sd[b + ours] for ours, theirs in LLAMA_LAYER_NAMES.items()})
        for param in ["weight"] + (["bias"] if m.qkv_bias else []):
            for p, part in zip("qkv", sd[b + f"attn.c_attn.{param}"].split(rows), strict=True):
                out[h + f"self_attn.{p}_proj.{param}"] = part.contiguous()
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# ---- tokenizers ----------------------------------------------------------------------------


def load_hf_tokenizer(path: Path) -> TextTokenizer:
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(
            path / "tokenizer.json"
        )  # (with source_tokenizer.json beside it, where there is one)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOT) is not None:
            tok.add_special_tokens([EOT])
        return TextTokenizer(tok, kind="bpe")
    if (path / "vocab.txt").is_file():  # BERT's WordPiece vocabulary
        from tokenizers.implementations import BertWordPieceTokenizer

        lowercase = _read_json(path / "tokenizer_config.json").get("do_lower_case", True)
        return TextTokenizer(BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=bool(lowercase))._tokenizer,
                             kind="wordpiece")  # fmt: skip
    if (path / "spiece.model").is_file():  # T5's SentencePiece
        from lmforge.interop.spm import t5_tokenizer

        extra = _read_json(path / "tokenizer_config.json").get("extra_ids", 100)
        return t5_tokenizer(path, extra if isinstance(extra, int) and extra >= 0 else 100)
    if (path / "source.spm").is_file() and (path / "vocab.json").is_file():  # Marian's SentencePiece
        from lmforge.interop.spm import marian_tokenizer

        return marian_tokenizer(path)
    raise UserError(
        f"{path} has no tokenizer (tokenizer.json, vocab.json + merges.txt, BERT's vocab.txt, T5's spiece.model, "
        f"or Marian's source.spm + vocab.json); copy the "
        f"tokenizer files from the model's source next to its weights."
    )


def chat_template(path: Path) -> str | None:
    """The Jinja chat template of a Hugging Face tokenizer config, if it has one."""
    try:
        data = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        data = {}
    template = data.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text("utf-8")
    return template if isinstance(template, str) else None


# ---- import / export -------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the model directory is damaged.") from None
    return data if isinstance(data, dict) else {}


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
DECODING_TOKENS = ("decoder_start_token_id", "forced_bos_token_id")


def read_hf_metadata(path: str | Path) -> tuple[Config, str | None, list[int], dict[str, Any], int | None]:
    """What a Hugging Face model directory says without loading weights: the lmforge Config,
    the chat template, every end-of-sequence id (config.json and generation_config.json, each
    an int or a list), the recommended sampling settings of generation_config.json and the
    beginning-of-text id."""
    path = Path(path)
    hf_config = _read_json(path / "config.json")
    generation = _read_json(path / "generation_config.json")
    # The decoding tokens of an encoder–decoder: generation_config.json's, where transformers keeps them.
    tokens = {k: generation[k] for k in DECODING_TOKENS if isinstance(generation.get(k), int)}
    m = model_config_from_hf({**hf_config, **tokens}, str(path / "config.json"))
    config = Config(
        name=path.name, description=f"imported from Hugging Face ({hf_config['model_type']})", model=m
    )
    eos: list[int] = []
    for source in (hf_config, generation):
        value = source.get("eos_token_id")
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in eos:
                eos.append(token)
    sampling = {k: generation[k] for k in SAMPLING_KEYS if isinstance(generation.get(k), int | float)}
    if generation.get("do_sample") is False:
        sampling["temperature"] = 0.0
    bos = hf_config.get("bos_token_id", generation.get("bos_token_id"))
    return config, chat_template(path), eos, sampling, bos if isinstance(bos, int) else None


def task_prefixes(path: str | Path) -> dict[str, str]:
    """The texts a Hugging Face model wants before its sources, by task (T5's task_specific_params:
    {"summarization": "summarize: ", "translation_en_to_fr": "translate English to French: "})."""
    params = _read_json(Path(path) / "config.json").get("task_specific_params") if is_hf_dir(path) else None
    if not isinstance(params, dict):
        return {}
    return {task: p["prefix"] for task, p in params.items()
            if isinstance(p, dict) and isinstance(p.get("prefix"), str) and p["prefix"]}  # fmt: skip


def _encoder_decoder_layout(m: ModelConfig):
    """The interop module of an encoder–decoder's Hugging Face layout: T5's (relative positions), else
    the BART family's (BART, Marian or mBART, by its switches)."""
    import lmforge.seq2seq.bart as bart
    import lmforge.seq2seq.t5 as t5

    return t5 if m.pos_encoding == "relative" else bart


def encoder_decoder_export(m: ModelConfig, tensors: dict, eot_id: int | None) -> tuple[dict, dict]:
    """The encoder–decoder family's Hugging Face export, in the layout its model has."""
    return _encoder_decoder_layout(m).export(m, tensors, eot_id)


def encoder_decoder_linear_modules(m: ModelConfig) -> dict[str, list[tuple[str, slice | None]]] | None:
    """An encoder–decoder's linear layers → their Hugging Face modules (PEFT's adapter names), for
    the layouts lmforge exports (T5, BART, Marian, mBART); None for others."""
    layout = _encoder_decoder_layout(m)
    try:
        layout.check_exportable(m)  # (what the export takes, PEFT's names follow)
    except UserError:
        return None
    return layout.linear_modules(m)


def read_hf_classifier(path: str | Path) -> dict[str, Any] | None:
    """What lmforge's classifier checkpoints hold, for a Hugging Face sequence classifier folder
    (BERT, DistilBERT, RoBERTa ...ForSequenceClassification); None for any other model."""
    from lmforge.interop.bert import classifier_metadata, is_sequence_classifier

    hf_config = _read_json(Path(path) / "config.json")
    return classifier_metadata(hf_config, Path(path)) if is_sequence_classifier(hf_config) else None


def import_hf(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, TextTokenizer, Config]:
    """A Hugging Face model directory as an lmforge GPT (eval mode), tokenizer and Config."""
    from lmforge.models import build_model

    path = Path(path)
    hf_config = _read_json(path / "config.json")
    config = read_hf_metadata(path)[0]
    m = config.model
    tokenizer = load_hf_tokenizer(path)
    tensors = read_hf_weights(path)
    try:
        if hf_config["model_type"] in BART_LIKE:
            from lmforge.seq2seq.bart import bart_to_lmforge

            converted = bart_to_lmforge(tensors, m)
        elif hf_config["model_type"] == "t5":
            from lmforge.seq2seq.t5 import t5_to_lmforge

            converted = t5_to_lmforge(tensors, m)
        elif hf_config["model_type"] in BERT_LIKE:
            from lmforge.interop.bert import bert_to_lmforge, position_offset

            converted = bert_to_lmforge(tensors, m, hf_config["model_type"], position_offset(hf_config))
        else:
            converted = (_gpt2_to_lmforge if hf_config["model_type"] == "gpt2" else llama_to_lmforge)(
                tensors, m
            )
    except KeyError as e:
        raise UserError(
            f"{path}: weight {e.args[0]} is missing; the files do not match config.json."
        ) from None
    model = build_model(m)
    if hf_config["model_type"] in BERT_LIKE:  # a bare body has no MLM head: the head keeps its fresh init
        fresh = model.state_dict()
        head = ("head_", "lm_head.bias", *(() if m.tie_embeddings else ("lm_head.weight",)))
        converted = {**{k: v for k, v in fresh.items() if k.startswith(head)}, **converted}
    load_state(converted, model, str(path))
    return model.float().to(device).eval(), tokenizer, config


def export_hf(model: nn.Module, tokenizer: TextTokenizer, config: Config, out: str | Path,
              chat_template: str | None = None, eos_ids: tuple[int, ...] = (),
              sampling: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write `model` as a Hugging Face directory: config.json, generation_config.json (every
    end-of-sequence id, the recommended sampling), model.safetensors, tokenizer.json and
    tokenizer_config.json (bos/eos/pad tokens, the chat template)."""
    from lmforge.io import atomic_write_json
    from lmforge.weights import save_tensors

    out = Path(out)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    family = family_of(config.model.arch)
    if family.hf_export is None:
        raise UserError(f"This model cannot be exported to Hugging Face: transformers has no architecture for "
                        f"{config.model.arch} language models; export takes Transformer (gpt) models.")  # fmt: skip
    hf_config, tensors = family.hf_export(config.model, sd, tokenizer.eot_id)
    # A tied head is not written: transformers re-ties lm_head to the embedding itself.
    out.mkdir(parents=True, exist_ok=True)
    ends = list(eos_ids) or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
    bos = tokenizer.eot_id if tokenizer.eot_id is not None else (ends[0] if ends else None)
    eos = ends[0] if len(ends) == 1 else (ends or None)
    hf_config["torch_dtype"] = "float32"
    # A family that knows its special tokens (a pretrained encoder–decoder's) has set them already.
    hf_config.setdefault("bos_token_id", bos)
    hf_config.setdefault("eos_token_id", eos)
    if "pad_token_id" in hf_config and tokenizer.hf.token_to_id("<pad>") is not None:
        hf_config["pad_token_id"] = tokenizer.hf.token_to_id("<pad>")
    save_tensors(out / "model.safetensors", tensors)
    tokenizer.save(out / "tokenizer.json")
    if tokenizer.source is not None:
        tokenizer.source.save(out / SOURCE_TOKENIZER)
    special = {}
    if ends:
        name = tokenizer.hf.id_to_token(ends[0])
        special = {"eos_token": name, "pad_token": name, "bos_token": tokenizer.hf.id_to_token(bos)}
    if tokenizer.hf.token_to_id("<unk>") is not None:
        special["unk_token"] = "<unk>"
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.model.block_size,
                        **special}  # fmt: skip
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    atomic_write_json(out / "tokenizer_config.json", tokenizer_config)
    generation = {"bos_token_id": bos, "eos_token_id": eos, **(sampling or {})}
    if sampling:
        generation["do_sample"] = sampling.get("temperature", 1.0) > 0
    atomic_write_json(out / "generation_config.json", generation)
    atomic_write_json(out / "config.json", hf_config)  # last: a complete directory has a config
    return out
