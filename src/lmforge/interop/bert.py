"""Hugging Face BERT, DistilBERT and RoBERTa in lmforge's encoder (models/encoder.py), as masked
language models (BERT) and as sequence classifiers (all three: `...ForSequenceClassification`,
opened as lmforge text classifiers, classification/model.py).

The layouts are the same (post-norm layers, an embedding norm, BERT's MLM head), so the weights
map one to one; query, key and value are stacked into one projection here. Only segment 0 of
BERT's token-type embedding is kept (lmforge feeds single texts; DistilBERT has none: zeros).
RoBERTa numbers its positions from padding_idx + 1 (2): its table loses those first rows. A
`BertModel` checkpoint without the MLM head imports too: its head keeps a fresh initialisation (the
body is what a classifier uses).

The classifiers' heads (pooled first token → dense → activation → linear):

    bert        bert.pooler.dense (tanh)       classifier
    roberta     classifier.dense (tanh)        classifier.out_proj
    distilbert  pre_classifier (ReLU)          classifier
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError

TYPES = ("bert", "distilbert", "roberta")
PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}


def position_offset(hf: dict[str, Any]) -> int:
    """Rows at the start of the position table a model never reads (RoBERTa: padding_idx + 1)."""
    return hf.get("pad_token_id", 1) + 1 if hf.get("model_type") == "roberta" else 0


def model_config_from_bert(hf: dict[str, Any], source: str) -> ModelConfig:
    """lmforge's encoder config of a BERT, DistilBERT or RoBERTa config.json."""
    kind = hf.get("model_type", "bert")
    if kind == "distilbert":
        hf = {"hidden_act": hf.get("activation", "gelu"), "num_hidden_layers": hf["n_layers"],
              "num_attention_heads": hf["n_heads"], "hidden_size": hf["dim"], "intermediate_size": hf["hidden_dim"],
              "layer_norm_eps": 1e-12, **hf}  # fmt: skip
        if hf.get("sinusoidal_pos_embds"):
            raise UserError(
                f"{source}: DistilBERT with sinusoidal positions is not supported (learned ones are)."
            )
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{source}: {kind} activation {hf.get('hidden_act')!r} is not supported (gelu).")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(
            f"{source}: {kind} position_embedding_type {hf['position_embedding_type']!r} is not supported."
        )
    return ModelConfig(arch="encoder", vocab_size=hf["vocab_size"],
                       block_size=hf.get("max_position_embeddings", 512) - position_offset(hf),
                       n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                       mlp_hidden=hf.get("intermediate_size", 4 * hf["hidden_size"]), bias=True,
                       norm_eps=hf.get("layer_norm_eps", 1e-12), activation="gelu", pos_encoding="learned",
                       tie_embeddings=hf.get("tie_word_embeddings", True))  # fmt: skip


def _names(kind: str, n_layer: int) -> list[tuple[str, str]]:
    """(HF name without prefix and weight/bias suffix, lmforge name) of every norm and linear layer."""
    if kind == "distilbert":
        names = [("embeddings.LayerNorm", "ln_e"), ("vocab_transform", "head_dense"),
                 ("vocab_layer_norm", "head_ln")]  # fmt: skip
        for i in range(n_layer):
            hf, ours = f"transformer.layer.{i}", f"layers.{i}"
            names += [(f"{hf}.attention.out_lin", f"{ours}.c_proj"), (f"{hf}.sa_layer_norm", f"{ours}.ln_1"),
                      (f"{hf}.ffn.lin1", f"{ours}.mlp.c_fc"), (f"{hf}.ffn.lin2", f"{ours}.mlp.c_proj"),
                      (f"{hf}.output_layer_norm", f"{ours}.ln_2")]  # fmt: skip
        return names
    head = ("lm_head.dense", "lm_head.layer_norm") if kind == "roberta" else (
        "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm")  # fmt: skip
    names = [("embeddings.LayerNorm", "ln_e"), (head[0], "head_dense"), (head[1], "head_ln")]
    for i in range(n_layer):
        hf, ours = f"encoder.layer.{i}", f"layers.{i}"
        names += [(f"{hf}.attention.output.dense", f"{ours}.c_proj"), (f"{hf}.attention.output.LayerNorm", f"{ours}.ln_1"),
                  (f"{hf}.intermediate.dense", f"{ours}.mlp.c_fc"), (f"{hf}.output.dense", f"{ours}.mlp.c_proj"),
                  (f"{hf}.output.LayerNorm", f"{ours}.ln_2")]  # fmt: skip
    return names


