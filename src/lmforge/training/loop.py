"""The training loop, shared by every trainer (language models, classifiers).

    for each step:  learning rate → (micro-batches: batch → loss → backward) → clip → optimizer step
    every log_interval steps: a metrics record;  every eval_interval steps: validation,
    the best checkpoint, early stopping, the time limit, and the resumable state

The loop knows nothing of a model: a `Trainee` hands it the model, the optimizers, a
batch source (see sources.py) and what to do when a score improves or the state is to
be saved. Ctrl-C and SIGTERM are taken at the end of a step, so the saved state is
always that of a step boundary and `--resume` continues exactly.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lmforge.device import autocast
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.training.distributed import Distributed
from lmforge.training.metrics import MetricsLog, Reporter
from lmforge.training.sources import BatchSource


@dataclass
class Schedule:
    """When the loop logs, evaluates and stops."""

    max_steps: int
    eval_interval: int
    log_interval: int
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 = off
    patience: int = 0  # stop after this many evaluations without improvement (0 = off)
    target: float = 0.0  # stop once the monitored score reaches this (0 = off)
    max_time_s: float = 0.0  # stop after this much training time (0 = off)
    eval_at_start: bool = False
    monitor: str = "val_loss"  # the score that picks the best checkpoint
    higher_is_better: bool = False
    tokens_per_step: int = 0  # for the tokens/s of each record (0 = not reported)


@dataclass
class Progress:
    """Where a run is: saved with the training state, restored on resume."""

    step: int = 0
    best: float = math.nan  # best monitored score so far (nan = none yet)
    bad_evals: int = 0
    elapsed_before: float = 0.0  # training time of the runs this one continues
    stopped_because: str = "max_iters"
    scores: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    started: float = field(default_factory=time.perf_counter)
    # The steps since the last metrics record, and their summed loss: a run interrupted between
    # records resumes its window, so that its next train_loss is the uninterrupted run's.
    window_steps: int = 0
    window_loss: float = 0.0

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_val_loss": self.best,
            "bad_evals": self.bad_evals,
            "elapsed_s": self.elapsed(),
            "window_steps": self.window_steps,
            "window_loss": self.window_loss,
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        return cls(
            step=saved["step"],
            best=saved["best_val_loss"],
            bad_evals=saved["bad_evals"],
            elapsed_before=saved["elapsed_s"],
            window_steps=saved.get("window_steps", 0),  # (states saved before 2026-12-07 have none)
            window_loss=saved.get("window_loss", 0.0),
        )


@dataclass
class Trainee:
    """What the loop trains, and the trainer's answers to the loop's questions."""

    model: nn.Module  # the parameters being trained
    forward: nn.Module  # what computes the loss: the model, wrapped for DDP and/or compiled
    optimizers: list[torch.optim.Optimizer]
    source: BatchSource
    set_lr: Callable[[int], float]  # sets the learning rate for a step, returns it
    save_best: Callable[[Progress], None]  # the monitored score improved: write the checkpoint
    save_state: Callable[[Progress], None] | None  # write the resumable state (None: not resumable)
    device: torch.device
    dtype: torch.dtype = torch.float32
    dist: Distributed = field(default_factory=Distributed)
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper, when there is one
    evaluator: nn.Module | None = None  # what scores validation (default: forward)
    report: Callable[[Progress], dict[str, float]] | None = None  # more values for each evaluation record


def train_step(t: Trainee, grad_accum: int, grad_clip: float, scaler=None) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss (on device)."""
    total = torch.zeros((), device=t.device)
    for micro in range(grad_accum):
        batch = t.source.next_batch()
        with t.dist.no_sync(t.ddp, accumulating=micro < grad_accum - 1):
            with autocast(t.device, t.dtype):
                loss = t.source.loss(t.forward, batch) / grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        for opt in t.optimizers:
            scaler.unscale_(opt)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), grad_clip)
    for opt in t.optimizers:
        scaler.step(opt) if scaler else opt.step()
    if scaler:
        scaler.update()
    for opt in t.optimizers:
        opt.zero_grad(set_to_none=True)
    return total


