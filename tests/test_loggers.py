"""Training logs beside metrics.jsonl: metrics.csv and TensorBoard events, read back with
the csv module and TensorBoard's own event reader; a resumed run logs every step once."""

import csv
import json

import pytest

from lmforge.cli import main
from lmforge.errors import TrainingInterrupted
from lmforge.training.trainer import train

from .conftest import tiny_config


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_csv_and_tensorboard_hold_the_same_records_as_metrics_jsonl(tmp_path, shakespeare_excerpt):
    result = train(tiny_config(tmp_path / "run", shakespeare_excerpt, **{"train.loggers": "csv,tensorboard"}),
                   log=lambda _: None)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(result.history) == 4  # steps 5, 10, 15, 20
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [r["step"] for r in records]
    assert [float(r["train_loss"]) for r in rows] == [r["train_loss"] for r in records]
    assert [r["val_loss"] for r in rows] == ["", str(records[1]["val_loss"]), "", str(records[3]["val_loss"])]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["train_loss"] == [(r["step"], pytest.approx(r["train_loss"])) for r in records]
    assert scalars["val_loss"] == [
        (r["step"], pytest.approx(r["val_loss"])) for r in records if "val_loss" in r
    ]
    assert {"lr", "tokens_per_s"} <= set(scalars)
    # The whole validation split's loss, computed after training, reaches every log.
    full = records[-1]["val_loss_full"]
    assert rows[-1]["val_loss_full"] == str(full) and scalars["val_loss_full"] == [(20, pytest.approx(full))]


def test_a_resumed_run_logs_each_step_once(tmp_path, shakespeare_excerpt):
    config = tiny_config(tmp_path / "run", shakespeare_excerpt, **{"train.loggers": "csv,tensorboard"})

    def stop_at_12(step, loss):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(config, log=lambda _: None, on_step=stop_at_12)
    train(config, resume=True, log=lambda _: None)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [5, 10, 15, 20]
    steps = [step for step, _ in tensorboard_scalars(tmp_path / "run" / "tensorboard")["train_loss"]]
    assert steps == [5, 10, 15, 20]


def test_an_unknown_logger_is_named_before_training(tmp_path, shakespeare_excerpt, capsys):
    argv = ["train", "--preset", "tiny", "--data", str(shakespeare_excerpt), "--out", str(tmp_path / "o"),
            "--loggers", "tensorboard,wandb"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Unknown logger 'wandb'; choose from csv, tensorboard" in err and "--loggers" in err
    assert not (tmp_path / "o").exists()
