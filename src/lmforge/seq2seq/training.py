"""The batch source of encoder–decoder training: source/target pairs, batched by length.

Each epoch the pairs are shuffled and grouped into batches of similar source length
(`length_grouped_batches`), and the batches shuffled: little of a batch is padding, and the order
still changes every epoch. A batch is

    source     (B, S)  token ids, right-padded          source_valid (B, S)  False on padding
    target_in  (B, T)  <|endoftext|> + target, padded   targets      (B, T)  target + <|endoftext|>,
                                                                             -100 on padding (not scored)

The same token begins the decoder's input and ends the target (the model learns to stop there).
A pretrained model brings its own tokens for these (`PairTokens`: Marian starts from <pad> and ends
with </s>, and its sources end with </s>).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from lmforge.data.batches import IGNORE
from lmforge.device import autocast
from lmforge.errors import UserError
from lmforge.training.sources import length_grouped_batches, loss_scores


def boundary_id(tokenizer) -> int:
    """The token that starts the decoder's input and ends a target: <|endoftext|>."""
    if tokenizer.eot_id is None:
        raise UserError("An encoder–decoder model needs a tokenizer with <|endoftext|> (lmforge's char, word and "
                        "bpe tokenizers have it); this tokenizer.json does not.")  # fmt: skip
    return tokenizer.eot_id


@dataclass(frozen=True)
class PairTokens:
    """An encoder–decoder's token protocol: the token an output starts from, the one that ends it,
    the tokens put around every source, and a token forced first in every output (BART's)."""

    start: int
    end: int
    source_prefix: tuple[int, ...] = ()
    source_suffix: tuple[int, ...] = ()
    forced_first: int | None = None

    def around(self, source: list[int], longest: int) -> list[int]:
        """`source` with its special tokens, its text cut to fit `longest` tokens in all."""
        room = max(1, longest - len(self.source_prefix) - len(self.source_suffix))
        return [*self.source_prefix, *source[:room], *self.source_suffix]

    @property
    def extra(self) -> int:
        """Tokens a source takes besides its text."""
        return len(self.source_prefix) + len(self.source_suffix)


def as_pair_tokens(tokens: PairTokens | int) -> PairTokens:
    """`tokens`, or lmforge's own protocol around one boundary id (it starts and ends outputs)."""
    return tokens if isinstance(tokens, PairTokens) else PairTokens(start=tokens, end=tokens)


def pair_tokens(m, tokenizer) -> PairTokens:
    """The token protocol of the model config `m`: its own ids (a pretrained model's), and
    <|endoftext|> where it gives none (-1: lmforge's models, which start and end with it)."""

    def given(value: int) -> int:
        return value if value >= 0 else boundary_id(tokenizer)

    return PairTokens(
        start=given(m.decoder_start_id), end=given(m.eos_id),
        source_prefix=(m.source_bos_id,) if m.source_bos_id >= 0 else (),
        source_suffix=(m.source_eos_id,) if m.source_eos_id >= 0 else (),
        forced_first=m.forced_bos_id if m.forced_bos_id >= 0 else None,
    )  # fmt: skip


