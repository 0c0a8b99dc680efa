import json
import math
import time

import pytest
import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.config import ModelConfig, apply_overrides, load_preset, validate
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.models import build_model
from lmforge.training.optim import lr_at
from lmforge.training.trainer import train

from .conftest import tiny_config


def test_training_lowers_the_loss_and_writes_the_run_directory(tmp_path, shakespeare_excerpt):
    cfg = tiny_config(
        tmp_path / "run", shakespeare_excerpt, **{"train.max_iters": 60, "train.eval_interval": 20}
    )
    result = train(cfg, log=lambda _: None)
    out = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    for r in records:
        assert {"step", "train_loss", "lr", "tokens_per_s", "elapsed_s"} <= set(r)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.5
    saved = json.loads((out / "config.json").read_text())
    assert vals[-1] < math.log(saved["vocab_size"]) - 0.5  # well below the uniform guess
    assert result.best_val_loss == pytest.approx(min(vals), abs=1e-4)
    assert saved["format"] == "lmforge-checkpoint" and saved["val_loss"] == pytest.approx(min(vals), abs=1e-4)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, shakespeare_excerpt):
    cfg = tiny_config(tmp_path / "run", shakespeare_excerpt, **{"model.pos_encoding": "rope"})
    train(cfg, log=lambda _: None)
    model, tokenizer, config = load_checkpoint(tmp_path / "run")
    again, _, _ = load_checkpoint(tmp_path / "run")
    ids = torch.tensor([tokenizer.encode("ROMEO:\nWhat")])
    assert torch.equal(model(ids)[0], again(ids)[0])
    assert config.model.pos_encoding == "rope" and config.model.vocab_size == tokenizer.vocab_size


def _losses(cfg, **kw):
    losses = []
    train(cfg, log=lambda _: None, on_step=lambda step, loss: losses.append(loss), **kw)
    return losses


@pytest.mark.parametrize(
    "overrides",
    [{"model.dropout": 0.0}, {"model.dropout": 0.2}, {"optim.optimizer": "muon", "train.dtype": "bfloat16"}],
    ids=["adamw", "dropout", "muon-bfloat16"],
)
def test_resume_continues_exactly(tmp_path, shakespeare_excerpt, overrides):
    """20 steps in one go == 10 steps, Ctrl-C, resume, 10 more (dropout RNG and Muon's state included)."""
    overrides = {**overrides, "train.eval_interval": 5}
    straight = _losses(tiny_config(tmp_path / "a", shakespeare_excerpt, **overrides))

    def interrupt_at_10(step, loss):
        first.append(loss)
        if step == 10:
            raise KeyboardInterrupt

    first: list[float] = []
    cfg = tiny_config(tmp_path / "b", shakespeare_excerpt, **overrides)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, log=lambda _: None, on_step=interrupt_at_10)
    assert stopped.value.step == 10
    second = _losses(cfg, resume=True)
    assert len(first) == 10 and len(second) == 10
    assert first + second == pytest.approx(straight, abs=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


@pytest.mark.parametrize("stop_at", [7, 12])
def test_a_run_interrupted_between_records_logs_the_uninterrupted_records(
    tmp_path, shakespeare_excerpt, stop_at
):
    """Stopped at a step that has no record (records every 5, evaluations every 10), the resumed run
    continues the training-loss window: every train_loss equals the uninterrupted run's."""
    overrides = {"train.eval_interval": 10, "train.log_interval": 5}
    train(tiny_config(tmp_path / "a", shakespeare_excerpt, **overrides), log=lambda _: None)

    def interrupt(step, loss):
        if step == stop_at:
            raise KeyboardInterrupt

    cfg = tiny_config(tmp_path / "b", shakespeare_excerpt, **overrides)
    with pytest.raises(TrainingInterrupted):
        train(cfg, log=lambda _: None, on_step=interrupt)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as cut:  # a record cut by a kill while written
        cut.write('{"step": 4, "train_lo')
    said: list[str] = []
    train(cfg, resume=True, log=said.append)
    assert any("was cut short" in line and "that record is lost" in line for line in said)
    records = [
        [
            (r["step"], r["train_loss"])
            for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())
            if "train_loss" in r
        ]
        for run in ("a", "b")
    ]
    assert [step for step, _ in records[1]] == [step for step, _ in records[0]] == [5, 10, 15, 20]
    assert [loss for _, loss in records[1]] == pytest.approx([loss for _, loss in records[0]], abs=1e-6)


