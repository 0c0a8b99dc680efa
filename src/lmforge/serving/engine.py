"""The generation engine behind the server: one worker thread owns the model.

Requests become `Sequence`s in a bounded queue. The worker runs one batch at a time
and keeps it full (continuous batching): before every decode step, waiting
sequences join the running batch (up to `max_batch` rows) after one prefill pass
over their prompts, and a sequence leaves as soon as it ends (end-of-text, stop
string, its max_tokens, a complete grammar, or its client going away), without
waiting for the others. Each row keeps its own KV cache rows, positions and
sampling settings. A sequence with a seed samples from a generator of its own request's (in the shared batch),
so a seeded request gives the same text whatever else is running.

Events go back to the asyncio side through `loop.call_soon_threadsafe`, as small
dataclasses: `Token` (a settled piece of text), `Done` (finish reason and count) and
`Failed` (a message).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lmforge.inference.generation import (
    GenerationConfig,
    TextTracker,
    apply_penalties,
    banned_ids,
    choose_tokens,
)
from lmforge.inference.native.decoding import step_logits
from lmforge.inference.speculative import DraftSchedule, PromptLookup, check_draft, draft_costs, verify
from lmforge.inference.structured import GrammarConstraint, mask_logits
from lmforge.models.gpt import KVCache
from lmforge.serving.prefill import PrefixCache, prefill
from lmforge.tokenizers import TextTokenizer


class QueueFull(Exception):
    """More work is waiting than the server accepts."""


@dataclass(frozen=True)
class Token:
    """A settled piece of a choice's text, with the token that completed it (None: text
    released at the end) and its log-probability and top alternatives when asked for."""

    index: int
    text: str
    token_id: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class Done:
    index: int
    finish_reason: str  # "stop" or "length"
    completion_tokens: int
    drafted: int = 0  # speculative decoding: tokens drafted for this sequence, and how many were kept
    accepted: int = 0


@dataclass(frozen=True)
class Failed:
    index: int
    message: str


Event = Token | Done | Failed


@dataclass
class Sequence:
    """One choice of one request: its prompt, settings, and where its events go."""

    prompt_ids: list[int]
    config: GenerationConfig  # max_new_tokens, stop strings and sampling settings
    index: int  # the choice's index in its response
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    group: int = 0  # seeded requests: only the choices of their own request share their batch
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    grammar: str | None = None  # the text must follow this grammar (JSON output, tool calls)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None  # (for the latency metrics)

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Job:
    """A function to run on the worker thread (scoring a prompt), with its future."""

    run: Callable[[], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class _Row:
    """A sequence in the running batch: its text so far and what decides its next token."""

    seq: Sequence
    tracker: TextTracker
    constraint: GrammarConstraint | None
    history: list[int]  # prompt and generated ids (repetition penalties look at them)
    counts: torch.Tensor | None  # how often each token was generated (presence/frequency penalties)
    produced: int = 0
    done: bool = False
    schedule: DraftSchedule | None = None  # speculative decoding: how many tokens to draft next
    chosen: int | None = None  # a token already chosen by a draft's check (a refused draft's replacement)
    drafted: int = 0
    accepted: int = 0

    @property
    def length(self) -> int:
        return len(self.history)

    @property
    def remaining(self) -> int:
        return self.seq.config.max_new_tokens - self.produced


class Engine:
    """Continuous batching: sequences join the running batch at the next decode step and
    leave it when they end. Newcomers are prefilled together (one forward pass over their
    left-padded prompts into a fresh cache; beginnings seen in recent prompts are copied
    from the prefix cache, not computed: see prefill.py), then their keys and values are written into
    spare rows of the running cache, right-aligned so that every row's next token goes in
    the same slot (`KVCache.place`); only when they do not fit (no spare row, no room, or
    much shared padding to trim) is the cache rebuilt (`joined`). A finished row is
    replaced by the last row (`move_row`), so the running rows are always the first ones
    and no step computes a row that has ended. Every row has its own sampling settings,
    stop strings, grammar and length.

    A seeded request has a sampler of its own, which draws for its choices alone (in choice order),
    and its choices join the batch together; since a row's products give the same result alone or
    in a batch, its text does not depend on other traffic, and it batches like any request.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.02,
        prefix_cache_tokens: int = 4096,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.prefixes = PrefixCache(prefix_cache_tokens)  # keys and values of recent prompts
        self.pending: deque[Sequence | _Job] = deque()
        self.condition = threading.Condition()
        self.stopped = False
        self.groups = itertools.count(1)
        # batches: prefills (sequences that joined together); rebuilds: caches built anew; steps: decode steps.
        self.stats = {
            "batches": 0,
            "rebuilds": 0,
            "steps": 0,
            "sequences": 0,
            "max_batch_seen": 0,
            "cancelled": 0,
            "drafted": 0,
            "accepted": 0,
        }
        self.device = next(model.parameters()).device
        self.ends = tokenizer.end_ids
        self.banned = banned_ids(tokenizer)
        self.generators: dict[int, torch.Generator] = {}  # a seeded request's sampler, by group
        self.rows: list[_Row] = []
        self.metrics = None  # a serving.metrics.ServingMetrics, set by the server (None: not counted)
        self.cache: Any = None
        self.next_logits: torch.Tensor | None = None
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.thread.start()

    # ---- asyncio side ------------------------------------------------------------------------

    def new_group(self) -> int:
        return next(self.groups)

    def submit(self, sequences: list[Sequence]) -> None:
        with self.condition:
            if len(self.pending) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.pending)} sequences are waiting")
            self.pending.extend(sequences)
            self.condition.notify()
        if self.metrics is not None:
            self.metrics.submitted(sum(len(s.prompt_ids) for s in sequences))

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread between decode steps (the model is never used by two threads)."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop.create_future(), loop)
        with self.condition:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} sequences are waiting")
            self.pending.append(job)
            self.condition.notify()
        return await job.future

    def queued(self) -> int:
        return len(self.pending)

    def running(self) -> int:
        """Sequences in the running batch."""
        return sum(not r.done for r in list(self.rows))

    def close(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join(timeout=5)

    # ---- worker side -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            jobs, newcomers = self._take_work()
            if self.stopped:
                return
            for job in jobs:
                self._run_job(job)
            try:
                if newcomers:
                    self._admit(newcomers)
                if self.rows:
                    self._step()
            except Exception as e:  # a bug must not kill the worker: report it to the clients
                for row in self.rows:
                    if not row.done:
                        row.seq.emit(Failed(row.seq.index, f"generation failed: {type(e).__name__}: {e}"))
                for s in newcomers:
                    if not any(r.seq is s for r in self.rows):
                        s.emit(Failed(s.index, f"generation failed: {type(e).__name__}: {e}"))
                self._clear()

    def _take_work(self) -> tuple[list[_Job], list[Sequence]]:
        """Jobs waiting, and the sequences that can join the batch now (in arrival order). An idle
        engine waits for work, then briefly for companions of the first sequence."""
        with self.condition:
            while not self.pending and not self.rows and not self.stopped:
                self.condition.wait()
        if not self.rows and self.max_batch > 1 and self.batch_wait_s > 0 and not self.stopped:
            if any(isinstance(item, Sequence) for item in self.pending):
                time.sleep(self.batch_wait_s)  # let requests that arrive together meet
        jobs: list[_Job] = []
        newcomers: list[Sequence] = []
        running = [r for r in self.rows if not r.done]
        with self.condition:
            rest: deque[Sequence | _Job] = deque()
            blocked = False
            while self.pending:
                item = self.pending.popleft()
                if isinstance(item, _Job):
                    jobs.append(item)
                    continue
                # A seeded request's choices join together (its sampler draws for all of them at once).
                together = 1 + (sum(isinstance(p, Sequence) and p.group == item.group for p in self.pending)
                                if item.group and not any(n.group == item.group for n in newcomers) else 0)  # fmt: skip
                if blocked or len(running) + len(newcomers) + min(together, self.max_batch) > self.max_batch:
                    blocked = True  # first come, first served: later arrivals do not overtake
                    rest.append(item)
                    continue
                newcomers.append(item)
            self.pending = rest
        return jobs, newcomers

    @staticmethod
    def _run_job(job: _Job) -> None:
        try:
            result = job.run()
            job.loop.call_soon_threadsafe(lambda: job.future.done() or job.future.set_result(result))
        except Exception as e:  # handed to the waiting request
            error = e  # (the name `e` is cleared when the except block ends; the callback runs later)
            job.loop.call_soon_threadsafe(lambda: job.future.done() or job.future.set_exception(error))

    def _clear(self) -> None:
        self.rows, self.cache, self.next_logits = [], None, None
        self.generators.clear()

    @torch.inference_mode()
    def _admit(self, newcomers: list[Sequence]) -> None:
        """Prefill the newcomers' prompts and join their rows with the running ones."""
        self.stats["batches"] += 1
        self.stats["sequences"] += len(newcomers)
        for s in newcomers:
            if s.config.seed is not None and s.group not in self.generators:
                self.generators[s.group] = torch.Generator().manual_seed(s.config.seed)
        reuse = [s.config.seed is None for s in newcomers]  # a seeded text must not depend on what ran before
        cache, new_logits = prefill(self.model, [s.prompt_ids for s in newcomers], self.prefixes, reuse)
        new_rows = [
            _Row(
                s,
                TextTracker(self.tokenizer, list(s.config.stop)),
                GrammarConstraint(self.tokenizer, s.grammar) if s.grammar else None,
                list(s.prompt_ids),
                None,
            )
            for s in newcomers
        ]
        if not self._place(cache, new_rows, new_logits):
            self._regroup(extra=(cache, new_rows, new_logits))
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.rows))
        self.stats["prefix_tokens_reused"] = self.prefixes.reused

    def _place(self, cache: Any, new_rows: list[_Row], new_logits: torch.Tensor) -> bool:
        """Write the newcomers' keys and values into spare rows of the running cache, when they
        fit there (no copy of the running rows); False when the cache must be rebuilt."""
        buffer, n = self.cache, len(self.rows)
        if not isinstance(buffer, KVCache) or not n or n + len(new_rows) > buffer.k.shape[1]:
            return False
        if buffer.unused_prefix(n) > buffer.length // 2:
            return False  # rebuild instead: half of every row's attention would be over padding
        cached = cache.valid[:, : cache.length].sum(1).tolist()  # tokens each newcomer's row holds
        if not all(buffer.fits(t, r.remaining + 1) for t, r in zip(cached, new_rows, strict=True)):
            return False
        for j in range(len(new_rows)):
            buffer.place(n + j, cache, j)
        self.rows += new_rows
        self.next_logits = torch.cat([self.next_logits, new_logits])
        return True

    def _regroup(self, extra: tuple[Any, list[_Row], torch.Tensor] | None = None) -> None:
        """A new cache for the running rows (and `extra`'s), with spare rows for newcomers."""
        parts, rows, logits = [], list(self.rows), []
        if rows:
            index = torch.arange(len(rows), device=self.device)
            parts.append((self.cache, index))
            logits.append(self.next_logits)
        if extra is not None:
            cache, new_rows, new_logits = extra
            parts.append((cache, torch.arange(len(new_rows), device=self.device)))
            rows += new_rows
            logits.append(new_logits)
        # Room for the longest remaining sequence, and as much again for sequences that join later
        # (memory only: attention reads the slots in use, not the free ones).
        room = 2 * (max(r.remaining for r in rows) + 1)
        self.cache = type(parts[0][0]).joined(parts, room, batch=self.max_batch)
        self.stats["rebuilds"] += 1
        self.rows, self.next_logits = rows, torch.cat(logits)

    def _drop_finished(self) -> None:
        """Take the ended rows out of the batch: the last row moves into an ended row's place."""
        if not isinstance(self.cache, KVCache):  # a recurrent state holds exactly its rows
            keep = [i for i, r in enumerate(self.rows) if not r.done]
            if len(keep) < len(self.rows):
                index = torch.tensor(keep, device=self.device)
                self.cache = type(self.cache).joined([(self.cache, index)], 0)
                self.rows = [self.rows[i] for i in keep]
            return
        i = 0
        while i < len(self.rows):
            if self.rows[i].done:
                last = len(self.rows) - 1
                if i != last:
                    self.cache.move_row(last, i)
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1

    @torch.inference_mode()
    def _step(self) -> None:
        """Choose every row's next token, hand out its text, and run the model on the rows
        still going."""
        self.stats["steps"] += 1
        for row, (token, scores) in zip(self.rows, self._choose(), strict=True):
            self._advance(row, token, scores)
        self._drop_finished()
        if not self.rows:
            self._clear()
            return
        cache = self.cache.narrowed(len(self.rows)) if isinstance(self.cache, KVCache) else self.cache
        if self._speculates():
            self._speculative_step(self.rows[0], cache)
        else:
            tokens = torch.tensor([r.history[-1] for r in self.rows], device=self.device)
            positions = torch.tensor([r.length - 1 for r in self.rows], device=self.device)
            self.next_logits = step_logits(self.model, tokens, positions, cache).float()
        if cache is not self.cache:  # a view of the first rows: keep the whole cache's count
            self.cache.length, self.cache.padded = cache.length, cache.padded

    def _speculates(self) -> bool:
        """Speculative decoding (prompt lookup) runs when one sequence is decoding alone, asked for it,
        and nothing waits to join: a batch's rows already share each step's weight reads."""
        if len(self.rows) != 1 or self.pending or not isinstance(self.cache, KVCache):
            return False
        row = self.rows[0]
        cfg = row.seq.config
        room = self.cache.capacity - self.cache.length
        return (cfg.prompt_lookup_num_tokens > 0 and row.constraint is None and row.seq.logprobs is None
                and room > cfg.prompt_lookup_num_tokens and row.remaining > 1)  # fmt: skip

    def _speculative_step(self, row: _Row, cache: KVCache) -> None:
        """Feed the row's last token with a draft from its own text, keep the drafted tokens the model
        agrees with (handed out at once), and leave the model's next choice for the next step."""
        cfg = row.seq.config
        if row.schedule is None:
            most = cfg.prompt_lookup_num_tokens
            row.schedule = DraftSchedule(most, draft_costs(self.model, PromptLookup(), most))
        size = row.schedule.next(row.remaining - 1)
        draft = PromptLookup().propose(row.history, size) if size else []
        before = cache.length
        block = check_draft(self.model, cache, row.history[-1], row.length - 1, draft)
        kept = 0
        for place, drafted in enumerate(draft):
            scores = block[place : place + 1].clone()
            if self.banned:
                scores[:, self.banned] = float("-inf")
            if cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty:
                scores = self._penalised(scores, row, cfg)
            token, same = verify(scores, drafted, cfg, self.generators.get(row.seq.group))
            if not same:
                row.chosen = token  # (handed out by the next step, like any choice)
                break
            kept += 1
            self._advance(row, token, None)
            if row.done:
                break
        row.drafted, row.accepted = row.drafted + len(draft), row.accepted + kept
        self.stats["drafted"] += len(draft)
        self.stats["accepted"] += kept
        if self.metrics is not None:
            self.metrics.drafted(len(draft), kept)
        row.schedule.update(len(draft), kept)
        cache.truncate(before + 1 + kept)
        self.next_logits = block[kept : kept + 1]

    def _choose(self) -> list[tuple[int, tuple | None]]:
        """Each row's next token under its own settings, with (log-probability, top alternatives)
        for the rows that asked for them. Rows with the same settings are sampled as one batch."""
        logits = self.next_logits
        if self.banned:
            logits = logits.clone()
            logits[:, self.banned] = float("-inf")
        if any(r.constraint is not None for r in self.rows):
            logits = mask_logits(logits, [None if r.done else r.constraint for r in self.rows])
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.rows):
            if not row.done:
                groups.setdefault((row.seq.config.sampling_key(), row.seq.group), []).append(i)
        for members in groups.values():  # a seeded request's rows in choice order, wherever they sit now
            members.sort(key=lambda i: self.rows[i].seq.index)
        active = {group for _, group in groups}
        for group in [g for g in self.generators if g not in active]:  # (its request has ended)
            del self.generators[group]
        tokens = torch.zeros(len(self.rows), dtype=torch.long, device=logits.device)
        for (cfg, group), members in groups.items():
            index = torch.tensor(members, device=logits.device)
            sub = logits.index_select(0, index)
            if cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty:
                sub = torch.cat(
                    [self._penalised(sub[j : j + 1], self.rows[i], cfg) for j, i in enumerate(members)]
                )
            tokens[index] = choose_tokens(sub, cfg, self.generators.get(group))
        chosen = tokens.tolist()
        for i, row in enumerate(self.rows):
            if row.chosen is not None:  # chosen when a draft was checked (speculative decoding)
                chosen[i], row.chosen = row.chosen, None
        out = []
        for i, row in enumerate(self.rows):
            scores = None
            if not row.done and row.seq.logprobs is not None:
                logprobs = torch.log_softmax(self.next_logits[i], dim=-1)
                top = None
                if row.seq.logprobs:
                    values, ids = logprobs.topk(min(row.seq.logprobs, logprobs.shape[-1]))
                    top = list(zip(ids.tolist(), values.tolist(), strict=True))
                scores = (float(logprobs[chosen[i]]), top)
            out.append((chosen[i], scores))
        return out

    def _penalised(self, logits: torch.Tensor, row: _Row, cfg: GenerationConfig) -> torch.Tensor:
        """One row's logits under the repetition, presence and frequency penalties."""
        if row.counts is None:
            row.counts = torch.zeros_like(logits)
        context = torch.tensor([row.history], device=logits.device)
        return apply_penalties(logits, context, torch.ones_like(context, dtype=torch.bool), row.counts, cfg)

    def _advance(self, row: _Row, token: int, scores: tuple | None) -> None:
        """Hand out the text `token` settles, and end the row when its sequence is done."""
        seq = row.seq
        if seq.cancelled:
            self.stats["cancelled"] += 1
            row.done = True
            return
        if token in self.ends and seq.config.stop_at_eot:  # (ignore_eos: write on)
            self._finish(row, "stop")
            return
        row.produced += 1
        row.history.append(token)
        if row.counts is not None:
            row.counts[0, token] += 1
        row.tracker.add(token)
        if row.constraint is not None:
            row.constraint.advance(token)
        logprob, top = scores if scores is not None else (None, None)
        seq.emit(Token(seq.index, row.tracker.take_new(), token, logprob, top))
        if self.metrics is not None:
            self.metrics.token(seq)
        if row.tracker.stopped or (row.constraint is not None and row.constraint.complete):
            self._finish(row, "stop")
        elif row.produced >= seq.config.max_new_tokens:
            self._finish(row, "length")

    @staticmethod
    def _finish(row: _Row, reason: str) -> None:
        rest = row.tracker.take_new(final=True)
        if rest:
            row.seq.emit(Token(row.seq.index, rest))
        row.seq.emit(Done(row.seq.index, reason, row.produced, row.drafted, row.accepted))
        row.done = True


