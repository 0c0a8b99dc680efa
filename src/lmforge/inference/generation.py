"""Text generation: samplers, KV cache, beam search, stop strings and streaming.

    generate(model, tokenizer, prompts, config)   -> list of continuations (one per prompt)
    stream(model, tokenizer, prompt, config)      -> iterator of text pieces as they settle
    pipeline("text-generation", model=DIR)        -> Hugging Face-style callable

How it works: the prompts are tokenized and left-padded into one batch; the
model fills its KV cache with the whole prompt in one forward pass ("prefill"),
then produces one token per step, each step feeding only the new token. Each
step's logits go through the penalties, temperature and top-k / top-p / min-p
filters, then greedy choice or sampling from a seeded generator.

When the text outgrows the context: a RoPE model keeps a sliding window of the
most recent `block_size` tokens in its cache (attention only sees relative
positions); a model with learned or sinusoidal positions re-encodes the last
`block_size` tokens at every step. Prompts longer than the context keep their
most recent tokens (with a warning), or are refused with `strict=True`.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge.inference.speculative as speculative
from lmforge.errors import UserError
from lmforge.generation_config import GenerationConfig, generation_settings  # noqa: F401  (re-exported)
from lmforge.inference.compiled import can_compile, decode_one, static_capacity
from lmforge.inference.native.decoding import step_logits
from lmforge.inference.sampling import (  # noqa: F401  (re-exported)
    apply_penalties,
    ban_repeated_ngrams,
    choose_tokens,
    filter_logits,
    next_token_probs,
    sample,
)
from lmforge.tokenizers import TextTokenizer

# ---- prompts ----------------------------------------------------------------------------


def start_ids(tokenizer: TextTokenizer) -> list[int]:
    """What an empty prompt starts from: the end-of-text token (which begins every document).
    A character tokenizer of one document never saw it, so a newline is used there."""
    if tokenizer.kind == "char":
        newline = tokenizer.encode("\n")
        if newline and newline[0] != tokenizer.hf.token_to_id("<unk>"):
            return newline
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    return tokenizer.encode("\n") or [0]


def encode_prompt(
    tokenizer: TextTokenizer,
    prompt: str,
    block_size: int,
    strict: bool,
    warn: Callable[[str], None] | None = None,
) -> list[int]:
    ids = tokenizer.encode(prompt) if prompt else start_ids(tokenizer)
    if len(ids) > block_size:
        if strict:
            raise UserError(
                f"The prompt has {len(ids)} tokens but the model's context is {block_size}; "
                f"shorten it, or turn strict off to keep its last {block_size} tokens.",
                settings=("strict",),
            )
        message = (
            f"The prompt has {len(ids)} tokens, more than the context ({block_size}); "
            f"only its last {block_size} tokens are used."
        )
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
        ids = ids[-block_size:]
    return ids


def banned_ids(tokenizer: TextTokenizer) -> list[int]:
    """Tokens never generated: `<unk>` stands for characters the tokenizer did not know."""
    unk = tokenizer.hf.token_to_id("<unk>")
    return [unk] if unk is not None else []


# ---- text state: stop strings and streaming ---------------------------------------------------


class TextTracker:
    """Decodes one sequence's new tokens, finds stop strings and says which text has settled.

    Text has settled when later tokens cannot change it: it is not part of a possible
    stop string still being written, and it does not end in an incomplete UTF-8 character
    (which decodes as U+FFFD until its last byte arrives).
    """

    def __init__(self, tokenizer: TextTokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self.emitted = 0

    def add(self, token: int) -> None:
        if self.stopped:
            return
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            cuts = [self.text.find(s) for s in self.stop if s in self.text]
            if cuts:
                self.text = self.text[: min(cuts)]

    def settled(self, final: bool = False) -> str:
        text = self.text
        if not final and not self.stopped:
            hold = 0
            for s in self.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            while hold < len(text) and text[len(text) - hold - 1 : len(text) - hold] == "\ufffd":
                hold += 1
            text = text[: len(text) - hold]
        return text

    def take_new(self, final: bool = False) -> str:
        """The settled text not yet handed out."""
        settled = self.settled(final)
        piece = settled[self.emitted :] if len(settled) >= self.emitted else ""
        self.emitted = max(self.emitted, len(settled))
        return piece


# ---- the decoding loop ------------------------------------------------------------------


def _model_info(model: nn.Module) -> tuple[torch.device, int, str]:
    device = next(model.parameters()).device
    pos = getattr(getattr(model, "config", None), "pos_encoding", "learned")
    return device, model.block_size, pos


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, width) with each prompt at the right end, and which slots hold real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[row, width - len(p) :] = True
    return ids.to(device), valid.to(device)


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """Each slot's position within its own row's text (left padding does not count)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def decode_steps(
    model: nn.Module,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    end_ids: tuple[int, ...] = (),
    use_cache: bool = True,
    banned: list[int] | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    constrain: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step after step (rows that ended keep yielding
    the first of `end_ids`; the caller decides when to stop). `use_cache=False` recomputes the whole
    window every step: the reference that the cache is tested against. `observe(logits,
    token)` sees the model's raw next-token logits and the choice (for log-probabilities).
    `constrain(logits)` masks the tokens a grammar forbids (see `structured.mask_logits`); the
    caller advances the grammar with each yielded token before asking for the next."""
    device, block_size, pos = _model_info(model)
    ids, valid = left_pad(prompts, device)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    ends = torch.tensor(end_ids, dtype=torch.long, device=device)
    sliding = pos == "rope"
    # Room for the prompt and the new tokens only: a 32k-context model needs no 32k cache here.
    capacity = min(block_size, ids.shape[1] + cfg.max_new_tokens + 1)
    # The compiled step pays at batch 1 only (measured on SmolLM2: 1.8x eager at batch 1, 0.46x at 8).
    compiled = (
        use_cache and len(prompts) == 1 and getattr(model, "compile_decoding", False) and can_compile(model)
    )
    if compiled:  # a static capacity (rounded up), or the eager path when the run outgrows the context
        static = static_capacity(model, ids.shape[1] + cfg.max_new_tokens + 1)
        compiled, capacity = static is not None, static or capacity
    cache = model.new_cache(len(prompts), capacity=capacity) if use_cache else None
    logits, _ = (
        model(ids, cache=cache, positions=positions_of(valid), attention_mask=valid, last_only=True)
        if use_cache
        else model(ids, positions=positions_of(valid), attention_mask=valid, last_only=True)
    )
    next_logits = logits[:, -1].float()
    counts = torch.zeros_like(next_logits)  # how often each token was generated, per row
    prompt_length = ids.shape[1]
    for _ in range(cfg.max_new_tokens):
        vocab_logits = apply_penalties(next_logits, ids, valid, counts, cfg)
        if cfg.no_repeat_ngram_size:
            vocab_logits = ban_repeated_ngrams(vocab_logits, ids[:, prompt_length:], cfg.no_repeat_ngram_size)
        if banned:
            vocab_logits[:, banned] = float("-inf")
        if constrain is not None:
            vocab_logits = constrain(vocab_logits)
        token = choose_tokens(vocab_logits, cfg, generator)
        if end_ids:
            token = torch.where(finished, torch.full_like(token, end_ids[0]), token)
            if cfg.stop_at_eot:
                finished |= torch.isin(token, ends)
        counts.scatter_add_(1, token[:, None], torch.ones_like(token[:, None], dtype=counts.dtype))
        if observe is not None:
            observe(next_logits, token)
        yield token
        ids = torch.cat([ids, token[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones_like(token[:, None], dtype=torch.bool)], dim=1)
        positions = positions_of(valid)
        if compiled and getattr(model, "compile_decoding", False):
            logits = decode_one(model, token, positions[:, -1], cache)[:, None]
        elif use_cache and (sliding or ids.shape[1] <= block_size):
            logits = step_logits(model, token, positions[:, -1], cache)[:, None]
        else:
            # Recompute over the last block_size tokens (learned/sinusoidal positions beyond
            # the context re-encode the window; positions restart at 0 like in training).
            window, window_valid = ids[:, -block_size:], valid[:, -block_size:]
            logits, _ = model(
                window,
                positions=positions_of(window_valid) if not sliding else positions[:, -block_size:],
                attention_mask=window_valid,
                last_only=True,
            )
        next_logits = logits[:, -1].float()


def generate_ids(
    model: nn.Module, tokenizer: TextTokenizer, prompts: list[list[int]], cfg: GenerationConfig
) -> list[list[int]]:
    """New token ids for each prompt (ending before the end-of-text token)."""
    ends = tokenizer.end_ids
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for token in decode_steps(model, prompts, cfg, ends, banned=banned_ids(tokenizer)):
        for row, t in enumerate(token.tolist()):
            if done[row]:
                continue
            if cfg.stop_at_eot and t in ends:
                done[row] = True
            else:
                out[row].append(t)
        if all(done):
            break
    return out


def _check_prompts(prompts: str | list[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not prompts:
        raise UserError("Give at least one prompt.")
    return list(prompts)


def generate(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompts: str | list[str],
    config: GenerationConfig | None = None,
    warn: Callable[[str], None] | None = None,
    draft: nn.Module | None = None,
    stats: Any = None,
) -> list[str]:
    """The generated continuation of each prompt (prompts of any lengths, batched). Speculative
    decoding (speculative.py) with `draft` (a draft model) or `cfg.prompt_lookup_num_tokens`, one
    prompt at a time; `stats` (a `SpeculationStats`) counts its drafted and kept tokens."""
    cfg = config or GenerationConfig()
    texts = _check_prompts(prompts)
    encoded = [encode_prompt(tokenizer, p, model.block_size, cfg.strict, warn) for p in texts]
    drafter = speculative.drafter_for(cfg, draft)
    if all(speculative.can_speculate(model, ids, cfg, drafter) for ids in encoded):
        ends, banned = tokenizer.end_ids, banned_ids(tokenizer)
        generated = [
            speculative.speculative_ids(model, ids, cfg, drafter, ends, banned, stats) for ids in encoded
        ]
    else:
        generated = (beam_search_ids if cfg.num_beams > 1 else generate_ids)(model, tokenizer, encoded, cfg)
    results = []
    for new_ids in generated:
        tracker = TextTracker(tokenizer, cfg.stop)
        for t in new_ids:
            tracker.add(t)
            if tracker.stopped:
                break
        results.append(tracker.settled(final=True))
    return results


def stream(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompt: str,
    config: GenerationConfig | None = None,
    warn: Callable[[str], None] | None = None,
    draft: nn.Module | None = None,
    stats: Any = None,
) -> Iterator[str]:
    """Yield pieces of the continuation as they settle; their concatenation equals `generate`'s text."""
    cfg = config or GenerationConfig()
    ids = encode_prompt(tokenizer, prompt, model.block_size, cfg.strict, warn)
    if cfg.num_beams > 1:
        yield from beam_search(model, tokenizer, ids, cfg)
        return
    tracker = TextTracker(tokenizer, cfg.stop)
    ends, banned = tokenizer.end_ids, banned_ids(tokenizer)
    drafter = speculative.drafter_for(cfg, draft)
    steps = (
        speculative.speculative_steps(model, ids, cfg, drafter, ends, banned, stats)
        if speculative.can_speculate(model, ids, cfg, drafter)
        else decode_steps(model, [ids], cfg, ends, banned=banned)
    )
    for token in steps:
        t = int(token[0])
        if cfg.stop_at_eot and t in ends:
            break
        tracker.add(t)
        piece = tracker.take_new()
        if piece:
            yield piece
        if tracker.stopped:
            break
    rest = tracker.take_new(final=True)
    if rest:
        yield rest


# ---- beam search -----------------------------------------------------------------------

# Hypotheses one batch of beam search advances together (prompts × beams): several prompts share
# each step's matrix products instead of one prompt's few rows paying a whole step each.
BEAM_ROWS = 64


@dataclass
class BeamState:
    """One prompt's beam search: its live hypotheses (`num_beams` of them, dead copies scored -inf
    when fewer can go on), the finished ones with their length-penalised scores, and whether it is
    over (no live hypothesis can do better than what is finished)."""

    sequences: list[list[int]]
    scores: list[float]
    finished: list[tuple[float, list[int]]] = field(default_factory=list)
    over: bool = False

    def advance(self, top: list[tuple[float, int]], vocab: int, ends: tuple[int, ...], cfg: GenerationConfig):
        """Extend by the best candidates `top` ((score, beam * vocab + token), best first): those
        ending with an end-of-text token are finished, the first `num_beams` others live on. The
        live beams each new one extends, or None when the search is over."""
        beams, sequences, scores, rows = cfg.num_beams, [], [], []
        for score, index in top:
            row, token = divmod(index, vocab)
            if score == float("-inf"):
                continue
            if token in ends:
                self.finished.append((score / (len(self.sequences[row]) + 1) ** cfg.length_penalty,
                                      self.sequences[row]))  # fmt: skip
                continue
            sequences.append(self.sequences[row] + [token])
            scores.append(score)
            rows.append(row)
            if len(sequences) == beams:
                break
        if (
            not sequences
            or (cfg.early_stopping and len(self.finished) >= beams)
            or (not cfg.early_stopping and self._hopeless(sequences, scores, cfg))
        ):
            self.over = True
            return None
        while len(sequences) < beams:  # fewer live candidates than beams: pad with dead copies
            sequences.append(list(sequences[0]))
            scores.append(float("-inf"))
            rows.append(rows[0])
        self.sequences, self.scores = sequences, scores
        return rows

    def _hopeless(self, sequences: list[list[int]], scores: list[float], cfg: GenerationConfig) -> bool:
        """Without early stopping the search goes on until no live beam can beat the best finished
        one: judged as Hugging Face does, by the best live score at its current length (exact for
        length_penalty <= 0, where scores only fall as tokens are added; a heuristic above)."""
        if not self.finished or cfg.length_penalty > 1:
            return False
        return max(scores) / len(sequences[0]) ** cfg.length_penalty < max(s for s, _ in self.finished)

    def live(self) -> list[list[int]]:
        return [s for s, score in zip(self.sequences, self.scores, strict=True) if score > float("-inf")]

    def best(self, length_penalty: float) -> list[int]:
        """The best finished hypothesis; live ones count too when the search ran out of tokens
        before it was over (or nothing finished)."""
        candidates = list(self.finished)
        if not self.over or not candidates:
            candidates += [(score / max(1, len(seq)) ** length_penalty, seq)
                           for seq, score in zip(self.sequences, self.scores, strict=True) if score > float("-inf")]  # fmt: skip
        return max(candidates, key=lambda item: item[0])[1] if candidates else []


@torch.inference_mode()
def beam_steps(
    model: nn.Module, prompts: list[list[int]], cfg: GenerationConfig, ends: tuple[int, ...]
) -> Iterator[list[BeamState]]:
    """Beam search for every prompt at once, yielding their states (one list, updated in place) at
    the start and after each step; once the iterator ends, each state's `best()` is final.

    The prompts are left-padded into one batch and every prompt keeps `num_beams` rows of one KV
    cache; a prompt whose search is over leaves the batch (its rows are dropped from the cache).
    """
    device, block_size, pos = _model_info(model)
    beams = cfg.num_beams
    if max(len(p) for p in prompts) + cfg.max_new_tokens > block_size and pos != "rope":
        raise UserError(
            f"Beam search needs prompt + max_new_tokens within the context ({block_size}) "
            f"for this model; lower max_new_tokens."
        )
    ids, valid = left_pad(prompts, device)
    cache = model.new_cache(len(prompts), capacity=min(block_size, ids.shape[1] + cfg.max_new_tokens + 1))
    logits, _ = model(ids, cache=cache, positions=positions_of(valid), attention_mask=valid, last_only=True)
    states = [BeamState([[] for _ in range(beams)], [0.0] + [float("-inf")] * (beams - 1)) for _ in prompts]
    searching = list(range(len(prompts)))  # prompts still searching, `beams` cache rows each, in order
    cache.reorder(torch.arange(len(prompts), device=device).repeat_interleave(beams))
    logprobs = F.log_softmax(logits[:, -1].float(), -1).repeat_interleave(beams, 0)  # (rows, vocab)
    yield states
    for step in range(cfg.max_new_tokens):
        vocab = logprobs.shape[-1]
        if cfg.no_repeat_ngram_size and step:
            so_far = torch.tensor([seq for b in searching for seq in states[b].sequences], device=device)
            logprobs = ban_repeated_ngrams(logprobs, so_far, cfg.no_repeat_ngram_size)
        scores = torch.tensor([states[b].scores for b in searching], device=device)  # (prompts, beams)
        candidates = (scores[:, :, None] + logprobs.view(len(searching), beams, vocab)).view(
            len(searching), -1
        )
        top_scores, top_index = candidates.topk(2 * beams, dim=-1)  # enough to find `beams` that go on
        rows, still = [], []
        for i, (b, values, indices) in enumerate(
            zip(searching, top_scores.tolist(), top_index.tolist(), strict=True)
        ):
            extended = states[b].advance(list(zip(values, indices, strict=True)), vocab, ends, cfg)
            if extended is not None:
                rows += [i * beams + row for row in extended]
                still.append(b)
        yield states
        searching = still
        if not searching or step == cfg.max_new_tokens - 1:
            break
        cache.reorder(torch.tensor(rows, device=device))
        tokens = torch.tensor([seq[-1] for b in searching for seq in states[b].sequences], device=device)
        positions = torch.tensor(
            [len(prompts[b]) + step for b in searching for _ in range(beams)], device=device
        )
        logprobs = F.log_softmax(step_logits(model, tokens, positions, cache).float(), -1)


def beam_search_ids(
    model: nn.Module, tokenizer: TextTokenizer, prompts: list[list[int]], cfg: GenerationConfig
) -> list[list[int]]:
    """The best hypothesis of each prompt (scored by log-probability / length ** length_penalty),
    `BEAM_ROWS` hypotheses a batch."""
    ends = tokenizer.end_ids if cfg.stop_at_eot else ()
    per_batch = max(1, BEAM_ROWS // cfg.num_beams)
    results: list[list[int]] = []
    for begin in range(0, len(prompts), per_batch):
        states = deque(beam_steps(model, prompts[begin : begin + per_batch], cfg, ends), maxlen=1)[0]
        results += [state.best(cfg.length_penalty) for state in states]
    return results


def beam_search(
    model: nn.Module, tokenizer: TextTokenizer, prompt_ids: list[int], cfg: GenerationConfig
) -> Iterator[str]:
    """Beam search for one prompt, yielding the best hypothesis's text as it settles: a prefix is
    settled once every live beam and every finished hypothesis shares it (the winner is one of
    them or extends one of them, so no later step can change it)."""
    ends = tokenizer.end_ids if cfg.stop_at_eot else ()
    streamed = ""
    for (state,) in beam_steps(model, [prompt_ids], cfg, ends):
        contenders = state.live() + [seq for _, seq in state.finished]
        text = tokenizer.decode(_common_prefix(contenders)).rstrip("\ufffd")
        if len(text) > len(streamed) and text.startswith(streamed) and not cfg.stop:
            yield text[len(streamed) :]
            streamed = text
    tracker = TextTracker(tokenizer, cfg.stop)
    for t in state.best(cfg.length_penalty):
        tracker.add(t)
    final = tracker.settled(final=True)
    if final.startswith(streamed):
        if final[len(streamed) :]:
            yield final[len(streamed) :]
    else:  # cannot happen without stop strings (the best beam extends the common prefix)
        yield final


def _common_prefix(sequences: list[list[int]]) -> list[int]:
    if not sequences:
        return []
    prefix = sequences[0]
    for s in sequences[1:]:
        n = 0
        while n < min(len(prefix), len(s)) and prefix[n] == s[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def sequence_logprob(model: nn.Module, prompt_ids: list[int], new_ids: list[int]) -> float:
    """Sum of log-probabilities of `new_ids` after the prompt (for comparing decoders)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + new_ids], device=device)
    with torch.inference_mode():
        logits, _ = model(ids[:, :-1])
    logprobs = F.log_softmax(logits[0].float(), -1)
    start = len(prompt_ids) - 1
    return float(sum(logprobs[start + i, t] for i, t in enumerate(new_ids)))


# ---- convenience ----------------------------------------------------------------------------


def sample_text(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    seed: int | None = None,
) -> str:
    """The prompt followed by sampled text (used for training's closing sample)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return prompt + generate(model, tokenizer, prompt, cfg)[0]


def sample_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    generator_seed: int | None = None,
) -> list[int]:
    """Token ids after `prompt_ids` (temperature 0 = greedy), no end-of-text handling."""
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=generator_seed,
        stop_at_eot=False,
    )
    return [int(t[0]) for t in decode_steps(model, [prompt_ids], cfg)]


class TextGenerationPipeline:
    """`pipeline("text-generation", model=DIR)(prompt, max_new_tokens=50)` → [{"generated_text": ...}].

    As transformers' pipeline: a conversation (a list of {"role", "content"} messages, or a list of
    them) is formatted with the checkpoint's chat template and answered, and `generated_text` is
    the conversation with the reply appended; `do_sample=False` decodes greedily; `assistant_model=`
    (a draft model) and `prompt_lookup_num_tokens=` decode speculatively."""

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, chat_template: str | None = None):
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template

    def __call__(
        self,
        prompts: str | list[str] | list[dict] | list[list[dict]],
        return_full_text: bool = True,
        num_return_sequences: int = 1,
        **settings,
    ) -> list[dict] | list[list[dict]]:
        do_sample = settings.pop("do_sample", None)  # (transformers' switch: False = greedy)
        draft = settings.pop("assistant_model", None)  # (transformers' name of a draft model)
        unknown = set(settings) - set(GenerationConfig.__dataclass_fields__)
        if unknown:
            raise UserError(f"Unknown generation setting(s): {', '.join(sorted(unknown))}.")
        if do_sample is False:
            settings["temperature"] = 0.0
        cfg = GenerationConfig(**settings)
        conversations = _conversations(prompts)
        if conversations is not None:
            return self._chat(conversations, cfg, num_return_sequences, isinstance(prompts[0], dict), draft)
        single = isinstance(prompts, str)
        texts = _check_prompts(prompts)
        results = []
        for prompt in texts:
            outs = []
            for i in range(num_return_sequences):
                run_cfg = replace(cfg, seed=None if cfg.seed is None else cfg.seed + i)
                text = generate(self.model, self.tokenizer, prompt, run_cfg, draft=draft)[0]
                outs.append({"generated_text": prompt + text if return_full_text else text})
            results.append(outs)
        return results[0] if single else results

    def _chat(
        self,
        conversations: list[list[dict]],
        cfg: GenerationConfig,
        count: int,
        single: bool,
        draft: Any = None,
    ) -> list:
        from lmforge.data.instructions import DEFAULT_CHAT_TEMPLATE, chat_stop_strings, render_chat

        template = self.chat_template or DEFAULT_CHAT_TEMPLATE
        cfg = replace(cfg, stop=(*cfg.stop, *chat_stop_strings(template)))
        results = []
        for messages in conversations:
            prompt = render_chat(template, messages, add_generation_prompt=True)
            outs = []
            for i in range(count):
                run_cfg = replace(cfg, seed=None if cfg.seed is None else cfg.seed + i)
                reply = generate(self.model, self.tokenizer, prompt, run_cfg, draft=draft)[0].strip()
                outs.append({"generated_text": [*messages, {"role": "assistant", "content": reply}]})
            results.append(outs)
        return results[0] if single else results


def _conversations(prompts: Any) -> list[list[dict]] | None:
    """The conversations in `prompts` (one: a list of messages; several: a list of such lists), or None
    for text prompts; messages that are not {"role": ..., "content": text} are one clear error."""
    if not isinstance(prompts, list) or not prompts or isinstance(prompts[0], str):
        return None
    conversations = [prompts] if isinstance(prompts[0], dict) else prompts
    for messages in conversations:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise UserError('A conversation is a list of messages such as {"role": "user", "content": "Hi"}.')
    return conversations


def text_generation_pipeline(task: str, model: nn.Module, tokenizer: TextTokenizer,
                             chat_template: str | None = None) -> TextGenerationPipeline:  # fmt: skip
    """The "text-generation" pipeline of a language model (named by its family, lmforge/families)."""
    return TextGenerationPipeline(model, tokenizer, chat_template)


def pipeline(task: str, model: str, device: str = "cpu", dtype: str = "float32", quantize: str | None = None):
    """Moved to `lmforge.pipelines.pipeline` (also `lmforge.pipeline`); this name keeps working for now."""
    import importlib

    warnings.warn(
        "lmforge.inference.generation.pipeline moved to lmforge.pipelines.pipeline.",
        DeprecationWarning,
        stacklevel=2,
    )
    return importlib.import_module("lmforge.pipelines").pipeline(task, model, device, dtype, quantize)
