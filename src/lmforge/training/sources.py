"""Batch sources: where the trainer's batches come from, and how a batch becomes a loss.

The trainer's loop knows one interface, whatever the model:

    batch = source.next_batch()            # the next training batch
    loss = source.loss(model, batch)       # forward pass, returns the mean loss
    source.validation_score(model, dtype)  # {"val_loss": ...} (or accuracy for a classifier)
    source.state_dict() / load_state_dict  # its position, saved with the training state

Language models come in two kinds:
- `WindowSource`: random windows of the token stream (Transformers, as nanoGPT does);
- `StreamSource`: consecutive windows of contiguous streams with the hidden state of a
  recurrent model carried from one batch to the next (truncated backpropagation through
  time); the carried state is part of the source's saved state, so resume stays exact.
The classifier's source (`ExampleSource`) lives with the classifier trainer.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from lmforge.data.batches import IGNORE, ContiguousStreams, RandomWindows, fixed_windows, windows_to_tensors
from lmforge.device import autocast

LENGTH_POOL = 50  # batches sorted together by length


def length_grouped_batches(order: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Batches of examples of similar length, from a shuffled `order` of example indices.

    The order is cut into pools of 50 batches, each pool sorted by length (stable) and cut into
    batches: a batch holds examples of similar length, so little of it is padding, while the
    pools keep the epoch's randomness (the caller shuffles the batches). Only the very last
    batch can be shorter than `batch_size`."""
    pool = LENGTH_POOL * batch_size
    batches: list[torch.Tensor] = []
    for begin in range(0, len(order), pool):
        chunk = order[begin : begin + pool]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    return batches


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def validation_score(self, model: nn.Module, dtype: torch.dtype) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class WindowSource:
    """Random training windows; validation on fixed, evenly spaced windows."""

    def __init__(
        self,
        train: np.ndarray,
        val: np.ndarray,
        window: int,
        batch_size: int,
        eval_batches: int,
        seed: int,
        device: torch.device,
        train_mask: np.ndarray | None = None,
        val_mask: np.ndarray | None = None,
    ):
        self.sampler = RandomWindows(train, window, batch_size, seed, device, train_mask)
        self.val, self.val_mask = val, val_mask
        self.val_starts = fixed_windows(val, window, eval_batches * batch_size)
        self.window, self.batch_size, self.device = window, batch_size, device

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.next_batch()

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(*batch)[1]

    def validation_score(self, model: nn.Module, dtype: torch.dtype) -> dict[str, float]:
        loss = window_loss(model, self.val, self.val_starts, self.window, self.batch_size, self.device, dtype,
                           self.val_mask)  # fmt: skip
        return loss_scores(loss)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sampler.load_state_dict(state)


