"""Speculative decoding: guess several tokens cheaply, check them all in one forward pass.

Two ways to guess ("draft"):

    PromptLookup(n)    the tokens that followed the latest earlier occurrence of the text's last
                       2..n tokens (prompt-lookup / n-gram drafts: pays when the reply repeats the
                       prompt, as summaries, edits, code and extraction do)
    DraftModel(model)  a smaller checkpoint with the same tokenizer proposes tokens greedily

The model reads the token it just chose and the k drafted ones in one multi-row step (the weights
are read once for all of them) and gives the next-token logits at each of those k + 1 places. Drafted
token i is kept when it is the token the model chooses there: greedy decoding then gives exactly
plain decoding's tokens. Sampling keeps a drafted token d with the probability p(d) that the model
gives it and, when it refuses d, draws from p without d: the standard rejection rule for a draft that
is certain of its guess, so the tokens are distributed exactly as by plain sampling. The first
refused place still yields a token (the model's own choice there), so every step makes at least one.
How many tokens to draft follows what a check costs on this CPU (timed once) and how often this
text's drafts are kept (`DraftSchedule`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.generation_config import GenerationConfig
from lmforge.inference.native.decoding import chain_logits, step_logits
from lmforge.inference.sampling import (
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
    (n from `max_ngram` down to `min_ngram`; one-token matches guess too often wrong), the tokens
    that followed there."""

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
        if keep == 0 or len(ids) - keep > 64:  # a prompt: one forward pass
            new = torch.tensor([ids[keep:]], device=device)
            positions = torch.arange(keep, len(ids), device=device)[None]
            mask = torch.ones_like(new, dtype=torch.bool)
            last = model(new, cache=self.cache, positions=positions, attention_mask=mask, last_only=True)[0][
                0, -1
            ]
        else:  # the few tokens since the last proposal: the native chain step where there is one
            last = chain_logits(model, ids[keep:], keep, self.cache)[-1]
        proposal = [int(last.argmax())]
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


def most_drafted(cfg: GenerationConfig, drafter: Drafter) -> int:
    """The most tokens drafted at once."""
    if isinstance(drafter, DraftModel):
        return max(cfg.num_assistant_tokens, 2 * cfg.num_assistant_tokens)
    return cfg.prompt_lookup_num_tokens


TIMED_DRAFTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # draft lengths whose check is timed


def _seconds_per_check(model: nn.Module, drafted: int) -> float:
    """Median seconds of checking `drafted` tokens (0: one plain step) after 64 cached tokens."""
    context = min(64, model.block_size - drafted - 2)
    cache = model.new_cache(1, capacity=context + drafted + 2)
    with torch.inference_mode():
        model(torch.zeros(1, context, dtype=torch.long, device=cache.k.device), cache=cache)
        samples = []
        for _ in range(6):
            start = time.perf_counter()
            check_draft(model, cache, 0, context, [0] * drafted)
            samples.append(time.perf_counter() - start)
            cache.truncate(context)
    return sorted(samples[1:])[2]


def check_costs(model: nn.Module, most: int) -> list[float]:
    """What checking a draft of k tokens costs in one-token steps, k = 0 … `most` (costs[0] = 1): timed
    once per machine and model shape (kept in the kernel-timings cache, timing_cache.py), straight lines
    between the timed lengths. Off the CPU a check is taken to cost about one step."""
    from lmforge.inference.timing_cache import remembered

    if model.wte.weight.device.type != "cpu" or not hasattr(model, "blocks"):
        return [1.0 + 0.02 * k for k in range(most + 1)]
    cfg = model.config
    kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "in_features")})
    native = getattr(model, "native_decoder", None) is not None
    shape = (
        f"{cfg.n_layer}x{cfg.n_embd}x{cfg.n_head}x{cfg.vocab_size} {model.wte.weight.dtype} {'+'.join(kinds)}"
    )
    shape += " native" if native else ""

    def timed(k: int) -> float:
        return remembered(f"draft-check {shape} k={k}", lambda: _seconds_per_check(model, k))

    step = timed(0)
    points = [(0, 1.0)]
    for k in TIMED_DRAFTS:  # up to the first timed length at or past `most`
        if k > model.block_size - 3 or points[-1][0] >= most:
            break
        points.append((k, timed(k) / step))
    costs = []
    for k in range(most + 1):
        below = max((p for p in points if p[0] <= k), key=lambda p: p[0])
        above = min((p for p in points if p[0] >= k), key=lambda p: p[0], default=below)
        share = 0.0 if above[0] == below[0] else (k - below[0]) / (above[0] - below[0])
        costs.append(below[1] + share * (above[1] - below[1]))
    return costs


