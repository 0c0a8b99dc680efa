"""Speculative decoding: guess several tokens cheaply, check them all in one forward pass.

Two ways to guess ("draft"):

    PromptLookup(n)    the tokens that followed the latest earlier occurrence of the text's last
                       1..n tokens (prompt-lookup / n-gram drafts: pays when the reply repeats the
                       prompt, as summaries, edits, code and extraction do)
    DraftModel(model)  a smaller checkpoint with the same tokenizer proposes tokens greedily

The model reads the token it just chose and the k drafted ones in one multi-row step (the weights
are read once for all of them) and gives the next-token logits at each of those k + 1 places. Drafted
token i is kept when it is the token the model chooses there: greedy decoding then gives exactly
plain decoding's tokens. Sampling keeps a drafted token d with the probability p(d) that the model
gives it and, when it refuses d, draws from p without d: the standard rejection rule for a draft that
is certain of its guess, so the tokens are distributed exactly as by plain sampling. The first
refused place still yields a token (the model's own choice there), so every step makes at least one.
The number of drafted tokens follows the acceptance rate (`DraftSchedule`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.generation_config import GenerationConfig
from lmforge.native.decoding import chain_logits, step_logits
from lmforge.sampling import (
    apply_penalties,
    ban_repeated_ngrams,
    choose_tokens,
    next_token_probs,
    sample,
)


@dataclass
class SpeculationStats:
    """How many tokens were drafted and how many of them the model kept."""

    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class PromptLookup:
    """Drafts from the text itself: after the latest earlier occurrence of its last n tokens
    (n from `max_ngram` down to 1), the tokens that followed there."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ids: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return ids[start + n : start + n + k]
        return []


