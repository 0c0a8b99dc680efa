"""Text classification: a sequence body, a pooling step and a linear head.

    tokens ─▶ body.features(tokens, lengths) ─▶ (B, T, H) ─▶ pool over real tokens ─▶ linear ─▶ class logits

Bodies: a bidirectional LSTM over packed variable-length sequences (from
scratch), or the body of any lmforge language model (GPT, recurrent or BERT-style
encoder), built from scratch or initialised from a trained checkpoint. Inputs are
right-padded.

Pretrained sequence classifiers (BERT, DistilBERT, RoBERTa; lmforge/interop/bert.py) pool their
first token ([CLS] or <s>) and pass it through one more dense layer before the head:

    pooled ─▶ dropout ─▶ dense ─▶ tanh (BERT's pooler, RoBERTa's head) or ReLU (DistilBERT) ─▶ dropout ─▶ linear
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ClassifierConfig


class BiLSTMEncoder(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = nn.LSTM(
            cfg.n_embd,
            cfg.hidden_size,
            num_layers=cfg.n_layer,
            batch_first=True,
            bidirectional=True,
            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
        )
        self.width = 2 * cfg.hidden_size

    def features(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.wte(idx)), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=idx.shape[1])[0]


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per sequence from its first `lengths` positions."""
    valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None].to(hidden.device)
    if how == "mean":
        return (hidden * valid[:, :, None]).sum(1) / lengths[:, None].to(hidden.device)
    if how == "max":
        return hidden.masked_fill(~valid[:, :, None], float("-inf")).max(1).values
    if how == "first":
        return hidden[:, 0]
    last = (lengths - 1).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class TextClassifier(nn.Module):
    def __init__(self, body: nn.Module, width: int, n_classes: int, cfg: ClassifierConfig):
        super().__init__()
        self.body = body
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.pre = nn.Linear(width, width) if cfg.pre_head else None
        self.head = nn.Linear(width, n_classes)

    def forward(
        self,
        idx: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.body.features(idx, lengths)
        pooled = self.drop(pool(hidden.float(), lengths, self.cfg.pooling))
        if self.pre is not None:
            pooled = self.pre(pooled)
            pooled = self.drop(torch.tanh(pooled) if self.cfg.pre_head == "tanh" else F.relu(pooled))
        logits = self.head(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels, weight=class_weights)
        return logits, loss


def body_width(body: nn.Module) -> int:
    if isinstance(body, BiLSTMEncoder):
        return body.width
    cfg = body.config
    if cfg.arch in ("gpt", "encoder"):
        return cfg.n_embd
    return cfg.hidden_size or cfg.n_embd