def draft_costs(model: nn.Module, drafter: Drafter, most: int) -> list[float]:
    """What drafting k tokens and checking them costs in the model's one-token steps: the check, plus a
    draft model's own k steps."""
    costs = check_costs(model, most)
    if isinstance(drafter, DraftModel):
        from lmforge.inference.timing_cache import remembered

        cfg, mine = drafter.model.config, model.config
        ratio = remembered(
            f"draft-step {cfg.n_layer}x{cfg.n_embd}x{cfg.vocab_size} for {mine.n_layer}x{mine.n_embd}",
            lambda: _seconds_per_check(drafter.model, 0) / _seconds_per_check(model, 0),
        )
        costs = [c + k * ratio for k, c in enumerate(costs)]
    return costs


@dataclass
class DraftSchedule:
    """How many tokens to draft at each step, from what drafting costs here and how often drafts are
    kept. Drafted tokens are taken to be kept one after another with probability a, estimated from this
    text's drafts so far (recent ones weigh more): a draft of k tokens then yields (1 - a^(k+1)) / (1 - a)
    tokens for `costs[k]` steps, and the k that yields the most per step is drafted, none when plain
    decoding yields more (a one-token draft every 16 steps then checks whether that has changed)."""

    most: int
    costs: list[float]  # costs[k]: drafting and checking k tokens, in one-token steps
    kept: float = 0.0  # drafted tokens kept, and drafts refused part-way (weighted: recent ones count more)
    refused: float = 0.0
    idle: int = 0  # steps since the last draft

    @property
    def acceptance(self) -> float:
        return (self.kept + 1.0) / (self.kept + self.refused + 2.0)

    def yield_per_step(self, k: int) -> float:
        a = self.acceptance
        return (1 - a ** (k + 1)) / (1 - a) / self.costs[k]

    def next(self, room: int) -> int:
        """Tokens to draft now (`room`: the most that can still be used)."""
        best = max(range(min(self.most, room) + 1), key=self.yield_per_step)
        if best == 0 and room > 0:
            self.idle += 1
            if self.idle >= 16:
                self.idle, best = 0, 1
        return best

    def update(self, drafted: int, kept: int) -> None:
        if drafted:
            self.idle = 0
            self.kept = 0.9 * self.kept + kept
            self.refused = 0.9 * self.refused + (kept < drafted)


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


def read_prompt(model: nn.Module, ids: list[int], cache) -> torch.Tensor:
    """Read the whole prompt into `cache` by the forward pass, as plain decoding reads one unpadded prompt
    (the same positions and mask); the next-token logits (1, vocab) in float32. So the cache and the first
    logits are plain decoding's own, and greedy text stays plain decoding's even where two tokens nearly
    tie: a prompt's last token read by the native step instead differed in the 6th digit, and flipped
    such a tie (SmolLM2 int8 re-writing code: 'tuple' against 'list', logits 1.6e-5 apart)."""
    device = cache.k.device
    everywhere = torch.ones(1, len(ids), dtype=torch.bool, device=device)
    positions = torch.arange(len(ids), device=device)[None]
    logits, _ = model(torch.tensor([ids], device=device), cache=cache, positions=positions,
                      attention_mask=everywhere, last_only=True)  # fmt: skip
    return logits[0, -1:].float()


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
    most = most_drafted(cfg, drafter)
    schedule = DraftSchedule(most, draft_costs(model, drafter, most))
    device = next(model.parameters()).device
    cache = model.new_cache(1, capacity=len(prompt) + cfg.max_new_tokens + most + 1)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    ids = list(prompt)
    counts = None
    if cfg.max_new_tokens <= 0:
        return

    def propose(ids: list[int], room: int) -> list[int]:  # a draft as long as the schedule says pays
        size = schedule.next(room)
        draft = drafter.propose(ids, size) if size else []
        stats.drafted += len(draft)
        return draft

    block = read_prompt(model, ids, cache)
    # A first draft, from the prompt: checked against these logits, then by one step over its own tokens.
    # (The prompt's last token stands where a check's first token does: `before` is where it sits.)
    before, draft = cache.length - 1, propose(ids, cfg.max_new_tokens - 1)
    if draft:
        block = torch.cat([block, check_draft(model, cache, draft[0], len(ids), draft[1:])])
    made = 0
    while True:
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
        before, draft = cache.length, propose(ids, cfg.max_new_tokens - made - 1)
        block = check_draft(model, cache, ids[-1], len(ids) - 1, draft)


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
    most = most_drafted(cfg, drafter)
    return len(prompt) + cfg.max_new_tokens + most + 1 <= model.block_size
