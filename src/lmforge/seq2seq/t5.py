"""T5, T5 v1.1 and Flan-T5 (Hugging Face `model_type` "t5") in and out of lmforge's encoder–decoder.

T5's layout in lmforge's switches (models/seq2seq.py): pre-norm blocks with RMS norms without bias
(`norm rmsnorm`, eps 1e-6), no bias anywhere, no position table but a learned bias per head for
each bucket of key-minus-query distances, in the first layer's self-attention of each stack and
shared by the others (`pos_encoding relative`, `relative_buckets`, `relative_max_distance`),
attention scores not divided by √head size (`attn_scale 1`), and a feed-forward of ReLU (T5) or
gated GELU (v1.1, Flan: `geglu`). T5's head is tied to the embedding and its input scaled by
1/√width (`scale_decoder_output`); v1.1 and Flan have no scaling (and, in their own files, an
untied head; transformers 5 ties it and names the scaling `scale_decoder_outputs`). Sources end with
</s>; the decoder starts from <pad>. `task_specific_params` (T5's prefixes, "summarize: ") are kept
by the checkpoint reader for translate and summarize.

Name mapping (HF → lmforge), stack s (encoder, decoder), layer i:

    shared                                               wte (and a tied lm_head)
    s.block.0.layer.0.SelfAttention.relative_attention_bias   source_bias / target_bias
    s.block.i.layer.0.layer_norm / SelfAttention.{q,k,v,o}    s.i.ln_1 / attn.q, attn.kv (k, v stacked), attn.c_proj
    decoder.block.i.layer.1.layer_norm / EncDecAttention.*    decoder.i.ln_2 / cross.*
    s.block.i.layer.-1.layer_norm / DenseReluDense.{wi | wi_0, wi_1, wo}   ln_2 (encoder) or ln_3 / mlp.{c_fc | c_gate, c_fc, c_proj}
    s.final_layer_norm                                   ln_enc / ln_f
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError

FEED_FORWARD = {"relu": "relu", "gated-gelu": "geglu"}  # T5's feed_forward_proj → lmforge's activation


def model_config_from_t5(hf: dict[str, Any], source: str) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD:
        raise UserError(f"{source}: T5 feed_forward_proj {proj!r} is not supported (relu or gated-gelu).")
    n_embd, n_head = hf["d_model"], hf["num_heads"]
    if hf.get("d_kv", n_embd // n_head) * n_head != n_embd:
        raise UserError(f"{source}: T5 with d_kv × num_heads ≠ d_model is not supported.")
    length = hf.get("n_positions", 512)
    tied = hf.get("tie_word_embeddings", True)
    # transformers 5 names the scaling; earlier configs meant it by a tied head (v1.1 and Flan untie).
    scaled = hf.get("scale_decoder_outputs", tied)
    return ModelConfig(
        arch="seq2seq", vocab_size=hf["vocab_size"], block_size=length, source_block_size=length,
        n_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_encoder_layer=hf["num_layers"], n_head=n_head,
        n_embd=n_embd, mlp_hidden=hf["d_ff"], bias=False, pos_encoding="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), attn_scale=1.0, norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=FEED_FORWARD[proj], tie_embeddings=tied,
        scale_decoder_output=bool(scaled), decoder_start_id=_token(hf, "decoder_start_token_id", 0),
        eos_id=_token(hf, "eos_token_id", 1), source_eos_id=_token(hf, "eos_token_id", 1),
    )  # fmt: skip


def _token(hf: dict[str, Any], key: str, default: int) -> int:
    value = hf.get(key, default)
    return value if isinstance(value, int) and value >= 0 else default


def _names(m: ModelConfig) -> list[tuple[str, str]]:
    """(HF name, lmforge name) of every weight but the stacked keys and values."""
    names = [("shared.weight", "wte.weight"), ("encoder.final_layer_norm.weight", "ln_enc.weight"),
             ("decoder.final_layer_norm.weight", "ln_f.weight"),
             ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "source_bias.weight"),
             ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "target_bias.weight")]  # fmt: skip
    mlp = {"c_gate": "wi_0", "c_fc": "wi_1"} if m.activation == "geglu" else {"c_fc": "wi"}
    mlp["c_proj"] = "wo"
    for side, count in (("encoder", m.n_encoder_layer or m.n_layer), ("decoder", m.n_layer)):
        for i in range(count):
            hf, ours = f"{side}.block.{i}.layer", f"{side}.{i}"
            attentions = [("0.SelfAttention", "attn", "ln_1")]
            if side == "decoder":
                attentions.append(("1.EncDecAttention", "cross", "ln_2"))
            for theirs, attention, norm in attentions:
                names += [(f"{hf}.{theirs}.q.weight", f"{ours}.{attention}.q.weight"),
                          (f"{hf}.{theirs}.o.weight", f"{ours}.{attention}.c_proj.weight"),
                          (f"{hf}.{theirs.split('.')[0]}.layer_norm.weight", f"{ours}.{norm}.weight")]  # fmt: skip
            last, norm = ("1", "ln_2") if side == "encoder" else ("2", "ln_3")
            names.append((f"{hf}.{last}.layer_norm.weight", f"{ours}.{norm}.weight"))
            names += [
                (f"{hf}.{last}.DenseReluDense.{theirs}.weight", f"{ours}.mlp.{o}.weight")
                for o, theirs in mlp.items()
            ]
    return names


def _stacked(m: ModelConfig) -> list[tuple[str, str]]:
    """(HF attention prefix, lmforge kv name): k and v are one stacked layer here."""
    out = []
    for side, count in (("encoder", m.n_encoder_layer or m.n_layer), ("decoder", m.n_layer)):
        for i in range(count):
            out.append((f"{side}.block.{i}.layer.0.SelfAttention", f"{side}.{i}.attn.kv.weight"))
            if side == "decoder":
                out.append((f"{side}.block.{i}.layer.1.EncDecAttention", f"{side}.{i}.cross.kv.weight"))
    return out


def linear_modules(m: ModelConfig) -> dict[str, list[tuple[str, slice | None]]]:
    """Each lmforge linear layer → the Hugging Face modules it stands for, with their rows of it
    (a stacked key/value layer is k's rows, then v's): how LoRA adapters are named in PEFT."""
    out: dict[str, list[tuple[str, slice | None]]] = {}
    for theirs, ours in _names(m):
        if ours.count(".") == 4:  # side.i.module.linear.weight: a layer's linear (norms: side.i.ln_k.weight)
            out[ours.removesuffix(".weight")] = [(theirs.removesuffix(".weight"), None)]
    for theirs, ours in _stacked(m):
        rows = [slice(0, m.n_embd), slice(m.n_embd, 2 * m.n_embd)]
        out[ours.removesuffix(".weight")] = [(f"{theirs}.k", rows[0]), (f"{theirs}.v", rows[1])]
    return out


def t5_to_lmforge(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {"shared.weight": hf.get("shared.weight", hf.get("encoder.embed_tokens.weight")), **hf}
    out = {ours: sd[theirs] for theirs, ours in _names(m)}
    for theirs, ours in _stacked(m):
        out[ours] = torch.cat([hf[f"{theirs}.k.weight"], hf[f"{theirs}.v.weight"]])
    if not m.tie_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    return out


def lmforge_to_t5(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    out = {theirs: sd[ours] for theirs, ours in _names(m)}
    for theirs, ours in _stacked(m):
        out[f"{theirs}.k.weight"], out[f"{theirs}.v.weight"] = sd[ours].chunk(2)
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def t5_config_from_model(m: ModelConfig) -> dict[str, Any]:
    proj = {v: k for k, v in FEED_FORWARD.items()}[m.activation]
    return {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": m.vocab_size,
        "d_model": m.n_embd, "d_kv": m.n_embd // m.n_head, "d_ff": m.mlp_hidden, "num_layers": m.n_encoder_layer or m.n_layer,
        "num_decoder_layers": m.n_layer, "num_heads": m.n_head, "relative_attention_num_buckets": m.relative_buckets,
        "relative_attention_max_distance": m.relative_max_distance, "layer_norm_epsilon": m.norm_eps,
        "feed_forward_proj": proj, "tie_word_embeddings": m.tie_embeddings,
        "scale_decoder_outputs": m.scale_decoder_output, "dropout_rate": 0.0,
        "n_positions": m.block_size, "decoder_start_token_id": m.decoder_start_id, "eos_token_id": m.eos_id,
        "pad_token_id": m.decoder_start_id, "is_encoder_decoder": True,
    }  # fmt: skip


def is_t5_layout(m: ModelConfig) -> bool:
    return m.pos_encoding == "relative"


def check_exportable(m: ModelConfig) -> None:
    rules = [
        (m.norm == "rmsnorm" and not m.bias and not m.post_norm, "pre-norm RMS norms and no biases"),
        (m.activation in ("relu", "geglu"), "the ReLU or gated-GELU feed-forward (model.activation relu or geglu)"),
        (m.attn_scale == 1.0, "unscaled attention scores (model.attn_scale 1)"),
        (m.decoder_start_id >= 0 and m.eos_id >= 0 and m.source_eos_id == m.eos_id,
         "T5's tokens (decoder_start_id, eos_id, source_eos_id)"),
        (not m.copy_attention and not m.embedding_norm and not m.scale_embedding and not m.logits_bias,
         "none of copy attention, an embedding norm or scale, a logits bias"),
    ]  # fmt: skip
    for ok, what in rules:
        if not ok:
            raise UserError(f"Export to T5 needs {what}; this model differs, so transformers could not run it the "
                            f"same way.")  # fmt: skip


def export(m: ModelConfig, tensors: dict, eot_id: int | None = None) -> tuple[dict, dict]:
    """T5's config and tensors (T5 brings its own tokens: `eot_id` is not needed)."""
    check_exportable(m)
    return t5_config_from_model(m), lmforge_to_t5(tensors, m)
