"""The BART family of Hugging Face encoder–decoders (`model_type` "bart", "marian", "mbart") in and
out of lmforge's encoder–decoder (models/seq2seq.py).

The three share their weight names and differ in a few switches, each one a field of lmforge's
model config:

                      norm order               embedding norm   positions                     embeddings × √width
    bart  (BART)      post (`post_norm`)       yes              learned, 2 offset rows        scale_embedding
    marian (OPUS-MT)  post, SiLU ("swish")     no               fixed sines | cosines halves  scale_embedding
    mbart             pre, a final norm        yes              learned, 2 offset rows        scale_embedding

All three add `final_logits_bias` to the head (`model.logits_bias`). Their token protocol travels in
the model config too: the decoder starts from `decoder_start_token_id`, outputs end with
`eos_token_id`, BART puts <s> before a source and </s> after it, Marian </s> after it, and BART may
force the first output token (`forced_bos_token_id`).

Name mapping (HF → lmforge), per layer i:

    model.shared                               wte (and the tied lm_head); final_logits_bias: lm_head.bias
    model.{encoder,decoder}.embed_positions    {source,target}_wpe (HF's table has 2 extra rows first)
    model.{encoder,decoder}.layernorm_embedding {source,target}_norm
    *.self_attn.{q,k,v}_proj                   *.attn.q, *.attn.kv (k and v stacked), *.attn.c_proj (out_proj)
    decoder.layers.i.encoder_attn.*            decoder.i.cross.*
    *.self_attn_layer_norm / final_layer_norm  ln_1 / ln_2 (encoder), ln_1 / ln_3 (decoder; ln_2: encoder_attn_layer_norm)
    *.fc1 / *.fc2                              *.mlp.c_fc / *.mlp.c_proj
    model.encoder.layer_norm / decoder.layer_norm   ln_enc / ln_f (mBART only)
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError

OFFSET = 2  # BART's and mBART's learned positions start at row 2 of their table
ACTIVATIONS = {"gelu": "gelu", "swish": "silu", "silu": "silu"}  # theirs → lmforge's
TYPES = ("bart", "marian", "mbart")


def _token(hf: dict[str, Any], key: str) -> int:
    value = hf.get(key)
    return value if isinstance(value, int) and value >= 0 else -1


def model_config_from_bart(hf: dict[str, Any], source: str) -> ModelConfig:
    """lmforge's model section of a BART, Marian or mBART config.json."""
    kind = hf["model_type"]
    activation = hf.get("activation_function", "gelu")
    if activation not in ACTIVATIONS:
        raise UserError(f"{source}: {kind} activation {activation!r} is not supported (gelu or swish).")
    if hf.get("encoder_attention_heads") != hf.get("decoder_attention_heads"):
        raise UserError(f"{source}: different head counts in encoder and decoder are not supported.")
    ffn = hf.get("encoder_ffn_dim", 4 * hf["d_model"])
    if ffn != hf.get("decoder_ffn_dim", ffn):
        raise UserError(f"{source}: different MLP widths in encoder and decoder are not supported.")
    # Some Marian models have separate source and target vocabularies: vocab_size is then the sources'
    targets = hf.get("decoder_vocab_size") or hf["vocab_size"]
    separate = kind == "marian" and (
        not hf.get("share_encoder_decoder_embeddings", True) or targets != hf["vocab_size"]
    )
    length = hf.get("max_position_embeddings", 1024)
    marian, pre_norm = kind == "marian", kind == "mbart"
    return ModelConfig(
        arch="seq2seq", vocab_size=targets if separate else hf["vocab_size"], block_size=length,
        source_block_size=length, source_vocab_size=hf["vocab_size"] if separate else 0,
        n_layer=hf["decoder_layers"], n_encoder_layer=hf["encoder_layers"], n_head=hf["encoder_attention_heads"],
        n_embd=hf["d_model"], mlp_hidden=ffn, bias=True,
        pos_encoding="sinusoidal_halves" if marian else "learned", norm="layernorm", norm_eps=1e-5,
        activation=ACTIVATIONS[activation], tie_embeddings=hf.get("tie_word_embeddings", True),
        embedding_norm=not marian, scale_embedding=bool(hf.get("scale_embedding", marian)),
        post_norm=not pre_norm, logits_bias=True,
        decoder_start_id=_token(hf, "decoder_start_token_id"), eos_id=_token(hf, "eos_token_id"),
        source_bos_id=_token(hf, "bos_token_id") if kind == "bart" else -1,
        source_eos_id=_token(hf, "eos_token_id") if kind != "mbart" else -1,
        forced_bos_id=_token(hf, "forced_bos_token_id"),
    )  # fmt: skip


def hf_type(m: ModelConfig) -> str:
    """The model_type an lmforge encoder–decoder exports as."""
    if not m.post_norm:
        return "mbart"
    return "bart" if m.embedding_norm else "marian"