def test_a_second_signal_within_a_step_saves_nothing_and_resume_stays_exact(
    tmp_path, shakespeare_excerpt, monkeypatch
):
    """A second Ctrl-C cuts a step (here while its batch is drawn): that half-done state is not saved, so
    --resume continues from the last saved one (step 10) and the run equals the uninterrupted one."""
    import lmforge.training.loop as loop

    overrides = {"train.eval_interval": 5}
    straight = _losses(tiny_config(tmp_path / "a", shakespeare_excerpt, **overrides))
    real_step, calls = loop.train_step, []

    def cut_at_13(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:
            args[0].source.next_batch()  # its batch drawn, then the signal
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", cut_at_13)
    first: list[float] = []
    cfg = tiny_config(tmp_path / "b", shakespeare_excerpt, **overrides)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, log=lambda _: None, on_step=lambda step, loss: first.append(loss))
    monkeypatch.setattr(loop, "train_step", real_step)
    assert (
        stopped.value.mid_step and "during step 13" in str(stopped.value) and "--resume" in str(stopped.value)
    )
    assert json.loads((tmp_path / "b" / "train_state" / "state.json").read_text())["step"] == 10
    second = _losses(cfg, resume=True)
    assert len(first) == 12 and len(second) == 10
    assert first[:10] + second == pytest.approx(straight, abs=1e-6)


def test_signals_during_a_save_wait_for_it():
    """The first signal asks for a stop at the end of the step; a second one stops at once, except while
    the state is being saved, when it waits for the save to end."""
    import os
    import signal

    from lmforge.training.loop import deferred_interrupts

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with deferred_interrupts() as interrupted:
            assert not interrupted()
            os.kill(os.getpid(), signal.SIGINT)
            assert interrupted()
            with interrupted.shielded():
                os.kill(os.getpid(), signal.SIGINT)  # a second one during the save: no KeyboardInterrupt
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # after it: at once
                time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_early_stopping_and_target_loss(tmp_path, shakespeare_excerpt):
    cfg = tiny_config(
        tmp_path / "a",
        shakespeare_excerpt,
        **{"train.max_iters": 200, "train.eval_interval": 5, "train.target_loss": 3.3},
    )
    result = train(cfg, log=lambda _: None)
    assert result.stopped_because.startswith("reached target") and result.step < 200
    assert result.final_val_loss <= 3.3
    cfg = tiny_config(
        tmp_path / "b",
        shakespeare_excerpt,
        **{
            "train.max_iters": 200,
            "train.eval_interval": 5,
            "train.patience": 1,
            "optim.lr": 1.0,
            "optim.warmup_iters": 0,
            "optim.schedule": "constant",
        },
    )
    result = train(cfg, log=lambda _: None)
    assert result.stopped_because.startswith("no improvement") and result.step < 200


def test_lr_schedules():
    cfg = load_preset("nanogpt-cpu-baseline").optim
    assert lr_at(0, cfg, 2000) == pytest.approx(1e-3 / 101)
    assert lr_at(100, cfg, 2000) == pytest.approx(1e-3)
    assert lr_at(1050, cfg, 2000) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(2000, cfg, 2000) == pytest.approx(1e-4)
    wsd = apply_overrides(load_preset("tiny"), {"optim.schedule": "wsd", "optim.warmup_iters": 0}).optim
    assert lr_at(500, wsd, 1000) == wsd.lr and lr_at(1000, wsd, 1000) == pytest.approx(wsd.min_lr)
    assert lr_at(900, wsd, 1000) == pytest.approx((wsd.lr + wsd.min_lr) / 2)