def evaluate(t: Trainee, s: Schedule, p: Progress) -> dict[str, float]:
    """Score the validation data; keep the checkpoint when the monitored score improves."""
    scores = t.source.validation_score(t.forward if t.evaluator is None else t.evaluator, t.dtype)
    value = scores[s.monitor]
    if not math.isfinite(value):
        raise UserError(
            f"Training diverged: {s.monitor} is {value} at step {p.step}; lower the learning "
            f"rate (optim.lr) or set optim.grad_clip. The last good state is kept.",
            settings=("optim.lr", "optim.grad_clip"),
        )
    p.scores = scores
    better = math.isnan(p.best) or (value > p.best if s.higher_is_better else value < p.best)
    if better:
        p.best, p.bad_evals = value, 0
        if t.dist.main or t.dist.sharded:  # (a sharded model is gathered by every rank)
            t.save_best(p)
    else:
        p.bad_evals += 1
    return scores


def stop_reason(s: Schedule, p: Progress, out_of_time: bool) -> str | None:
    value = p.scores.get(s.monitor, math.nan)
    reached = value >= s.target if s.higher_is_better else value <= s.target
    if s.target and reached:
        return f"reached target {'loss' if s.monitor.endswith('loss') else s.monitor} {s.target:g}"
    if s.patience and p.bad_evals >= s.patience:
        return f"no improvement in {s.patience} evaluations"
    if out_of_time:
        return f"time limit of {s.max_time_s:g}s"
    return None


class _Window:
    """The training loss and speed since the last record."""

    def __init__(self, device: torch.device, steps: int = 0, loss: float = 0.0):
        self.loss = torch.full((), loss, device=device)
        self.steps, self.start = steps, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def record(self, t: Trainee, s: Schedule, p: Progress, lr: float) -> dict[str, Any]:
        record: dict[str, Any] = {"step": p.step}
        if self.steps:
            record["train_loss"] = round(t.dist.mean(self.loss).item() / self.steps, 5)  # one sync per record
            if not math.isfinite(record["train_loss"]):
                raise UserError(f"Training diverged: the training loss is {record['train_loss']} at step {p.step}; "
                                f"lower the learning rate (optim.lr) or set optim.grad_clip. The last good state "
                                f"is kept.", settings=("optim.lr", "optim.grad_clip"))  # fmt: skip
        record["lr"] = lr
        if s.tokens_per_step and self.steps:
            record["tokens_per_s"] = round(
                self.steps * s.tokens_per_step / (time.perf_counter() - self.start), 1
            )
        self.loss.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return record