def _pairs(theirs: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{theirs}.weight", f"{ours}.weight"), (f"{theirs}.bias", f"{ours}.bias")]


def _layer_names(side: str, i: int) -> list[tuple[str, str]]:
    """(HF name, lmforge name) of one layer's norms and linear layers (attention q/out and MLP)."""
    hf, ours = f"model.{side}.layers.{i}", f"{side}.{i}"
    names = _pairs(f"{hf}.self_attn_layer_norm", f"{ours}.ln_1")
    names += _pairs(f"{hf}.self_attn.q_proj", f"{ours}.attn.q")
    names += _pairs(f"{hf}.self_attn.out_proj", f"{ours}.attn.c_proj")
    names += _pairs(f"{hf}.fc1", f"{ours}.mlp.c_fc") + _pairs(f"{hf}.fc2", f"{ours}.mlp.c_proj")
    if side == "encoder":
        names += _pairs(f"{hf}.final_layer_norm", f"{ours}.ln_2")
    else:
        names += _pairs(f"{hf}.encoder_attn_layer_norm", f"{ours}.ln_2")
        names += _pairs(f"{hf}.encoder_attn.q_proj", f"{ours}.cross.q")
        names += _pairs(f"{hf}.encoder_attn.out_proj", f"{ours}.cross.c_proj")
        names += _pairs(f"{hf}.final_layer_norm", f"{ours}.ln_3")
    return names


def _stacked(side: str, i: int) -> list[tuple[str, str]]:
    """(HF attention prefix, lmforge kv prefix): k_proj and v_proj are one stacked kv layer here."""
    hf, ours = f"model.{side}.layers.{i}", f"{side}.{i}"
    out = [(f"{hf}.self_attn", f"{ours}.attn.kv")]
    if side == "decoder":
        out.append((f"{hf}.encoder_attn", f"{ours}.cross.kv"))
    return out


def _global_names(m: ModelConfig) -> list[tuple[str, str]]:
    names = [("model.shared.weight", "wte.weight")]
    if m.embedding_norm:
        names += _pairs("model.encoder.layernorm_embedding", "source_norm")
        names += _pairs("model.decoder.layernorm_embedding", "target_norm")
    if not m.post_norm:
        names += _pairs("model.encoder.layer_norm", "ln_enc") + _pairs("model.decoder.layer_norm", "ln_f")
    return names


def _sides(m: ModelConfig) -> tuple[tuple[str, int], ...]:
    return ("encoder", m.n_encoder_layer or m.n_layer), ("decoder", m.n_layer)


def linear_modules(m: ModelConfig) -> dict[str, list[tuple[str, slice | None]]]:
    """Each lmforge linear layer → the Hugging Face modules it stands for, with their rows of it
    (a stacked key/value layer is k_proj's rows, then v_proj's): how LoRA adapters are named in PEFT."""
    out: dict[str, list[tuple[str, slice | None]]] = {}
    for side, count in _sides(m):
        for i in range(count):
            for theirs, ours in _layer_names(side, i):
                if theirs.endswith(".weight") and ".ln_" not in ours:
                    out[ours.removesuffix(".weight")] = [(theirs.removesuffix(".weight"), None)]
            for theirs, ours in _stacked(side, i):
                rows = [slice(0, m.n_embd), slice(m.n_embd, 2 * m.n_embd)]
                out[ours] = [(f"{theirs}.k_proj", rows[0]), (f"{theirs}.v_proj", rows[1])]
    return out


def bart_to_lmforge(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge tensors from a BART, Marian or mBART ...ForConditionalGeneration state dict."""
    shared = hf.get("model.shared.weight", hf.get("model.encoder.embed_tokens.weight"))
    if (
        m.source_vocab_size
    ):  # separate vocabularies: the decoder's table is the targets', the encoder's the sources'
        shared = hf["model.decoder.embed_tokens.weight"]
    sd = {**hf, "model.shared.weight": shared}
    out = {ours: sd[theirs] for theirs, ours in _global_names(m)}
    if m.source_vocab_size:
        out["source_wte.weight"] = hf["model.encoder.embed_tokens.weight"]
    if m.pos_encoding == "learned":
        out["source_wpe.weight"] = hf["model.encoder.embed_positions.weight"][OFFSET:]
        out["target_wpe.weight"] = hf["model.decoder.embed_positions.weight"][OFFSET:]
    for side, count in _sides(m):
        for i in range(count):
            out.update({ours: sd[theirs] for theirs, ours in _layer_names(side, i)})
            for theirs, ours in _stacked(side, i):
                for kind in ("weight", "bias"):
                    out[f"{ours}.{kind}"] = torch.cat(
                        [hf[f"{theirs}.k_proj.{kind}"], hf[f"{theirs}.v_proj.{kind}"]]
                    )
    if m.logits_bias:
        out["lm_head.bias"] = hf.get("final_logits_bias", torch.zeros(1, m.vocab_size)).reshape(-1)
    if not m.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    return out


def lmforge_to_bart(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse mapping; missing biases (a model trained with bias false) are written as zeros."""

    def get(name: str) -> torch.Tensor:  # a missing bias: zeros, one per output of its weight
        like = sd[name.rsplit(".", 1)[0] + ".weight"]
        return sd[name] if name in sd else torch.zeros(like.shape[0], dtype=like.dtype)

    out = {theirs: get(ours) for theirs, ours in _global_names(m)}
    if m.pos_encoding == "learned":
        pad = torch.zeros(OFFSET, m.n_embd)
        out["model.encoder.embed_positions.weight"] = torch.cat([pad, sd["source_wpe.weight"]])
        out["model.decoder.embed_positions.weight"] = torch.cat([pad, sd["target_wpe.weight"]])
    for side, count in _sides(m):
        for i in range(count):
            out.update({theirs: get(ours) for theirs, ours in _layer_names(side, i)})
            for theirs, ours in _stacked(side, i):
                k, v = sd[f"{ours}.weight"].chunk(2)
                kb, vb = sd.get(f"{ours}.bias", torch.zeros(2 * m.n_embd)).chunk(2)
                out.update({f"{theirs}.k_proj.weight": k, f"{theirs}.v_proj.weight": v,
                            f"{theirs}.k_proj.bias": kb, f"{theirs}.v_proj.bias": vb})  # fmt: skip
    bias = sd.get("lm_head.bias", torch.zeros(m.vocab_size))
    out["final_logits_bias"] = bias.reshape(1, -1)
    if m.source_vocab_size:  # separate vocabularies: each side's own table
        out["model.decoder.embed_tokens.weight"] = out.pop("model.shared.weight")
        out["model.encoder.embed_tokens.weight"] = sd["source_wte.weight"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def check_exportable(m: ModelConfig) -> None:
    kind = hf_type(m)
    positions = "sinusoidal_halves" if kind == "marian" else "learned"
    rules = [
        (m.pos_encoding == positions, f"{positions} positions (model.pos_encoding {positions})"),
        (m.norm == "layernorm", "LayerNorm (model.norm layernorm)"),
        (m.activation in ("gelu", "silu"), "the GELU or SiLU activation (model.activation gelu or silu)"),
        (m.embedding_norm or kind == "marian", "a norm after the embeddings (model.embedding_norm true)"),
        ((m.source_block_size or m.block_size) == m.block_size, "one length for sources and targets"),
        (not m.copy_attention, "no copy attention (model.copy_attention false)"),
        (not m.source_vocab_size or kind == "marian", "one vocabulary for both sides (only Marian has two)"),
    ]
    label = {"mbart": "mBART", "bart": "BART", "marian": "Marian"}[kind]
    for ok, what in rules:
        if not ok:
            raise UserError(f"Export to {label} needs {what}; this model differs, so transformers could not run "
                            f"it the same way.")  # fmt: skip


def bart_config_from_model(m: ModelConfig, boundary: int | None) -> dict[str, Any]:
    """A config.json for transformers; lmforge's own token protocol (-1) is `boundary` throughout."""
    check_exportable(m)
    kind = hf_type(m)
    classes = {"mbart": "MBartForConditionalGeneration", "bart": "BartForConditionalGeneration",
               "marian": "MarianMTModel"}  # fmt: skip

    def token(value: int) -> int | None:
        return value if value >= 0 else boundary

    eos = token(m.eos_id)
    config = {
        "model_type": kind, "architectures": [classes[kind]], "vocab_size": m.vocab_size,
        "d_model": m.n_embd, "encoder_layers": m.n_encoder_layer or m.n_layer, "decoder_layers": m.n_layer,
        "encoder_attention_heads": m.n_head, "decoder_attention_heads": m.n_head,
        "encoder_ffn_dim": m.mlp_hidden or int(m.mlp_ratio * m.n_embd),
        "decoder_ffn_dim": m.mlp_hidden or int(m.mlp_ratio * m.n_embd),
        "max_position_embeddings": m.block_size, "activation_function": "swish" if m.activation == "silu" else "gelu",
        "scale_embedding": m.scale_embedding, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings, "pad_token_id": token(m.decoder_start_id) if kind == "marian" else eos,
        "bos_token_id": m.source_bos_id if m.source_bos_id >= 0 else (None if kind == "marian" else eos),
        "eos_token_id": eos,
        "decoder_start_token_id": token(m.decoder_start_id), "forced_eos_token_id": eos, "is_encoder_decoder": True,
    }  # fmt: skip
    if m.source_vocab_size:  # separate vocabularies (Marian): vocab_size is the sources'
        config.update(vocab_size=m.source_vocab_size, decoder_vocab_size=m.vocab_size,
                      share_encoder_decoder_embeddings=False)  # fmt: skip
    if kind != "marian":  # (transformers knows the order by the type; CTranslate2's converter reads this key)
        config["normalize_before"] = kind == "mbart"
    if m.forced_bos_id >= 0:
        config["forced_bos_token_id"] = m.forced_bos_id
    return config


def export(m: ModelConfig, tensors: dict, eot_id: int | None) -> tuple[dict, dict]:
    """The encoder–decoder family's Hugging Face export: the config and tensors of its BART-family type."""
    return bart_config_from_model(m, eot_id), lmforge_to_bart(tensors, m)
