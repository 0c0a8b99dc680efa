"""Recurrent language models: LSTM, GRU and Elman RNN, in one file.

    tokens ─▶ embedding ─▶ dropout ─▶ n_layer recurrent layers (dropout between them)
           ─▶ dropout ─▶ [projection to the embedding width] ─▶ linear head ─▶ logits

Training uses truncated back-propagation through time: the trainer feeds
consecutive windows of contiguous streams and carries the hidden state from one
window to the next (detached, so gradients stop at window boundaries). For
generation the hidden state is the cache: each new token costs one step.

Unlike the GPT, the model has no context limit: `block_size` is only the
training window (the BPTT length), and `max_context` is unbounded.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models.registry import register

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentState:
    """The generation cache of a recurrent model: its hidden state (and a length, for the loop)."""

    def __init__(self):
        self.state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        if isinstance(self.state, tuple):
            self.state = tuple(s.index_select(1, index) for s in self.state)
        elif self.state is not None:
            self.state = self.state.index_select(1, index)

    @classmethod
    def joined(
        cls, parts: list[tuple[RecurrentState, torch.Tensor]], room: int, batch: int = 0
    ) -> RecurrentState:
        """The rows `rows` of each `(state, rows)` part, in order, as one state (continuous
        batching; `room` and `batch` are unused: a hidden state does not grow, and rows are
        joined only when they come)."""
        out = cls()
        states = [state.state for state, _ in parts]
        if isinstance(states[0], tuple):
            out.state = tuple(
                torch.cat([s[i].index_select(1, rows) for s, (_, rows) in zip(states, parts, strict=True)], 1)
                for i in range(len(states[0]))
            )
        else:
            out.state = torch.cat(
                [s.index_select(1, rows) for s, (_, rows) in zip(states, parts, strict=True)], 1
            )
        out.length = max(state.length for state, _ in parts)
        return out


def detach_state(state):
    """Cut the gradient history at a window boundary (truncated BPTT)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


class RecurrentLM(nn.Module):
    stateful = True  # the trainer carries hidden state across consecutive windows

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.block_size = 1 << 30  # no context limit (cfg.block_size is the BPTT window)
        hidden = cfg.hidden_size or cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = CELLS[cfg.arch](
            cfg.n_embd,
            hidden,
            num_layers=cfg.n_layer,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,
        )
        # With tied weights the head must work at the embedding width: project down if needed.
        self.proj = (
            nn.Linear(hidden, cfg.n_embd, bias=False) if cfg.tie_embeddings and hidden != cfg.n_embd else None
        )
        self.lm_head = nn.Linear(
            cfg.n_embd if self.proj is not None or cfg.tie_embeddings else hidden, cfg.vocab_size, bias=True
        )
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.1 if not cfg.tie_embeddings else 0.02)
        nn.init.zeros_(self.lm_head.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        state=None,
        return_state: bool = False,
        cache: RecurrentState | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ):
        """(logits, loss), plus the final hidden state with `return_state` (training carries it).

        Generation passes a `cache`; left padding (attention_mask False) is skipped so that
        each row's state only ever sees its own tokens.
        """
        start_state = cache.state if cache is not None else state
        if attention_mask is not None and not bool(attention_mask.all()):
            out, new_state = self._run_padded(idx, attention_mask, start_state)
        else:
            out, new_state = self.rnn(self.drop(self.wte(idx)), start_state)
        if last_only:
            out = out[:, -1:]
        if self.proj is not None:
            out = self.proj(out)
        logits = self.lm_head(self.drop(out))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        if cache is not None:
            cache.state = new_state
            cache.length += idx.shape[1]
        if return_state:
            return logits, loss, new_state
        return logits, loss

    def _run_padded(self, idx, valid, start_state):
        """Run each row on its valid (left-padded) tokens only; outputs at pads are zeros."""
        lengths = valid.sum(1)
        # Left padding -> right padding, then a packed sequence skips the pads exactly.
        order = torch.argsort(~valid, dim=1, stable=True)
        right = torch.gather(idx, 1, order)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.wte(right)), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, new_state = self.rnn(packed, start_state)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=idx.shape[1])
        # Back to left-padded positions: the last valid output must sit in the last column.
        shift = idx.shape[1] - lengths
        cols = (torch.arange(idx.shape[1], device=idx.device)[None, :] - shift[:, None]).clamp(min=0)
        out = torch.gather(out, 1, cols[:, :, None].expand(-1, -1, out.shape[-1]))
        return out * valid[:, :, None], new_state

    def features(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, hidden) of right-padded sequences (padding packed away)."""
        emb = self.drop(self.wte(idx))
        if lengths is None:
            return self.rnn(emb)[0]
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=idx.shape[1])[0]

    def new_cache(
        self, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None
    ) -> RecurrentState:
        return RecurrentState()

    def flops_per_token(self) -> float:
        cfg = self.config
        hidden = cfg.hidden_size or cfg.n_embd
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[cfg.arch]
        recurrent = sum(
            gates * hidden * ((cfg.n_embd if i == 0 else hidden) + hidden) for i in range(cfg.n_layer)
        )
        head = self.lm_head.in_features * cfg.vocab_size
        return 6 * (recurrent + head + (self.proj.weight.numel() if self.proj is not None else 0))


for _arch in CELLS:
    register(_arch)(RecurrentLM)