@torch.inference_mode()
def prompt_logprobs(model: nn.Module, ids: list[int], top: int) -> tuple[list[float | None], list[list]]:
    """Log-probability of each prompt token given the ones before it (None for the first),
    and the `top` most likely tokens at each position: what `echo` returns.

    A prompt longer than the model's context is scored in sliding windows (as `lmforge eval`
    scores a text): each token once, with at least half a context before it."""
    from lmforge.evaluation.perplexity import sliding_windows

    device = next(model.parameters()).device
    block = getattr(model, "block_size", len(ids))
    chosen: list[float] = []
    tops: list[list] = [[]]
    for begin, end, first in sliding_windows(
        len(ids), min(block, len(ids)), max(1, min(block, len(ids)) // 2)
    ):
        logits, _ = model(
            torch.tensor([ids[begin : end - 1]], device=device)
        )  # inputs predict begin+1..end-1
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)[first - begin - 1 : end - begin - 1]
        target = torch.tensor(ids[first:end], device=device)
        chosen += logprobs.gather(1, target[:, None]).squeeze(1).tolist()
        k = min(top, logprobs.shape[-1])  # no more alternatives than the vocabulary has
        if k:
            values, indices = logprobs.topk(k, dim=-1)
            tops += [
                list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)
            ]
        else:
            tops += [[] for _ in range(end - first)]
    return [None, *chosen], tops
