"""Hyper-parameter search (`lmforge tune`, Optuna): trials, pruning, the resumable study,
several workers on one study, and the best config written as a preset."""

import json
import subprocess
import sys

import optuna
import pytest

from lmforge.cli import main
from lmforge.config import apply_overrides, load_preset, preset_names
from lmforge.errors import UserError
from lmforge.tune import TuneSettings, config_to_toml, read_space, run_worker, tune

from .conftest import tiny_config

SPACE = """
[optim.lr]
low = 1e-3
high = 2e-2
log = true

[model.n_layer]
choices = [1, 2]
"""


def tiny_flags(data, out, iters=10):
    return ["--preset", "tiny", "--data", str(data), "--out", str(out), "--max-iters", str(iters),
            "--model.block_size", "16", "--batch-size", "4", "--train.eval_interval", "5",
            "--train.eval_batches", "2", "--device", "cpu"]  # fmt: skip


def test_cli_search_writes_a_preset_and_continues_its_study(tmp_path, shakespeare_excerpt, capsys):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    out = tmp_path / "study"
    assert main(["tune", "--space", str(space), "--trials", "3", *tiny_flags(shakespeare_excerpt, out)]) == 0
    printed = capsys.readouterr().out
    assert "Best: trial" in printed and (out / "study.db").is_file()
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 3 and all(t["state"] in ("complete", "pruned") for t in trials)
    complete = [t for t in trials if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["value"])
    assert all(
        1e-3 <= t["params"]["optim.lr"] <= 2e-2 and t["params"]["model.n_layer"] in (1, 2) for t in trials
    )
    tuned = load_preset(str(out / "best.toml"))  # a preset file lmforge reads back
    assert (
        tuned.optim.lr == best["params"]["optim.lr"]
        and tuned.model.n_layer == best["params"]["model.n_layer"]
    )
    assert tuned.train.max_iters == 10 and tuned.data.path == str(
        shakespeare_excerpt
    )  # the fixed overrides too
    assert f"{best['value']:.4f}" in tuned.description
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "trials" / "000" / "metrics.jsonl").is_file()
    # The same command with more trials continues the study instead of starting again.
    assert main(["tune", "--space", str(space), "--trials", "5", *tiny_flags(shakespeare_excerpt, out)]) == 0
    assert "3 of 5 trials done" in capsys.readouterr().out
    assert [t["number"] for t in json.loads((out / "trials.json").read_text())] == [0, 1, 2, 3, 4]


