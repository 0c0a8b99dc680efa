"""mBART (Hugging Face `model_type` "mbart") in and out of lmforge's encoder–decoder.

Why mBART of the three families the issue names: it has the same layout as lmforge's model —
pre-norm blocks, a final norm after both stacks, one shared embedding tied to the head, learned
positions — so every weight maps one to one and parity is exact. Marian and BART are post-norm
(the norm after each residual sum), T5 uses relative position buckets and a different norm: each
would need a second block layout in models/seq2seq.py.

Name mapping (HF → lmforge), per layer i:

    model.shared                               wte (and the tied lm_head)
    model.{encoder,decoder}.embed_positions    {source,target}_wpe (HF's table has 2 extra rows first)
    model.{encoder,decoder}.layernorm_embedding {source,target}_norm
    *.self_attn.{q,k,v}_proj                   *.attn.q, *.attn.kv (k and v stacked), *.attn.c_proj (out_proj)
    decoder.layers.i.encoder_attn.*            decoder.i.cross.*
    *.self_attn_layer_norm / final_layer_norm  ln_1 / ln_2 (encoder), ln_1 / ln_3 (decoder; ln_2: encoder_attn_layer_norm)
    *.fc1 / *.fc2                              *.mlp.c_fc / *.mlp.c_proj
    model.encoder.layer_norm / decoder.layer_norm   ln_enc / ln_f
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError

OFFSET = 2  # mBART's learned positions start at row 2 of their table


def model_config_from_mbart(hf: dict[str, Any], source: str) -> ModelConfig:
    if hf.get("activation_function", "gelu") != "gelu":
        raise UserError(
            f"{source}: mBART activation {hf.get('activation_function')!r} is not supported (gelu)."
        )
    if hf.get("encoder_attention_heads") != hf.get("decoder_attention_heads"):
        raise UserError(f"{source}: different head counts in encoder and decoder are not supported.")
    if hf.get("d_model") != hf.get("decoder_embed_dim", hf.get("d_model")):
        raise UserError(f"{source}: different widths in encoder and decoder are not supported.")
    ffn = hf.get("encoder_ffn_dim", 4 * hf["d_model"])
    if ffn != hf.get("decoder_ffn_dim", ffn):
        raise UserError(f"{source}: different MLP widths in encoder and decoder are not supported.")
    return ModelConfig(
        arch="seq2seq", vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 1024),
        source_block_size=hf.get("max_position_embeddings", 1024), n_layer=hf["decoder_layers"],
        n_encoder_layer=hf["encoder_layers"], n_head=hf["encoder_attention_heads"], n_embd=hf["d_model"],
        mlp_hidden=ffn, bias=True, pos_encoding="learned", norm="layernorm", norm_eps=1e-5, activation="gelu",
        tie_embeddings=hf.get("tie_word_embeddings", True), embedding_norm=True,
        scale_embedding=bool(hf.get("scale_embedding", False)),
    )  # fmt: skip


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


def _global_names() -> list[tuple[str, str]]:
    names = [("model.shared.weight", "wte.weight")]
    names += _pairs("model.encoder.layernorm_embedding", "source_norm")
    names += _pairs("model.decoder.layernorm_embedding", "target_norm")
    names += _pairs("model.encoder.layer_norm", "ln_enc") + _pairs("model.decoder.layer_norm", "ln_f")
    return names


def mbart_to_lmforge(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    bias = hf.get("final_logits_bias")
    if bias is not None and bool(bias.abs().max() > 0):
        raise UserError("This mBART checkpoint has a non-zero final_logits_bias, which lmforge's model has no "
                        "place for.")  # fmt: skip
    shared = hf.get("model.shared.weight", hf.get("model.encoder.embed_tokens.weight"))
    sd = {"model.shared.weight": shared, **hf}
    out = {ours: sd[theirs] for theirs, ours in _global_names()}
    out["source_wpe.weight"] = hf["model.encoder.embed_positions.weight"][OFFSET:]
    out["target_wpe.weight"] = hf["model.decoder.embed_positions.weight"][OFFSET:]
    for side, count in (("encoder", m.n_encoder_layer or m.n_layer), ("decoder", m.n_layer)):
        for i in range(count):
            out.update({ours: sd[theirs] for theirs, ours in _layer_names(side, i)})
            for theirs, ours in _stacked(side, i):
                for kind in ("weight", "bias"):
                    out[f"{ours}.{kind}"] = torch.cat(
                        [hf[f"{theirs}.k_proj.{kind}"], hf[f"{theirs}.v_proj.{kind}"]]
                    )
    if not m.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    return out


def lmforge_to_mbart(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse mapping; missing biases (a model trained with bias false) are written as zeros,
    and a missing embedding norm as none (export refuses such a model: see check_exportable)."""

    def get(name: str, like: str) -> torch.Tensor:  # a missing bias: zeros, one per output of its weight
        return sd[name] if name in sd else torch.zeros(sd[like].shape[0], dtype=sd[like].dtype)

    out = {}
    for theirs, ours in _global_names():
        like = ours.rsplit(".", 1)[0] + ".weight"
        out[theirs] = get(ours, like) if ours.endswith(".bias") else sd[ours]
    pad = torch.zeros(OFFSET, m.n_embd)
    out["model.encoder.embed_positions.weight"] = torch.cat([pad, sd["source_wpe.weight"]])
    out["model.decoder.embed_positions.weight"] = torch.cat([pad, sd["target_wpe.weight"]])
    for side, count in (("encoder", m.n_encoder_layer or m.n_layer), ("decoder", m.n_layer)):
        for i in range(count):
            for theirs, ours in _layer_names(side, i):
                out[theirs] = (
                    get(ours, ours.rsplit(".", 1)[0] + ".weight") if ours.endswith(".bias") else sd[ours]
                )
            for theirs, ours in _stacked(side, i):
                k, v = sd[f"{ours}.weight"].chunk(2)
                kb, vb = sd.get(f"{ours}.bias", torch.zeros(2 * m.n_embd)).chunk(2)
                out.update({f"{theirs}.k_proj.weight": k, f"{theirs}.v_proj.weight": v,
                            f"{theirs}.k_proj.bias": kb, f"{theirs}.v_proj.bias": vb})  # fmt: skip
    out["final_logits_bias"] = torch.zeros(1, m.vocab_size)
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def check_exportable(m: ModelConfig) -> None:
    rules = [
        (m.pos_encoding == "learned", "learned positions (model.pos_encoding learned)"),
        (m.norm == "layernorm", "LayerNorm (model.norm layernorm)"),
        (m.activation == "gelu", "the GELU activation (model.activation gelu)"),
        (m.embedding_norm, "a norm after the embeddings (model.embedding_norm true)"),
        ((m.source_block_size or m.block_size) == m.block_size, "one length for sources and targets"),
        (not m.copy_attention, "no copy attention (model.copy_attention false)"),
    ]
    for ok, what in rules:
        if not ok:
            raise UserError(f"Export to mBART needs {what}; this model differs, so transformers could not run it "
                            f"the same way.")  # fmt: skip