def test_a_time_budget_ends_the_learning_rate_schedule_with_it(tmp_path, shakespeare_excerpt):
    """max_iters far beyond what 4 seconds allow: the cosine still reaches min_lr by the time the
    budget stops the run (the schedule's length is estimated from the speed so far)."""
    overrides = {"train.max_iters": 1_000_000, "train.max_time_s": 4.0, "train.eval_interval": 10_000,
                 "train.log_interval": 5, "optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_iters": 5}  # fmt: skip
    result = train(tiny_config(tmp_path / "t", shakespeare_excerpt, **overrides), log=lambda _: None)
    assert result.stopped_because.startswith("time limit") and 40 < result.step < 1_000_000
    rates = [r["lr"] for r in result.history]
    assert max(rates) > 0.8e-3  # it did warm up to the peak...
    assert rates[-1] < 0.2e-3  # ...and decayed to near min_lr by the end, not 1e-3 as 1M steps would give
    halfway = [r["lr"] for r in result.history if r["elapsed_s"] >= result.history[-1]["elapsed_s"] / 2][0]
    assert 0.2e-3 < halfway < 0.9e-3  # and on the way down in the middle


def test_muon_optimizer_trains(tmp_path, shakespeare_excerpt):
    cfg = tiny_config(
        tmp_path / "m", shakespeare_excerpt, **{"optim.optimizer": "muon", "train.max_iters": 40}
    )
    result = train(cfg, log=lambda _: None)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.3


def test_muon_orthogonalises_a_stack_as_each_matrix_alone():
    from lmforge.training.optim import newton_schulz

    torch.manual_seed(0)
    stack = torch.randn(3, 8, 20)
    together = newton_schulz(stack)
    for i in range(3):
        assert torch.allclose(together[i], newton_schulz(stack[i]), atol=1e-5)
    tall = newton_schulz(torch.randn(20, 8))  # a tall one is iterated transposed: still 20 x 8
    singular = torch.linalg.svdvals(tall)
    assert tall.shape == (20, 8) and bool(((singular > 0.5) & (singular < 1.5)).all())


def test_muon_iterates_in_bfloat16_near_float32_and_stacks_a_tall_matrix_with_wide_ones():
    from lmforge.training.optim import Muon, newton_schulz

    torch.manual_seed(0)
    g = torch.randn(4, 16, 48)
    exact, low = newton_schulz(g), newton_schulz(g, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == g.shape
    assert ((low - exact).norm() / exact.norm()).item() < 0.02
    assert not torch.equal(low, exact)  # it did iterate in bfloat16

    # A 20 x 8 matrix is iterated as its 8 x 20 transpose, in one stack with an 8 x 20 one: each gets
    # the update it would get alone (momentum 0: the update is the orthogonalised gradient).
    wide, tall = torch.nn.Parameter(torch.randn(8, 20)), torch.nn.Parameter(torch.randn(20, 8))
    wide.grad, tall.grad = torch.randn(8, 20), torch.randn(20, 8)
    before = wide.detach().clone(), tall.detach().clone()
    Muon([wide, tall], lr=0.1, momentum=0.0, nesterov=False).step()
    assert torch.allclose(wide, before[0] - 0.1 * newton_schulz(wide.grad), atol=1e-6)
    assert torch.allclose(tall, before[1] - 0.1 * (20 / 8) ** 0.5 * newton_schulz(tall.grad), atol=1e-6)


def test_muon_follows_the_training_precision_and_its_state_is_json():
    from lmforge.config import OptimConfig
    from lmforge.training.optim import Muon, build_optimizers

    model = build_model(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=8))
    for dtype, name in [(torch.bfloat16, "bfloat16"), (torch.float32, "float32"), (torch.float16, "float32")]:
        _, muon = build_optimizers(model, OptimConfig(optimizer="muon"), torch.device("cpu"), dtype=dtype)
        assert isinstance(muon, Muon) and muon.param_groups[0]["ns_dtype"] == name
        json.dumps(muon.state_dict()["param_groups"])  # the training state keeps param groups as JSON
    # A state saved before the iteration's precision was kept resumes in float32, and steps.
    saved = muon.state_dict()
    del saved["param_groups"][0]["ns_dtype"]
    _, muon = build_optimizers(
        model, OptimConfig(optimizer="muon"), torch.device("cpu"), dtype=torch.bfloat16
    )
    muon.load_state_dict(saved)
    assert muon.param_groups[0]["ns_dtype"] == "float32"
    for p in muon.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in muon.param_groups[0]["params"]]
    muon.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, muon.param_groups[0]["params"], strict=True))