class MaskedWindowSource:
    """Masked-language-model batches (encoder models): random windows of the text with BERT's
    masking applied (models/encoder.py: `mask_tokens`); validation on fixed windows masked with a
    fixed seed, so every evaluation scores the same positions."""

    def __init__(self, train: np.ndarray, val: np.ndarray, window: int, batch_size: int, eval_batches: int,
                 seed: int, device: torch.device, mask_id: int, vocab_size: int, special: list[int]):  # fmt: skip
        self.sampler = RandomWindows(train, window, batch_size, seed, device)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.val, self.val_starts = val, fixed_windows(val, window, eval_batches * batch_size)
        self.window, self.batch_size, self.device = window, batch_size, device
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.special = torch.tensor(special, dtype=torch.long, device=device)

    def _masked(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from lmforge.models.encoder import mask_tokens

        return mask_tokens(ids, self.mask_id, self.vocab_size, generator, special=self.special)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids, _ = self.sampler.next_batch()
        return self._masked(ids, self.generator)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(*batch)[1]

    @torch.no_grad()
    def validation_score(self, model: nn.Module, dtype: torch.dtype) -> dict[str, float]:
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(0)
        total, count = 0.0, 0
        for i in range(0, len(self.val_starts), self.batch_size):
            ids, _ = windows_to_tensors(
                self.val, self.val_starts[i : i + self.batch_size], self.window, self.device
            )
            inputs, targets = self._masked(ids, generator)
            scored = int((targets != IGNORE).sum())
            if scored:
                with autocast(self.device, dtype):
                    total += float(model(inputs, targets)[1]) * scored
                count += scored
        model.train(was_training)
        return loss_scores(total / max(count, 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.sampler.state_dict(), "mask_generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.sampler.load_state_dict(state)
        self.generator.set_state(state["mask_generator"])


class StreamSource:
    """Contiguous streams for a recurrent model, its hidden state carried between batches."""

    def __init__(
        self, train: np.ndarray, val: np.ndarray, window: int, batch_size: int, device: torch.device
    ):
        self.streams = ContiguousStreams(train, window, batch_size, device)
        self.val, self.window, self.batch_size, self.device = val, window, batch_size, device
        self.carry: tuple[torch.Tensor, ...] | None = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.streams.next_batch()
        if self.streams.wrapped:
            self.carry = None  # the streams start over: so does the hidden state
        return batch

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        state = self.carry if self.carry is None or len(self.carry) > 1 else self.carry[0]
        _, loss, new_state = model(*batch, state=state, return_state=True)
        new_state = new_state if isinstance(new_state, tuple) else (new_state,)
        self.carry = tuple(t.detach() for t in new_state)  # truncate backpropagation here
        return loss

    def validation_score(self, model: nn.Module, dtype: torch.dtype) -> dict[str, float]:
        return loss_scores(stream_loss(model, self.val, self.window, self.batch_size, self.device, dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.streams.state_dict())
        for i, t in enumerate(self.carry or ()):
            state[f"carry.{i}"] = t
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.streams.load_state_dict(state)
        carry = [state[f"carry.{i}"].to(self.device) for i in range(len(state)) if f"carry.{i}" in state]
        self.carry = tuple(carry) or None


def loss_scores(loss: float) -> dict[str, float]:
    """What a language model's evaluation reports: the loss (which picks the best weights)
    and its perplexity."""
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def window_loss(
    model: nn.Module,
    tokens,
    starts,
    length: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    mask=None,
) -> float:
    """Mean next-token loss over fixed windows (every scored token weighs the same)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for i in range(0, len(starts), batch_size):
        x, y = windows_to_tensors(tokens, starts[i : i + batch_size], length, device, mask)
        scored = (y != IGNORE).sum()
        if mask is not None and scored.item() == 0:
            continue
        with autocast(device, dtype):
            _, loss = model(x, y)
        total += loss.float() * scored
        count += scored
    model.train(was_training)
    return total.item() / max(count.item(), 1)


@torch.no_grad()
def stream_loss(
    model: nn.Module, tokens, length: int, batch_size: int, device: torch.device, dtype: torch.dtype
) -> float:
    """Mean loss of a recurrent model over the whole split, carrying its state window to window."""
    was_training = model.training
    model.eval()
    streams = ContiguousStreams(tokens, length, min(batch_size, max(1, (len(tokens) - 1) // length)), device)
    total, state = torch.zeros((), device=device), None
    windows = streams.windows_per_pass()
    for _ in range(windows):
        x, y = streams.next_batch()
        with autocast(device, dtype):
            _, loss, state = model(x, y, state=state, return_state=True)
        total += loss.float()
    model.train(was_training)
    return total.item() / windows


# ---- what each family trains on (named by lmforge/families; `run` is the trainer's run) ----------


def text_data(run: Any) -> Any:
    """The text's token splits, prepared into the cache (or read from it)."""
    from lmforge.data.prepare import resolve_data

    return resolve_data(run.config.data, log=run.log)


def masked_text_data(run: Any) -> Any:
    """The text's token splits, with the [MASK] token that masked-LM training needs in the vocabulary."""
    from lmforge.models.encoder import MASK_TOKEN

    data = text_data(run)
    data.tokenizer.hf.add_special_tokens([MASK_TOKEN])
    return data


def window_source(run: Any) -> WindowSource:
    """Random windows of the token stream (with the loss mask of instruction data)."""
    tc, data, dist = run.config.train, run.data, run.dist
    return WindowSource(data.tokens("train"), data.tokens("val"), run.window, tc.batch_size, tc.eval_batches,
                        tc.seed + dist.rank, run.device, data.mask("train"), data.mask("val"))  # fmt: skip


def masked_source(run: Any) -> MaskedWindowSource:
    """Random windows with 15% of the tokens masked (BERT's objective)."""
    from lmforge.models.encoder import MASK_TOKEN

    tc, data, dist = run.config.train, run.data, run.dist
    tokenizer = data.tokenizer
    special = [i for i in (tokenizer.eot_id, tokenizer.hf.token_to_id("<unk>")) if i is not None]
    return MaskedWindowSource(data.tokens("train"), data.tokens("val"), run.window, tc.batch_size,
                              tc.eval_batches, tc.seed + dist.rank, run.device, tokenizer.hf.token_to_id(MASK_TOKEN),
                              tokenizer.vocab_size, special)  # fmt: skip


def stream_source(run: Any) -> WindowSource | StreamSource:
    """Contiguous streams with the recurrent state carried from batch to batch; under differential
    privacy independent windows instead, each from a zero state (a carried state would tie
    examples together)."""
    from lmforge.errors import UserError
    from lmforge.training import privacy

    if privacy.enabled(run.config.privacy):
        return window_source(run)
    tc, data, dist = run.config.train, run.data, run.dist
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    if data.mask("train") is not None:
        raise UserError(
            "Instruction (prompt/response) data needs a Transformer; recurrent models train on "
            "plain text only."
        )
    if (len(train_tokens) - 1) // tc.batch_size < run.window:
        raise UserError(
            f"The training split has {len(train_tokens)} tokens: too few for {tc.batch_size} streams of at "
            f"least one window ({run.window} tokens); use a longer text or a smaller batch or block size."
        )
    if dist.active:  # each rank reads its own slice of the text as its streams
        share = len(train_tokens) // dist.world_size
        train_tokens = train_tokens[dist.rank * share : (dist.rank + 1) * share]
    return StreamSource(train_tokens, val_tokens, run.window, tc.batch_size, run.device)
