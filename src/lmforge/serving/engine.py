"""The generation engine behind the server: one worker thread owns the model.

Requests become `Sequence`s in a bounded queue. The worker takes the oldest one and,
after a short wait for companions, every queued sequence with the same sampling
settings (up to `max_batch`), and decodes them together as one left-padded batch
with a KV cache: dynamic batching. Each sequence stops on its own (end-of-text,
stop string, its max_tokens, or its client going away) and the batch ends when all
have. A sequence with a seed is batched only with the other choices of its own
request, so a seeded request gives the same text whatever else is running.

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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from lmforge.generation import GenerationConfig, TextTracker, banned_ids, decode_steps
from lmforge.structured import GrammarConstraint, mask_logits
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

    def batch_key(self) -> tuple[GenerationConfig, int]:
        return self.config.sampling_key(), self.group

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Job:
    """A function to run on the worker thread (scoring a prompt), with its future."""

    run: Callable[[], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_wait_s: float = 0.02,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.pending: deque[Sequence | _Job] = deque()
        self.condition = threading.Condition()
        self.stopped = False
        self.groups = itertools.count(1)
        self.stats = {"batches": 0, "sequences": 0, "max_batch_seen": 0, "cancelled": 0}
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

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread between batches (the model is never used by two threads)."""
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

    def close(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join(timeout=5)

    # ---- worker side -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.pending and not self.stopped:
                    self.condition.wait()
                if self.stopped:
                    return
                first = self.pending.popleft()
            if isinstance(first, _Job):
                self._run_job(first)
                continue
            batch = [first]
            if self.max_batch > 1 and self.batch_wait_s > 0:
                time.sleep(self.batch_wait_s)  # let requests that arrive together meet
            with self.condition:
                rest: deque[Sequence | _Job] = deque()
                while self.pending:
                    item = self.pending.popleft()
                    if (
                        len(batch) < self.max_batch
                        and isinstance(item, Sequence)
                        and item.batch_key() == first.batch_key()
                    ):
                        batch.append(item)
                    else:
                        rest.append(item)
                self.pending = rest
            try:
                self._run_batch(batch)
            except Exception as e:  # a bug must not kill the worker: report it to the clients
                for s in batch:
                    s.emit(Failed(s.index, f"generation failed: {type(e).__name__}: {e}"))

    @staticmethod
    def _run_job(job: _Job) -> None:
        try:
            result = job.run()
            job.loop.call_soon_threadsafe(lambda: job.future.done() or job.future.set_result(result))
        except Exception as e:  # handed to the waiting request
            error = e  # (the name `e` is cleared when the except block ends; the callback runs later)
            job.loop.call_soon_threadsafe(lambda: job.future.done() or job.future.set_exception(error))

    def _run_batch(self, batch: list[Sequence]) -> None:
        self.stats["batches"] += 1
        self.stats["sequences"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        cfg = replace(
            batch[0].config.sampling_key(), max_new_tokens=max(s.config.max_new_tokens for s in batch)
        )
        ends = self.tokenizer.end_ids
        trackers = [TextTracker(self.tokenizer, list(s.config.stop)) for s in batch]
        done = [s.cancelled for s in batch]
        produced = [0] * len(batch)
        top_k = min(max((s.logprobs or 0) for s in batch), self.tokenizer.vocab_size)  # no more than exist
        wants_logprobs = any(s.logprobs is not None for s in batch)
        scores: dict[str, torch.Tensor] = {}

        def observe(logits: torch.Tensor, token: torch.Tensor) -> None:
            if wants_logprobs:
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                scores["chosen"] = logprobs.gather(1, token[:, None]).squeeze(1).cpu()
                if top_k:
                    scores["top_values"], scores["top_ids"] = (t.cpu() for t in logprobs.topk(top_k, dim=-1))

        def finish(row: int, reason: str) -> None:
            rest = trackers[row].take_new(final=True)
            if rest:
                batch[row].emit(Token(batch[row].index, rest))
            batch[row].emit(Done(batch[row].index, reason, produced[row]))
            done[row] = True
            constraints[row] = None

        constraints = [GrammarConstraint(self.tokenizer, s.grammar) if s.grammar else None for s in batch]
        steps = decode_steps(
            self.model,
            [s.prompt_ids for s in batch],
            cfg,
            ends,
            banned=banned_ids(self.tokenizer),
            observe=observe,
            constrain=(lambda logits: mask_logits(logits, constraints)) if any(constraints) else None,
        )
        for token in steps:
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                seq = batch[row]
                if seq.cancelled:
                    self.stats["cancelled"] += 1
                    done[row] = True
                    continue
                if t in ends:
                    finish(row, "stop")
                    continue
                produced[row] += 1
                trackers[row].add(t)
                if constraints[row] is not None:
                    constraints[row].advance(t)
                lp = top = None
                if seq.logprobs is not None:
                    lp = float(scores["chosen"][row])
                    if seq.logprobs:
                        top = [
                            (int(i), float(v))
                            for i, v in zip(
                                scores["top_ids"][row, : seq.logprobs],
                                scores["top_values"][row, : seq.logprobs],
                                strict=True,
                            )
                        ]
                seq.emit(Token(seq.index, trackers[row].take_new(), t, lp, top))
                if trackers[row].stopped or (constraints[row] is not None and constraints[row].complete):
                    finish(row, "stop")
                elif produced[row] >= seq.config.max_new_tokens:
                    finish(row, "length")
            if all(done):
                break
        steps.close()
        for row in range(len(batch)):
            if not done[row]:
                finish(row, "length")


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
