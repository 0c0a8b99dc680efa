"""The trainer's parts on their own: a step, an evaluation, a save and restore, signals, the metrics log."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig, OptimConfig
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.models import build_model
from lmforge.training import state as saved_state
from lmforge.training.loop import Progress, Schedule, Trainee, evaluate, run_loop, train_step
from lmforge.training.metrics import MetricsLog, Reporter
from lmforge.training.optim import build_optimizers
from lmforge.training.sources import StreamSource, WindowSource

CPU = torch.device("cpu")
TOKENS = np.random.default_rng(0).integers(0, 20, 4000).astype(np.uint16)


def tiny(arch: str = "gpt") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))


def trainee(model, source, saves=None) -> Trainee:
    optimizers = build_optimizers(model, OptimConfig(lr=1e-2, fused=False), CPU)
    return Trainee(
        model=model,
        forward=model,
        optimizers=optimizers,
        source=source,
        set_lr=lambda step: 1e-2,
        save_best=lambda p: saves.append(p.step) if saves is not None else None,
        save_state=None,
        device=CPU,
    )


def test_a_step_returns_the_batch_loss_and_moves_the_weights():
    model, source = tiny(), WindowSource(TOKENS, TOKENS, 8, 4, 2, seed=1, device=CPU)
    t = trainee(model, source)
    before = [p.detach().clone() for p in model.parameters()]
    position = source.state_dict()
    batch = source.next_batch()
    source.load_state_dict(position)  # the step will draw the same batch
    with torch.no_grad():
        expected = model(*batch)[1]
    loss = train_step(t, grad_accum=1, grad_clip=1.0)
    assert torch.allclose(loss, expected)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())  # gradients cleared for the next step


def test_gradient_accumulation_averages_the_micro_batches():
    model, source = tiny(), WindowSource(TOKENS, TOKENS, 8, 4, 2, seed=1, device=CPU)
    position = source.state_dict()
    with torch.no_grad():
        losses = [model(*source.next_batch())[1] for _ in range(3)]
    source.load_state_dict(position)
    loss = train_step(trainee(model, source), grad_accum=3, grad_clip=0.0)
    assert torch.allclose(loss, torch.stack(losses).mean(), atol=1e-6)


def test_evaluation_keeps_the_best_and_counts_bad_evaluations():
    saves: list[int] = []

    class Scores:  # a source whose validation scores are scripted
        values = iter([0.5, 0.7, 0.6, 0.9])

        def validation_score(self, model, dtype):
            return {"val_accuracy": next(self.values)}

    t = trainee(tiny(), Scores(), saves)
    s = Schedule(max_steps=10, eval_interval=1, log_interval=1, monitor="val_accuracy", higher_is_better=True)
    p = Progress()
    for step in range(4):
        p.step = step
        evaluate(t, s, p)
    assert saves == [0, 1, 3] and p.best == 0.9 and p.bad_evals == 0
    Scores.values = iter([math.nan])
    with pytest.raises(UserError, match="Training diverged: val_accuracy is nan"):
        evaluate(t, s, p)


def test_state_saved_mid_run_restores_to_the_same_next_step(tmp_path):
    def fresh():
        model = tiny()
        return trainee(model, WindowSource(TOKENS, TOKENS, 8, 4, 2, seed=3, device=CPU))

    a = fresh()
    for _ in range(3):
        train_step(a, 1, 1.0)
    saved_state.save_train_state(
        tmp_path, a.model, a.optimizers, saved_state.rng_state(a.source, CPU), Progress(step=3).to_dict()
    )
    continued = [train_step(a, 1, 1.0).item() for _ in range(3)]

    b = fresh()
    rng, progress = saved_state.load_train_state(tmp_path, b.model, b.optimizers)
    saved_state.set_rng_state(rng, b.source, CPU)
    assert Progress.from_dict(progress).step == 3
    assert [train_step(b, 1, 1.0).item() for _ in range(3)] == continued
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_stream_source_carries_the_hidden_state_and_saves_it():
    model = tiny("lstm")
    source = StreamSource(TOKENS, TOKENS[:500], 8, 4, CPU)
    assert source.state_dict().keys() == {"position"}
    source.loss(model, source.next_batch())
    state = source.state_dict()
    assert {"position", "carry.0", "carry.1"} <= state.keys() and int(state["position"][0]) == 8
    again = StreamSource(TOKENS, TOKENS[:500], 8, 4, CPU)
    again.load_state_dict(state)
    batch = source.next_batch()
    assert torch.equal(batch[0], again.next_batch()[0])
    assert torch.equal(source.loss(model, batch), again.loss(model, batch))  # same carried state
    assert math.isfinite(source.validation_score(model, torch.float32)["val_loss"])


def test_a_signal_mid_step_ends_the_step_then_saves(tmp_path):
    """Ctrl-C (or SIGTERM) arriving while a batch is drawn stops after that step, with its state."""
    model = tiny()
    source = WindowSource(TOKENS, TOKENS, 8, 4, 2, seed=1, device=CPU)
    drawn = []
    original = source.next_batch

    def next_batch():
        drawn.append(1)
        if len(drawn) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # lands in the middle of step 2
        return original()

    source.next_batch = next_batch
    saved = []
    t = trainee(model, source)
    t.save_state = lambda p: saved.append(p.step)
    s = Schedule(max_steps=100, eval_interval=50, log_interval=50)
    metrics = MetricsLog(tmp_path / "metrics.jsonl", None)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        run_loop(t, s, Progress(), metrics, Reporter(False, 100, 0))
    assert stopped.value.step == 2 and saved == [2] and len(drawn) == 2  # step 2 finished, no batch 3 drawn
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone again


def test_metrics_log_drops_records_after_the_saved_step_and_a_damaged_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "train_loss": 1.0} for s in (5, 10, 15)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 20, "train_lo')
    log = MetricsLog(path, keep_until_step=10)
    assert [r["step"] for r in log.history] == [5, 10]
    log.log({"step": 15, "train_loss": 0.5})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10, 15]


def test_progress_in_a_log_file_is_plain_lines_not_a_bar(capsys):
    reporter = Reporter(True, total=100, initial=0, every_s=0.0)  # stderr is captured: not a terminal
    reporter.step({"step": 10, "train_loss": 2.5, "tokens_per_s": 12000.0})
    reporter.step(None)
    reporter.evaluation({"step": 20, "train_loss": 2.4, "val_loss": 2.45, "val_ppl": 11.59, "elapsed_s": 3.0})
    reporter.close()
    captured = capsys.readouterr()
    assert captured.err == "step     10/100 | loss 2.500 12.0k tok/s\n"  # no carriage returns, no bar
    assert captured.out == "step     20 | train 2.4000 | val 2.4500 | ppl 11.59 | 3.0s\n"
    quiet = Reporter(False, total=100, initial=0, every_s=0.0)
    quiet.step({"step": 10, "train_loss": 2.5})
    quiet.evaluation({"step": 20, "val_loss": 2.0, "elapsed_s": 1.0})
    assert capsys.readouterr() == ("", "")