def test_muon_leaves_embeddings_head_and_one_row_weights_to_adamw():
    from lmforge.config import OptimConfig
    from lmforge.training.optim import Muon, build_optimizers

    model = build_model(ModelConfig(arch="seq2seq", vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=8,
                                    copy_attention=True))  # fmt: skip
    adam, muon = build_optimizers(model, OptimConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(muon, Muon)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.wte.weight) not in in_muon and id(model.copy_gate.weight) not in in_muon
    assert id(model.decoder[0].cross.q.weight) in in_muon
    assert len(in_muon) + sum(len(g["params"]) for g in adam.param_groups) == len(list(model.parameters()))


# ---- bad input ------------------------------------------------------------------------


def test_unknown_preset_and_config_key_list_the_valid_ones():
    with pytest.raises(UserError, match="Unknown preset 'shakespear'.*shakespeare-char"):
        load_preset("shakespear")
    with pytest.raises(UserError, match="Unknown config key 'train.max_iter'.*train.max_iters"):
        apply_overrides(load_preset("tiny"), {"train.max_iter": 3})
    with pytest.raises(UserError, match="train.max_iters must be int, not 'many'"):
        apply_overrides(load_preset("tiny"), {"train.max_iters": "many"})
    with pytest.raises(UserError, match="divisible"):
        validate(apply_overrides(load_preset("tiny"), {"model.n_head": 3}))


def test_corpus_shorter_than_one_window(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be or not to be, that is the question.\n" * 3)
    cfg = tiny_config(tmp_path / "run", short, **{"model.block_size": 64})
    with pytest.raises(UserError, match="fewer than one training window"):
        train(cfg, log=lambda _: None)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_vocabulary_larger_than_the_model(tmp_path, shakespeare_excerpt):
    cfg = tiny_config(tmp_path / "run", shakespeare_excerpt, **{"model.vocab_size": 30})
    with pytest.raises(UserError, match="tokenizer has 6[0-9] tokens but model.vocab_size is 30"):
        train(cfg, log=lambda _: None)


def test_output_directory_holding_another_run(tmp_path, shakespeare_excerpt):
    cfg = tiny_config(tmp_path / "run", shakespeare_excerpt, **{"train.max_iters": 10})
    train(cfg, log=lambda _: None)
    with pytest.raises(UserError, match="already holds a training run; resume it, overwrite it"):
        train(cfg, log=lambda _: None)
    other = apply_overrides(cfg, {"model.n_embd": 64})
    with pytest.raises(UserError, match="model settings differ.*model.n_embd"):
        train(other, resume=True, log=lambda _: None)
    result = train(other, overwrite=True, log=lambda _: None)
    assert result.step == 10
    with pytest.raises(UserError, match="There is no run to resume in"):
        train(tiny_config(tmp_path / "empty", shakespeare_excerpt), resume=True, log=lambda _: None)


def test_partial_corrupt_and_foreign_checkpoints(tmp_path, shakespeare_excerpt):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(UserError, match="model_type 'gpt_neox' is not supported"):
        load_checkpoint(foreign)
    (foreign / "config.json").write_text('{"name": "something else"}')
    with pytest.raises(UserError, match="not an lmforge checkpoint"):
        load_checkpoint(foreign)
    train(tiny_config(tmp_path / "run", shakespeare_excerpt, **{"train.max_iters": 10}), log=lambda _: None)
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "run")
    weights.unlink()
    with pytest.raises(UserError, match="incomplete: model.safetensors is missing"):
        load_checkpoint(tmp_path / "run")


def test_compiled_training_evaluates_and_matches_eager(tmp_path, shakespeare_excerpt, monkeypatch):
    """`train.compile`: the compiled model also scores validation (it once crashed there, at the
    first evaluation). Dynamo's eager backend keeps the test fast: the model is traced and wrapped
    as with Inductor, only no code is generated."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    eager = train(tiny_config(tmp_path / "eager", shakespeare_excerpt), log=lambda _: None)
    compiled = train(
        tiny_config(tmp_path / "compiled", shakespeare_excerpt, **{"train.compile": True}), log=lambda _: None
    )
    assert compiled.best_val_loss == pytest.approx(eager.best_val_loss, abs=1e-4)
    assert (tmp_path / "compiled" / "model.safetensors").is_file()