def pad_sources(sources: list, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded source ids and their validity mask."""
    width = max(len(s) for s in sources)
    ids = torch.full((len(sources), width), pad, dtype=torch.long)
    valid = torch.zeros(len(sources), width, dtype=torch.bool)
    for row, s in enumerate(sources):
        ids[row, : len(s)] = torch.as_tensor(np.asarray(s), dtype=torch.long)
        valid[row, : len(s)] = True
    return ids.to(device), valid.to(device)


def make_batch(
    sources: list, targets: list, tokens: PairTokens | int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """A training batch: the sources with the model's special tokens around them, the targets after
    its start token (the decoder's input) and before its end token (what is scored)."""
    tokens = as_pair_tokens(tokens)
    if tokens.extra:
        sources = [[*tokens.source_prefix, *np.asarray(s).tolist(), *tokens.source_suffix] for s in sources]
    source, source_valid = pad_sources(sources, tokens.end, device)
    width = max(len(t) for t in targets) + 1
    target_in = torch.full((len(targets), width), tokens.end, dtype=torch.long)
    target_in[:, 0] = tokens.start
    labels = torch.full((len(targets), width), IGNORE, dtype=torch.long)
    for row, t in enumerate(targets):
        t = torch.as_tensor(np.asarray(t), dtype=torch.long)
        target_in[row, 1 : len(t) + 1] = t
        labels[row, : len(t)] = t
        labels[row, len(t)] = tokens.end
    return source, source_valid, target_in.to(device), labels.to(device)


class PairSource:
    """Length-bucketed batches of training pairs; validation loss on a fixed set of pairs."""

    def __init__(self, data, batch_size: int, eval_batches: int, seed: int, device: torch.device,
                 label_smoothing: float = 0.0, rank: int = 0, world_size: int = 1,
                 tokens: PairTokens | None = None):  # fmt: skip
        self.sources, self.targets = data.train_sources, data.train_targets
        self.val_sources = data.val_sources[: eval_batches * batch_size]
        self.val_targets = data.val_targets[: eval_batches * batch_size]
        # The model's token protocol (a pretrained one's), else lmforge's boundary token.
        self.tokens = tokens or as_pair_tokens(boundary_id(data.tokenizer))
        self.batch_size, self.device, self.label_smoothing = batch_size, device, label_smoothing
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches: list[list[int]] = []
        self.position = 0
        # Batches group pairs by source length, then by target length: little padding on either side.
        self.lengths = torch.tensor(
            [len(s) * 4096 + len(t) for s, t in zip(self.sources, self.targets, strict=True)]
        )

    def _new_epoch(self) -> None:
        order = torch.randperm(len(self.sources), generator=self.generator)
        order = order[self.rank :: self.world_size]  # each process its own share of the pairs
        batches = length_grouped_batches(order, self.lengths, self.batch_size)
        shuffled = torch.randperm(len(batches), generator=self.generator).tolist()
        self.batches, self.position = [batches[i].tolist() for i in shuffled], 0

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if self.position >= len(self.batches):
            self._new_epoch()
        rows = self.batches[self.position]
        self.position += 1
        return make_batch([self.sources[i] for i in rows], [self.targets[i] for i in rows], self.tokens,
                          self.device)  # fmt: skip

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        _, loss = model(*batch, label_smoothing=self.label_smoothing)
        return loss

    @torch.no_grad()
    def validation_score(self, model: nn.Module, dtype: torch.dtype) -> dict[str, float]:
        """Mean cross-entropy per target token (no label smoothing) over the fixed validation pairs."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.val_sources), self.batch_size):
            batch = make_batch(self.val_sources[i : i + self.batch_size], self.val_targets[i : i + self.batch_size],
                               self.tokens, self.device)  # fmt: skip
            with autocast(self.device, dtype):
                _, loss = model(*batch)
            scored = int((batch[3] != IGNORE).sum())
            total += float(loss) * scored
            count += scored
        model.train(was_training)
        return loss_scores(total / max(count, 1) if count else math.nan)

    def state_dict(self) -> dict[str, torch.Tensor]:
        flat = [i for b in self.batches for i in b]
        sizes = [len(b) for b in self.batches]
        return {"generator": self.generator.get_state(), "batch_rows": torch.tensor(flat, dtype=torch.long),
                "batch_sizes": torch.tensor(sizes, dtype=torch.long), "position": torch.tensor([self.position])}  # fmt: skip

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        rows, sizes = state["batch_rows"].tolist(), state["batch_sizes"].tolist()
        self.batches, begin = [], 0
        for size in sizes:
            self.batches.append(rows[begin : begin + size])
            begin += size
        self.position = int(state["position"][0])


# ---- what the encoder–decoder family trains on (named by lmforge/families/seq2seq.py) -----------


def pair_data(run) -> object:
    """The source/target pairs, tokenized (fine-tuning: with the base's tokenizer)."""
    from lmforge.seq2seq.data import prepare_pairs

    return prepare_pairs(run.config, log=run.log)


def pair_source(run) -> PairSource:
    tc, dist = run.config.train, run.dist
    return PairSource(run.data, tc.batch_size, tc.eval_batches, tc.seed + dist.rank, run.device,
                      tc.label_smoothing, dist.rank, dist.world_size, pair_tokens(run.config.model, run.tokenizer))  # fmt: skip
