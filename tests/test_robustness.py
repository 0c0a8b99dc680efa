"""Bad input, class by class: every user mistake gets one sentence and exit status 2 (never a
traceback), nothing is silently wrong, and the validators hold for any value (hypothesis)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.checkpoint import open_checkpoint
from lmforge.cli import main
from lmforge.config import Config, apply_overrides, field_types, validate
from lmforge.errors import UserError
from lmforge.generation_config import GenerationConfig, generation_settings
from lmforge.training.trainer import train

from .conftest import tiny_config


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "-1"], "optim.lr must be above 0 and at most 10, not -1.0. (command line: --lr)"),
    (["--optim.beta1", "2"], "optim.beta1 must be at least 0 and below 1, not 2.0. (command line: --optim.beta1)"),
    (["--model.n_head", "0"], "model.n_head must be at least 1 and at most 1024, not 0."),
    (["--seed", str(2**70)], "train.seed must be at least 0 and at most 9.22337e+18"),
    (["--train.max_time_s", "-5"], "train.max_time_s must be at least 0, not -5.0."),
    (["--train.patience", "-1"], "train.patience must be at least 0, not -1."),
    (["--optim.grad_clip", "-1"], "optim.grad_clip must be at least 0, not -1.0."),
    (["--optim.weight_decay", "-0.1"], "optim.weight_decay must be at least 0 and at most 10, not -0.1."),
    (["--optim.lr", "nan"], "optim.lr must be above 0 and at most 10, not nan."),
    (["--model.vocab_size", "1000000000"], "model.vocab_size must be at least 0 and at most 4.1943e+06"),
    (["--model.n_embd", "65536", "--model.n_layer", "1024", "--model.n_head", "64"], "billion parameters"),
    (["--optim.min_lr", "0.5", "--lr", "0.1"], "optim.min_lr (0.5) must not exceed optim.lr (0.1)."),
    (["--data", "a.txt,"], "has an empty entry"),
])  # fmt: skip
def test_bad_training_settings_are_one_sentence(tmp_path, capsys, flags, expected):
    code, err = run_cli(["train", "--preset", "tiny", "--out", str(tmp_path / "o"), *flags], capsys)
    assert code == 2 and expected in err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("args, expected", [
    (["eval", "CKPT", "--batch-size", "-1"], "batch_size, context and stride must be at least 1"),
    (["eval", "CKPT", "--batch-size", "0"], "batch_size, context and stride must be at least 1"),
    (["generate", "CKPT", "--num-samples", "0"], "--num-samples must be at least 1."),
    (["generate", "CKPT", "--temperature", "inf"], "temperature must be at least 0 and at most 5, not inf"),
    (["generate", "CKPT", "--top-p", "1e-50"], None),  # accepted: above 0, and it works (next test)
    (["serve", "CKPT", "--port", "99999"], "--port must be between 0 and 65535, not 99999."),
])  # fmt: skip
def test_bad_inference_settings(tmp_path, capsys, shakespeare_excerpt, args, expected):
    out = tmp_path / "ckpt"
    train(tiny_config(out, shakespeare_excerpt, **{"train.max_iters": 10}), log=lambda _: None)
    args = [str(out) if a == "CKPT" else a for a in args]
    if expected is None:
        assert main([*args, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--no-stream"]) == 0
        assert capsys.readouterr().out.startswith("ROMEO:")
        return
    code, err = run_cli(args, capsys)
    assert code == 2 and expected in err and "Traceback" not in err


def test_non_utf8_bytes_in_arguments_and_on_standard_input(tmp_path, shakespeare_excerpt):
    out = tmp_path / "ckpt"
    train(tiny_config(out, shakespeare_excerpt, **{"train.max_iters": 10}), log=lambda _: None)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    bad_arg = subprocess.run([sys.executable, "-m", "lmforge", "generate", str(out), "--prompt", b"caf\xe9"],
                             capture_output=True, env=env, timeout=120)  # fmt: skip
    assert bad_arg.returncode == 2 and b"is not valid UTF-8 text" in bad_arg.stderr
    assert b"Traceback" not in bad_arg.stderr
    bad_stdin = subprocess.run([sys.executable, "-m", "lmforge", "generate", str(out), "--prompt-file", "-"],
                               input=b"caf\xe9\n", capture_output=True, env=env, timeout=120)  # fmt: skip
    assert bad_stdin.returncode == 2 and b"is not valid utf-8 text (byte 0xe9" in bad_stdin.stderr
    assert b"Traceback" not in bad_stdin.stderr


def test_damaged_or_hostile_checkpoint_configs_are_refused_before_any_allocation(
    tmp_path, shakespeare_excerpt
):
    out = tmp_path / "ckpt"
    train(tiny_config(out, shakespeare_excerpt, **{"train.max_iters": 10}), log=lambda _: None)
    saved = json.loads((out / "config.json").read_text())
    for change, message in [({"block_size": -4}, "model.block_size must be at least 1"),
                            ({"vocab_size": 10**9}, "model.vocab_size must be at least 0 and at most"),
                            ({"n_embd": 60000, "n_layer": 1000}, "billion parameters")]:  # fmt: skip
        hostile = json.loads(json.dumps(saved))
        hostile["config"]["model"].update(change)
        (out / "config.json").write_text(json.dumps(hostile))
        with pytest.raises(UserError, match=message):
            open_checkpoint(out)


def test_training_that_diverges_stops_with_an_error_and_keeps_the_last_good_state(
    tmp_path, shakespeare_excerpt, monkeypatch, capsys
):
    """A loss that turns NaN (here from step 13 on: the stand-in for an exploding run) stops the
    run with exit 2, and the state saved at the last evaluation (step 10) is left to resume from."""
    from lmforge.training.sources import WindowSource

    original, calls = WindowSource.loss, []

    def failing(self, model, batch):
        calls.append(1)
        loss = original(self, model, batch)
        return loss * float("nan") if len(calls) > 12 else loss

    monkeypatch.setattr(WindowSource, "loss", failing)
    out = tmp_path / "run"
    code, err = run_cli(["train", "--preset", "tiny", "--data", str(shakespeare_excerpt), "--out", str(out),
                         "--max-iters", "40", "--train.eval_interval", "10", "--train.log_interval", "5",
                         "--train.sample_tokens", "0", "--quiet", "--device", "cpu"], capsys)  # fmt: skip
    assert code == 2 and "Training diverged: the training loss is nan at step 15" in err
    assert "(command line: --lr, --optim.grad_clip)" in err
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 10
    assert json.loads((out / "config.json").read_text())["step"] == 10  # the best model, from before


def test_a_run_directory_that_is_a_file_is_refused(tmp_path, shakespeare_excerpt, capsys):
    (tmp_path / "taken").write_text("not a folder")
    code, err = run_cli(["train", "--preset", "tiny", "--data", str(shakespeare_excerpt), "--out",
                         str(tmp_path / "taken")], capsys)  # fmt: skip
    assert code == 2 and "is a file; choose another train.out. (command line: --out)" in err


# ---- properties of the validators --------------------------------------------------------------

NUMBERS = st.one_of(st.integers(min_value=-(2**80), max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True, width=64))  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(k for k, t in field_types().items() if t in (int, float))), value=NUMBERS)
def test_config_validation_accepts_only_values_within_range(key, value):
    """Any number for any numeric setting: either a UserError naming that setting, or a config
    whose every number is finite and within the declared range."""
    kind = field_types()[key]
    try:
        config = apply_overrides(Config(), {key: str(value) if kind is int else value})
        validate(config)
    except UserError as e:
        assert (
            key.split(".")[-1] in str(e)
            or "billion parameters" in str(e)
            or "must not exceed" in str(e)
            or "divisible" in str(e)
            or "multiple" in str(e)
            or "even head size" in str(e)
        ), str(e)
        return
    section, name = key.split(".")
    accepted = getattr(getattr(config, section), name)
    assert math.isfinite(accepted)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([n for n, kind, *_ in generation_settings() if kind in (int, float, int | None)]),
       value=NUMBERS)  # fmt: skip
def test_generation_settings_accept_only_values_within_range(name, value):
    try:
        config = GenerationConfig(**{name: value})
    except UserError as e:
        assert name in str(e) and e.settings == (name,)
        return
    assert math.isfinite(getattr(config, name))


def test_sampling_with_extreme_but_valid_settings_never_fails():
    import torch

    from lmforge.inference.generation import choose_tokens

    logits = torch.randn(3, 50)
    for cfg in [GenerationConfig(top_p=1e-300), GenerationConfig(repetition_penalty=0.01, temperature=5.0),
                GenerationConfig(min_p=0.999999, top_k=1), GenerationConfig(temperature=1e-30)]:  # fmt: skip
        tokens = choose_tokens(logits, cfg, torch.Generator().manual_seed(0))
        assert tokens.shape == (3,) and ((0 <= tokens) & (tokens < 50)).all()


def test_tests_data_is_where_the_robustness_inputs_come_from():
    assert Path(__file__).with_name("data").is_dir()


# ---- files: unwritable folders, a full disk, what a kill leaves behind -----------------------------


def test_an_unwritable_output_folder_is_one_sentence(shakespeare_excerpt, capsys):
    code, err = run_cli(["train", "--preset", "tiny", "--data", str(shakespeare_excerpt), "--out",
                         "/sys/lmforge-cannot-write/run", "--quiet"], capsys)  # fmt: skip
    assert code == 2 and "cannot write" in err and "Traceback" not in err and err.count("\n") == 1


def test_a_full_disk_during_a_save_stops_cleanly_and_the_run_resumes(tmp_path, shakespeare_excerpt, monkeypatch,
                                                                     capsys):  # fmt: skip
    import errno

    from lmforge.training import state as saved_state

    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(shakespeare_excerpt), "--out", str(out), "--max-iters", "30",
            "--train.eval_interval", "10", "--train.sample_tokens", "0", "--quiet", "--device", "cpu"]  # fmt: skip
    original, saves = saved_state.save_weights, []

    def disk_full_on_second_state(path, model, metadata=None):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, model, metadata)

    monkeypatch.setattr(saved_state, "save_weights", disk_full_on_second_state)
    code, err = run_cli(args, capsys)
    assert code == 2 and "(No space left on device); free some space" in err and "--resume" in err
    assert "Traceback" not in err
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 10  # the good state stands
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the half-written copy is gone
    monkeypatch.setattr(saved_state, "save_weights", original)
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 30


def test_leftovers_of_a_killed_save_are_removed_when_the_run_continues(tmp_path, shakespeare_excerpt):
    out = tmp_path / "run"
    cfg = tiny_config(out, shakespeare_excerpt, **{"train.max_iters": 10})
    train(cfg, log=lambda _: None)
    (out / ".train_state-k1ll3d").mkdir()  # what kill -9 during a save leaves
    (out / ".train_state-k1ll3d" / "model.safetensors").write_bytes(b"half")
    (out / ".model.safetensors.ab12.tmp").write_bytes(b"half")
    train(apply_overrides(cfg, {"train.max_iters": 20}), resume=True, log=lambda _: None)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_an_adapter_is_refused_on_a_same_shaped_but_different_base(tmp_path, shakespeare_excerpt):
    from lmforge.inference.loading import load_for_inference

    from .test_finetune import finetune_config

    for name, seed in (("a", 1), ("b", 2)):  # same architecture and tokenizer, different weights
        train(tiny_config(tmp_path / name, shakespeare_excerpt, **{"train.max_iters": 10, "train.seed": seed}),
              log=lambda _: None)  # fmt: skip
    train(finetune_config(tmp_path / "a", shakespeare_excerpt, tmp_path / "ft", **{"finetune.lora_rank": 2,
                          "train.max_iters": 4}), log=lambda _: None)  # fmt: skip
    adapter = str(tmp_path / "ft" / "adapter.safetensors")
    load_for_inference(str(tmp_path / "a"), adapter=adapter)  # its own base: fine
    with pytest.raises(UserError, match="was trained on .*/a, and this is another model"):
        load_for_inference(str(tmp_path / "b"), adapter=adapter)


def test_a_tokenizer_larger_than_the_model_is_refused_at_load(tmp_path, shakespeare_excerpt):
    from lmforge.checkpoint import load_checkpoint
    from lmforge.tokenizers import train_bpe_tokenizer

    out = tmp_path / "ckpt"
    train(tiny_config(out, shakespeare_excerpt, **{"train.max_iters": 10}), log=lambda _: None)
    train_bpe_tokenizer([shakespeare_excerpt.read_text("utf-8")], vocab_size=400).save(out / "tokenizer.json")
    with pytest.raises(UserError, match="the tokenizer has 400 tokens but the model only"):
        load_checkpoint(out)