def run_loop(
    t: Trainee,
    s: Schedule,
    p: Progress,
    metrics: MetricsLog,
    reporter: Reporter,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> Progress:
    """Train from `p.step` to `s.max_steps` (or an earlier stop); returns the final progress.

    `on_step(step, loss)` is called after each step (tests use it to simulate interruptions);
    `on_eval(step, scores)` after each evaluation (a hyper-parameter search prunes from it by
    raising).
    Ctrl-C or SIGTERM saves the state at the end of the current step and raises
    TrainingInterrupted. A second one stops at once: within a step (its batch drawn, its weights half
    updated) nothing is saved, so `--resume` continues exactly from the last saved state; signals that
    come while the state is being saved wait for the save to end.
    """
    scaler = torch.amp.GradScaler(t.device.type) if t.dtype == torch.float16 else None
    window = _Window(t.device, p.window_steps, p.window_loss)  # (a resumed run continues its window)
    p.window_steps, p.window_loss = 0, 0.0
    t.model.train()
    in_step = False  # within a step: its state is not one to save
    with deferred_interrupts() as interrupted:
        try:
            if s.eval_at_start and p.step == 0:
                scores = evaluate(t, s, p)
                metrics.log({"step": 0, **_rounded(scores), "elapsed_s": round(p.elapsed(), 3)})
            while p.step < s.max_steps:
                in_step = True
                lr = t.set_lr(p.step)
                loss = train_step(t, s.grad_accum, s.grad_clip, scaler)
                p.step += 1
                window.add(loss)
                in_step = False
                out_of_time = bool(s.max_time_s) and t.dist.any(p.elapsed() >= s.max_time_s, t.device)
                is_eval = p.step % s.eval_interval == 0 or p.step == s.max_steps or out_of_time
                record = None
                if p.step % s.log_interval == 0 or is_eval:
                    record = window.record(t, s, p, lr)
                    if is_eval:
                        record.update(_rounded(evaluate(t, s, p)))
                        if t.report:
                            record.update(_rounded(t.report(p)))
                    record["elapsed_s"] = round(p.elapsed(), 3)
                    metrics.log(record)
                    if is_eval:
                        reporter.evaluation(record)
                        if on_eval:
                            on_eval(p.step, p.scores)
                        reason = stop_reason(s, p, out_of_time)
                        if reason:
                            p.stopped_because = reason
                            break
                        if t.save_state:
                            with interrupted.shielded():
                                t.save_state(p)
                reporter.step(record)
                if on_step:
                    on_step(p.step, loss.item())
                if interrupted():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            reporter.close()
            raise _stopped(t, s, p, metrics, window, interrupted, in_step) from None
    reporter.close()
    if t.save_state:
        t.save_state(p)
    return p


def _stopped(t: Trainee, s: Schedule, p: Progress, metrics: MetricsLog, window: _Window,
             interrupted: Interrupts, in_step: bool) -> TrainingInterrupted:  # fmt: skip
    """After Ctrl-C or SIGTERM: the last record and the state saved (not a step's half-done state), and
    the exception that says so."""
    if in_step:  # a second signal cut a step: the last saved state is the one to resume from
        return TrainingInterrupted(None, p.step, t.save_state is not None, mid_step=True)
    if window.steps and p.step % s.log_interval == 0 and metrics.last_step != p.step:
        # Stopped between a step and its record (a second Ctrl-C): log what the step measured.
        metrics.log({**window.record(t, s, p, t.set_lr(p.step - 1)), "elapsed_s": round(p.elapsed(), 3)})
    resumable = t.save_state is not None and not t.dist.active
    if resumable:  # (several processes cannot agree on a save here: the last evaluation's stands)
        p.window_steps, p.window_loss = window.steps, window.loss.item()
        with interrupted.shielded():
            t.save_state(p)
    return TrainingInterrupted(None, p.step, resumable)


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in scores.items()}


class Interrupts:
    """What `deferred_interrupts` hands the loop: called, whether a stop was asked for; `shielded()`, a
    block (a save) that further signals wait for instead of cutting it."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.saving = False

    def __call__(self) -> bool:
        return self.requested.is_set()

    @contextmanager
    def shielded(self) -> Iterator[None]:
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


@contextmanager
def deferred_interrupts() -> Iterator[Interrupts]:
    """Within the block, SIGINT and SIGTERM only set a flag that the loop reads at the end of
    each step, so that a step is never cut in half. A second signal interrupts at once, except
    during a save (`Interrupts.shielded`), which it waits for."""
    interrupts = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return

    def handler(signum: int, frame: object) -> None:
        if interrupts.saving:
            print("lmforge: saving the training state; it stops when the save is done.", file=sys.stderr)
            interrupts.requested.set()
            return
        if interrupts.requested.is_set():
            raise KeyboardInterrupt
        interrupts.requested.set()

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a signal the parent chose to ignore stays ignored
            previous[sig] = signal.signal(sig, handler)
    try:
        yield interrupts
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