def mbart_config_from_model(m: ModelConfig, boundary: int | None) -> dict[str, Any]:
    check_exportable(m)
    return {
        "model_type": "mbart", "architectures": ["MBartForConditionalGeneration"], "vocab_size": m.vocab_size,
        "d_model": m.n_embd, "encoder_layers": m.n_encoder_layer or m.n_layer, "decoder_layers": m.n_layer,
        "encoder_attention_heads": m.n_head, "decoder_attention_heads": m.n_head,
        "encoder_ffn_dim": m.mlp_hidden or int(m.mlp_ratio * m.n_embd),
        "decoder_ffn_dim": m.mlp_hidden or int(m.mlp_ratio * m.n_embd),
        "max_position_embeddings": m.block_size, "activation_function": "gelu", "scale_embedding": m.scale_embedding,
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "tie_word_embeddings": m.tie_embeddings,
        "pad_token_id": boundary, "bos_token_id": boundary, "eos_token_id": boundary,
        "decoder_start_token_id": boundary, "forced_eos_token_id": boundary, "is_encoder_decoder": True,
    }  # fmt: skip


def to_mbart(m: ModelConfig, tensors: dict, eot_id: int | None) -> tuple[dict, dict]:
    """The encoder–decoder family's Hugging Face export: mBART's config and tensors."""
    return mbart_config_from_model(m, eot_id), lmforge_to_mbart(tensors, m)
