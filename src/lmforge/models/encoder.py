"""A BERT-style Transformer encoder with its masked-language-model head, in one file.

    tokens ─▶ token + position (+ segment) embeddings ─▶ norm
           ─▶ n_layer × [ x = norm(x + attn(x)) ; x = norm(x + mlp(x)) ]     (post-norm, as BERT)
           ─▶ hidden states (B, T, n_embd): the body a classifier pools (`features`)
           ─▶ MLM head: dense ─▶ GELU ─▶ norm ─▶ linear tied to the embedding (+ bias) ─▶ logits

Attention is bidirectional; padding (right) is masked out of every key. The masked-language-model
objective (Devlin et al.): 15% of the tokens are chosen; of those 80% become [MASK], 10% a random
token, 10% stay; the loss is the cross-entropy of the original token at the chosen positions only
(`mask_tokens` makes such a batch; targets elsewhere are -100). The layout is BERT's exactly, so
Hugging Face BERT checkpoints import with equal logits (interop/bert.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models.gpt import MLP, init_gpt2
from lmforge.models.registry import register

MASK_TOKEN = "[MASK]"


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # query, key, value
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, -1)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = self.ln_1(x + self.drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C))))
        return self.ln_2(x + self.drop(self.mlp(x)))


@register("encoder")
class Encoder(nn.Module):
    """BERT: `forward(idx, targets)` gives masked-LM logits (and the loss over targets that are not -100);
    `features(idx, lengths)` the hidden states, for a classification head."""

    stateful = False
    is_masked_lm = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.segment = nn.Parameter(torch.zeros(cfg.n_embd))  # BERT's token-type embedding of segment 0
        self.ln_e = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.head_dense = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.head_ln = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(lambda module: init_gpt2(module, residual_std=0.02))  # BERT: N(0, 0.02) everywhere

    def hidden_states(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.block_size})")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)) + self.segment
        x = self.drop(self.ln_e(x))
        mask = None if valid is None else valid[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, valid: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        h = self.head_ln(F.gelu(self.head_dense(self.hidden_states(idx, valid))))
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def features(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        valid = None
        if lengths is not None:
            valid = torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths[:, None].to(idx.device)
        return self.hidden_states(idx, valid)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.wte.weight.numel() - self.wpe.weight.numel()

    def flops_per_token(self) -> float:
        return (
            6 * self.num_params(embeddings=False)
            + 12 * self.config.n_layer * self.config.n_embd * self.block_size
        )


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator | None = None,
                rate: float = 0.15, special: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(inputs, targets) of BERT's objective for a batch of token ids: `rate` of the positions are
    chosen (never `special` ones), 80% of those become `mask_id`, 10% a random token, 10% unchanged;
    targets hold the original token at chosen positions and -100 elsewhere."""
    draw = lambda: torch.rand(ids.shape, generator=generator).to(ids.device)  # noqa: E731
    chosen = draw() < rate
    if special is not None:
        chosen &= ~torch.isin(ids, special)
    targets = ids.masked_fill(~chosen, -100)
    inputs = ids.clone()
    roll = draw()
    inputs[chosen & (roll < 0.8)] = mask_id
    random_rows = chosen & (roll >= 0.8) & (roll < 0.9)
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    inputs[random_rows] = random_tokens[random_rows]
    return inputs, targets
