"""Hugging Face BERT (`model_type` "bert") in lmforge's encoder (models/encoder.py).

The layouts are the same (post-norm layers, an embedding norm, BERT's MLM head), so the weights
map one to one; query, key and value are stacked into one projection here. Only segment 0 of
BERT's token-type embedding is kept (lmforge feeds single texts). A `BertModel` checkpoint without
the MLM head imports too: its head keeps a fresh initialisation (the body is what a classifier uses).
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError


def model_config_from_bert(hf: dict[str, Any], source: str) -> ModelConfig:
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{source}: BERT activation {hf.get('hidden_act')!r} is not supported (gelu).")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(
            f"{source}: BERT position_embedding_type {hf['position_embedding_type']!r} is not supported."
        )
    return ModelConfig(arch="encoder", vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 512),
                       n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                       mlp_hidden=hf.get("intermediate_size", 4 * hf["hidden_size"]), bias=True,
                       norm_eps=hf.get("layer_norm_eps", 1e-12), activation="gelu", pos_encoding="learned",
                       tie_embeddings=hf.get("tie_word_embeddings", True))  # fmt: skip


def _names(n_layer: int) -> list[tuple[str, str]]:
    """(HF name without the weight/bias suffix, lmforge name) of every norm and linear layer."""
    names = [("embeddings.LayerNorm", "ln_e"), ("cls.predictions.transform.dense", "head_dense"),
             ("cls.predictions.transform.LayerNorm", "head_ln")]  # fmt: skip
    for i in range(n_layer):
        hf, ours = f"encoder.layer.{i}", f"layers.{i}"
        names += [(f"{hf}.attention.output.dense", f"{ours}.c_proj"), (f"{hf}.attention.output.LayerNorm", f"{ours}.ln_1"),
                  (f"{hf}.intermediate.dense", f"{ours}.mlp.c_fc"), (f"{hf}.output.dense", f"{ours}.mlp.c_proj"),
                  (f"{hf}.output.LayerNorm", f"{ours}.ln_2")]  # fmt: skip
    return names


def bert_to_lmforge(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge tensors from a BertForMaskedLM (or BertModel) state dict."""
    sd = {k.removeprefix("bert."): v for k, v in hf.items()}  # BertModel checkpoints have no prefix
    out = {
        "wte.weight": sd["embeddings.word_embeddings.weight"],
        "wpe.weight": sd["embeddings.position_embeddings.weight"],
        "segment": sd["embeddings.token_type_embeddings.weight"][0],
    }
    for theirs, ours in _names(m.n_layer):
        for kind in ("weight", "bias"):
            if f"{theirs}.{kind}" in sd:
                out[f"{ours}.{kind}"] = sd[f"{theirs}.{kind}"]
    for i in range(m.n_layer):
        attention = f"encoder.layer.{i}.attention.self"
        for kind in ("weight", "bias"):
            parts = [sd[f"{attention}.{p}.{kind}"] for p in ("query", "key", "value")]
            out[f"layers.{i}.c_attn.{kind}"] = torch.cat(parts)
    bias = sd.get("cls.predictions.bias", sd.get("cls.predictions.decoder.bias"))
    if bias is not None:
        out["lm_head.bias"] = bias
    if not m.tie_embeddings and "cls.predictions.decoder.weight" in sd:
        out["lm_head.weight"] = sd["cls.predictions.decoder.weight"]
    return out