class DraftModel:
    """Drafts with a smaller model of the same tokenizer, greedily. It keeps a KV cache of the text it
    has read and, at each proposal, keeps the part of it that the text still starts with."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = None
        self.cached: list[int] = []  # the tokens whose keys and values `cache` holds

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int) -> list[int]:
        model = self.model
        if k < 1 or len(ids) + k > model.block_size:
            return []  # (the draft model's context is full: the model decodes alone)
        if self.cache is None or self.cache.capacity < len(ids) + k:
            self.cache, self.cached = (
                model.new_cache(1, capacity=min(model.block_size, 2 * (len(ids) + k))),
                [],
            )
        keep = 0
        while keep < min(len(self.cached), len(ids) - 1) and self.cached[keep] == ids[keep]:
            keep += 1
        self.cache.truncate(keep)
        device = next(model.parameters()).device
        new = torch.tensor([ids[keep:]], device=device)
        positions = torch.arange(keep, len(ids), device=device)[None]
        logits, _ = model(
            new,
            cache=self.cache,
            positions=positions,
            attention_mask=torch.ones_like(new, dtype=torch.bool),
            last_only=True,
        )
        proposal = [int(logits[0, -1].argmax())]
        while len(proposal) < k:
            token = torch.tensor([proposal[-1]], device=device)
            position = torch.tensor([len(ids) + len(proposal) - 1], device=device)
            proposal.append(int(step_logits(model, token, position, self.cache)[0].argmax()))
        self.cached = ids + proposal[:-1]
        return proposal


Drafter = PromptLookup | DraftModel


def drafter_for(cfg: GenerationConfig, draft: nn.Module | None) -> Drafter | None:
    """The drafter a generation asks for: a draft model when one is given, prompt lookup when
    `prompt_lookup_num_tokens` is set, else none (plain decoding)."""
    if draft is not None:
        return DraftModel(draft)
    return PromptLookup() if cfg.prompt_lookup_num_tokens else None


def first_draft_size(cfg: GenerationConfig, drafter: Drafter) -> tuple[int, int]:
    """(tokens drafted at first, most tokens drafted at once)."""
    if isinstance(drafter, DraftModel):
        return cfg.num_assistant_tokens, max(cfg.num_assistant_tokens, 2 * cfg.num_assistant_tokens)
    return cfg.prompt_lookup_num_tokens, cfg.prompt_lookup_num_tokens


@dataclass
class DraftSchedule:
    """How many tokens to draft at each step. Two more after a draft wholly kept, one fewer after a
    refusal (transformers' schedule), at least one; a one-token draft refused outright pauses drafting
    for a few steps (1, 2, 4 … 16, reset by the next kept token), so text the drafts cannot guess
    (a reply that repeats nothing) decodes at nearly plain decoding's speed."""

    size: int
    most: int
    pause: int = 0  # steps left without a draft
    backoff: int = 1  # how long the next pause lasts

    def next(self, room: int) -> int:
        """Tokens to draft now (`room`: the most that can still be used)."""
        if self.pause:
            self.pause -= 1
            return 0
        return max(0, min(self.size, room))

    def update(self, drafted: int, kept: int) -> None:
        if not drafted:
            return
        if kept:
            self.backoff = 1
        if kept == drafted:
            self.size = min(self.most, self.size + 2)
        elif kept == 0 and self.size == 1:
            self.pause, self.backoff = self.backoff, min(16, 2 * self.backoff)
        else:
            self.size = max(1, self.size - 1)


def check_draft(model: nn.Module, cache, token: int, position: int, draft: list[int]) -> torch.Tensor:
    """Append `token` (at `position`) and the drafted tokens after it to `cache` in one step; the
    next-token logits (1 + len(draft), vocab) after each of them, in float32."""
    if not draft:
        device = cache.k.device
        return step_logits(
            model, torch.tensor([token], device=device), torch.tensor([position], device=device), cache
        ).float()
    return chain_logits(model, [token, *draft], position, cache).float()


def verify(
    scores: torch.Tensor, drafted: int | None, cfg: GenerationConfig, generator: torch.Generator | None
) -> tuple[int, bool]:
    """The token at one place of a checked draft, and whether it is the drafted one. `scores` (1, vocab):
    the model's processed logits there; `drafted`: the drafted token, None past the draft's end."""
    if drafted is None or cfg.temperature == 0:
        token = int(choose_tokens(scores, cfg, generator)[0])
        return token, token == drafted
    probs = next_token_probs(scores, cfg)[0]
    if float(torch.rand(1, generator=generator)) < float(probs[drafted]):
        return drafted, True
    probs[drafted] = 0.0  # refused: the rest of the distribution, renormalised by `sample`
    return int(sample(probs[None], generator)[0]), False


@torch.inference_mode()
def speculative_steps(
    model: nn.Module,
    prompt: list[int],
    cfg: GenerationConfig,
    drafter: Drafter,
    end_ids: tuple[int, ...] = (),
    banned: list[int] | None = None,
    stats: SpeculationStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of one sequence (a (1,) tensor, as `decode_steps` does), several per forward
    pass when drafts are kept. Stops after an end token when `stop_at_eot` (the caller stops there)."""
    stats = stats if stats is not None else SpeculationStats()
    schedule = DraftSchedule(*first_draft_size(cfg, drafter))
    most = schedule.most
    device = next(model.parameters()).device
    cache = model.new_cache(1, capacity=len(prompt) + cfg.max_new_tokens + most + 1)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    ids = list(prompt)
    counts = None
    if len(ids) > 1:  # the prompt but its last token, which the first check reads with the first draft
        model(torch.tensor([ids[:-1]], device=device), cache=cache, last_only=True)
    made = 0
    while made < cfg.max_new_tokens:
        size = schedule.next(cfg.max_new_tokens - made - 1)
        draft = drafter.propose(ids, size) if size else []
        stats.drafted += len(draft)
        before = cache.length
        block = check_draft(model, cache, ids[-1], len(ids) - 1, draft)
        kept = 0
        for place in range(len(block)):
            scores = block[place : place + 1]
            if cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty:
                counts = counts if counts is not None else torch.zeros_like(scores)
                context = torch.tensor([ids], device=device)
                scores = apply_penalties(
                    scores, context, torch.ones_like(context, dtype=torch.bool), counts, cfg
                )
            if cfg.no_repeat_ngram_size:
                generated = torch.tensor([ids[len(prompt) :]], dtype=torch.long, device=device)
                scores = ban_repeated_ngrams(scores, generated, cfg.no_repeat_ngram_size)
            if banned:
                scores[:, banned] = float("-inf")
            token, same = verify(scores, draft[place] if place < len(draft) else None, cfg, generator)
            stats.accepted += same
            ids.append(token)
            made += 1
            if counts is not None:
                counts[0, token] += 1
            yield torch.tensor([token], device=device)
            if (cfg.stop_at_eot and token in end_ids) or made >= cfg.max_new_tokens:
                return
            if not same:
                break
            kept += 1
        cache.truncate(before + 1 + kept)  # the chosen token and the kept drafts; the last token waits
        schedule.update(len(draft), kept)


def speculative_ids(
    model: nn.Module, prompt: list[int], cfg: GenerationConfig, drafter: Drafter, end_ids: tuple[int, ...],
    banned: list[int], stats: SpeculationStats | None = None,
) -> list[int]:  # fmt: skip
    """The new token ids of one prompt (ending before the end-of-text token)."""
    out = []
    for token in speculative_steps(model, prompt, cfg, drafter, end_ids, banned, stats):
        t = int(token[0])
        if cfg.stop_at_eot and t in end_ids:
            break
        out.append(t)
    return out


def can_speculate(
    model: nn.Module, prompt: list[int], cfg: GenerationConfig, drafter: Drafter | None
) -> bool:
    """Whether this generation can decode speculatively: a drafter, a KV-cache model, sampling without
    beams, and room for the prompt, the new tokens and a draft within the context (beyond it, plain
    decoding slides or re-encodes its window)."""
    if (
        drafter is None
        or cfg.num_beams > 1
        or not hasattr(model, "new_cache")
        or not hasattr(model, "blocks")
    ):
        return False
    _, most = first_draft_size(cfg, drafter)
    return len(prompt) + cfg.max_new_tokens + most + 1 <= model.block_size