def test_hopeless_trials_are_pruned_at_their_first_evaluation(tmp_path, shakespeare_excerpt):
    space = tmp_path / "space.toml"
    space.write_text("[optim.lr]\nchoices = [1e-7, 5e-3]\n")
    base = tiny_config(
        tmp_path / "unused", shakespeare_excerpt, **{"train.max_iters": 20, "optim.min_lr": 1e-8}
    )
    settings = TuneSettings(out=str(tmp_path / "study"), trials=8, startup_trials=1)
    result = tune(base, space, settings, log=lambda _: None)
    study = optuna.load_study(study_name="lmforge", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert result["pruned"] == len(pruned) >= 1
    for trial in pruned:  # only the learning rate that cannot learn in 20 steps, stopped early
        assert trial.params["optim.lr"] == 1e-7 and max(trial.intermediate_values) < 20
    assert result["best_params"]["optim.lr"] == 5e-3


def test_two_workers_share_one_study(tmp_path, shakespeare_excerpt):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    out = tmp_path / "study"
    command = [sys.executable, "-m", "lmforge", "tune", "--space", str(space), "--trials", "4", "--workers", "2",
               *tiny_flags(shakespeare_excerpt, out, iters=6)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[worker 0] trial" in done.stdout and "[worker 1] trial" in done.stdout
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 4 and sorted(t["number"] for t in trials) == [0, 1, 2, 3]


def test_a_trial_started_after_the_last_needed_one_is_not_run(tmp_path, shakespeare_excerpt):
    """The race of two workers: both see one trial missing and both start one. The later-numbered trial
    sees the earlier one running, gives way without training, and neither counts nor shows."""
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    settings = TuneSettings(out=str(tmp_path / "study"), trials=2)
    (tmp_path / "study").mkdir()
    other_worker = optuna.create_study(study_name="lmforge", direction="minimize",
                                       storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")  # fmt: skip
    other_worker.tell(other_worker.ask(), 3.5)  # a finished trial of another worker
    other_worker.ask()  # and one it is still running
    run_worker(tiny_config(tmp_path / "unused", shakespeare_excerpt), read_space(space), settings, 0, print)
    trials = other_worker.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                                         optuna.trial.TrialState.FAIL]  # fmt: skip
    assert trials[2].user_attrs == {"surplus": True} and not (tmp_path / "study" / "trials").exists()


@pytest.mark.parametrize(
    "space, message",
    [
        ("[optim.learning_rate]\nlow = 1\nhigh = 2\n", "unknown setting 'optim.learning_rate'"),
        ("[optim.lr]\nlow = 0.1\nhigh = 0.01\n", "needs numbers low < high"),
        ("[optim.lr]\nlow = 0\nhigh = 0.01\nlog = true\n", "low must be above 0"),
        ("[model.activation]\nlow = 1\nhigh = 2\n", "give it choices"),
        ("[optim]\nlr = 0.1\n", "must be a table with low/high"),
        ("title = [\n", "is not valid TOML"),
        ("[model.n_layer]\nlow = 2.2\nhigh = 2.8\n", "is a whole number, and none lies between 2.2 and 2.8"),
        ("[model.n_layer]\nlow = 1\nhigh = 4\nstep = 1.5\n", "its step must be one too, not 1.5"),
    ],
)
def test_bad_search_spaces_are_named(tmp_path, space, message):
    path = tmp_path / "space.toml"
    path.write_text(space)
    with pytest.raises(UserError, match=message):
        read_space(path)


def test_cli_refuses_a_missing_space_without_a_traceback(tmp_path, capsys):
    assert main(["tune", "--space", str(tmp_path / "none.toml"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_a_written_preset_file(tmp_path, name):
    config = apply_overrides(load_preset(name), {"data.path": 'a "quoted" path\\with é', "optim.lr": 3e-05})
    path = tmp_path / "p.toml"
    path.write_text(config_to_toml(config), encoding="utf-8")
    assert load_preset(str(path)).to_dict() == config.to_dict()


def test_a_missing_optional_package_is_named(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a)
    )
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    assert main(["tune", "--space", str(space), "--out", str(tmp_path / "s")]) == 2
    assert (
        "Hyper-parameter search needs the optuna package: pip install 'lmforge[tune]'."
        in capsys.readouterr().err
    )


def test_a_trial_that_cannot_train_is_given_up_and_the_search_goes_on(tmp_path, shakespeare_excerpt):
    space = tmp_path / "space.toml"
    space.write_text("[model.block_size]\nchoices = [16, 200000]\n")  # 200,000: longer than the whole text
    base = tiny_config(
        tmp_path / "unused", shakespeare_excerpt, **{"train.max_iters": 4, "train.eval_interval": 2}
    )
    lines = []
    result = tune(base, space, TuneSettings(out=str(tmp_path / "study"), trials=4, seed=7), log=lines.append)
    trials = json.loads((tmp_path / "study" / "trials.json").read_text())
    given_up = [t for t in trials if t["params"]["model.block_size"] == 200000]
    assert given_up and all(t["state"] == "pruned" and "fewer than one training window" in t["invalid"]
                            for t in given_up)  # fmt: skip
    assert any("given up" in line for line in lines)
    assert result["best_params"]["model.block_size"] == 16 and len(trials) == 4


def test_a_data_problem_is_reported_before_any_trial(tmp_path, capsys):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    assert (
        main(
            [
                "tune",
                "--space",
                str(space),
                "--out",
                str(tmp_path / "s"),
                "--data",
                str(tmp_path / "none.txt"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s" / "study.db").exists()


def test_whole_number_settings_stay_within_fractional_bounds(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text("[model.n_layer]\nlow = 1.5\nhigh = 3.7\n")
    (param,) = read_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert {param.suggest(study.ask()) for _ in range(40)} == {2, 3}


def test_a_study_whose_every_trial_is_refused_says_why(tmp_path, shakespeare_excerpt):
    space = tmp_path / "space.toml"
    space.write_text("[model.n_head]\nchoices = [5, 7]\n")  # neither divides the width (32)
    base = tiny_config(
        tmp_path / "unused", shakespeare_excerpt, **{"train.max_iters": 2, "train.eval_interval": 2}
    )
    with pytest.raises(
        UserError, match=r"could train: 2 of 2 stopped on: model.n_embd \(32\) must be divisible"
    ):
        tune(base, space, TuneSettings(out=str(tmp_path / "study"), trials=2, seed=7), log=lambda _: None)


def test_a_damaged_study_file_is_one_clear_error(tmp_path, capsys):
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.db").write_bytes(b"this is not a database" * 100)
    assert main(["tune", "--space", str(space), "--out", str(tmp_path / "s"), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "study.db is not a readable study" in err and "Traceback" not in err