def _unprefixed(hf: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The body's tensors without the model's prefix (a bare BertModel has none); heads keep theirs."""
    return {k.removeprefix(PREFIX[kind]): v for k, v in hf.items()}


def bert_to_lmforge(hf: dict[str, torch.Tensor], m: ModelConfig, kind: str = "bert",
                    offset: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """lmforge encoder tensors from a BERT / DistilBERT / RoBERTa state dict (masked LM, bare model or
    sequence classifier; `offset`: the position rows the model never reads)."""
    sd = _unprefixed(hf, kind)
    segments = sd.get("embeddings.token_type_embeddings.weight")
    out = {
        "wte.weight": sd["embeddings.word_embeddings.weight"],
        "wpe.weight": sd["embeddings.position_embeddings.weight"][offset : offset + m.block_size],
        "segment": segments[0] if segments is not None else torch.zeros(m.n_embd),
    }
    for theirs, ours in _names(kind, m.n_layer):
        for part in ("weight", "bias"):
            if f"{theirs}.{part}" in sd:
                out[f"{ours}.{part}"] = sd[f"{theirs}.{part}"]
    for i in range(m.n_layer):
        if kind == "distilbert":
            attention, parts = f"transformer.layer.{i}.attention", ("q_lin", "k_lin", "v_lin")
        else:
            attention, parts = f"encoder.layer.{i}.attention.self", ("query", "key", "value")
        for part in ("weight", "bias"):
            out[f"layers.{i}.c_attn.{part}"] = torch.cat([sd[f"{attention}.{p}.{part}"] for p in parts])
    bias = sd.get("cls.predictions.bias", sd.get("cls.predictions.decoder.bias", sd.get("lm_head.bias")))
    if bias is None and "vocab_projector.bias" in sd:
        bias = sd["vocab_projector.bias"]
    if bias is not None:
        out["lm_head.bias"] = bias
    if not m.tie_embeddings and "cls.predictions.decoder.weight" in sd:
        out["lm_head.weight"] = sd["cls.predictions.decoder.weight"]
    return out


# ---- sequence classifiers ------------------------------------------------------------------------

HEADS = {  # kind: (dense layer before the head, its activation, the head)
    "bert": ("bert.pooler.dense", "tanh", "classifier"),
    "roberta": ("classifier.dense", "tanh", "classifier.out_proj"),
    "distilbert": ("pre_classifier", "relu", "classifier"),
}


def is_sequence_classifier(hf: dict[str, Any]) -> bool:
    architectures = hf.get("architectures") or []
    return hf.get("model_type") in TYPES and any(
        isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures
    )


def classifier_metadata(hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """What lmforge's classifier checkpoints hold (labels, classifier settings, the body's config),
    for a Hugging Face sequence classifier's config.json."""
    from lmforge.classification.model import ClassifierConfig

    source = str(path / "config.json")
    try:
        body = model_config_from_bert(hf, source)
        names = hf.get("id2label") or {}
        labels = [names.get(str(i), names.get(i)) for i in range(len(names))]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source} lacks or misstates {e}; the folder is not a complete Hugging Face "
                        f"classifier.") from None  # fmt: skip
    if len(labels) < 2 or not all(isinstance(label, str) for label in labels):
        raise UserError(f"{source} names no labels (id2label with ids 0, 1, ...); the folder is not a complete "
                        f"Hugging Face classifier.")  # fmt: skip
    settings = ClassifierConfig(body="lm", vocab_size=body.vocab_size, n_embd=body.n_embd, dropout=0.0,
                                pooling="first", max_length=body.block_size, pre_head=HEADS[hf["model_type"]][1],
                                special_tokens=True)  # fmt: skip
    return {"task": "classification", "labels": labels, "classifier": dataclasses.asdict(settings),
            "body": dataclasses.asdict(body), "hf_classifier": hf["model_type"],
            "position_offset": position_offset(hf), "imported_from": str(path.resolve())}  # fmt: skip


def classifier_tensors(
    hf: dict[str, torch.Tensor], metadata: dict[str, Any], m: ModelConfig
) -> dict[str, torch.Tensor]:
    """The TextClassifier's tensors (body.*, pre.*, head.*) of a sequence classifier's state dict."""
    kind = metadata["hf_classifier"]
    body = bert_to_lmforge(hf, m, kind, metadata["position_offset"])
    dense, _, head = HEADS[kind]
    out = {f"body.{k}": v for k, v in body.items()}
    for part in ("weight", "bias"):
        out[f"pre.{part}"] = hf[f"{dense}.{part}"]
        out[f"head.{part}"] = hf[f"{head}.{part}"]
    return out
