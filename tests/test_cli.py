"""The command line: exit codes, one-line errors, and the main commands end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=os.environ.copy(),
        timeout=300,
    )


TINY = [
    "--preset",
    "tiny",
    "--max-iters",
    "10",
    "--model.block_size",
    "16",
    "--train.eval_interval",
    "5",
    "--train.eval_batches",
    "2",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--quiet",
]


def test_train_then_generate_end_to_end(tmp_path, shakespeare_excerpt):
    out = tmp_path / "run"
    done = run_cli(
        "train", *TINY, "--data", str(shakespeare_excerpt), "--out", str(out), "--train.sample-tokens", "40"
    )
    assert done.returncode == 0, done.stderr
    assert "best validation loss" in done.stdout and "---- sample ----" in done.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["train"]["max_iters"] == 10
    assert saved["config"]["model"]["block_size"] == 16
    gen = run_cli("generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("ROMEO:") and len(gen.stdout.rstrip("\n")) >= 20


def test_prepare_command(tmp_path, shakespeare_excerpt):
    assert (
        main(
            [
                "prepare",
                str(shakespeare_excerpt),
                "--out",
                str(tmp_path / "p"),
                "--tokenizer",
                "bpe",
                "--vocab-size",
                "300",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "bpe", "vocab_size": 300, "spec": "bpe"}
    assert main(["prepare", str(shakespeare_excerpt), "--out", str(tmp_path / "p")]) == 2
    # A prepared directory trains directly.
    assert (
        main(
            [
                "train",
                *TINY,
                "--data",
                str(tmp_path / "p"),
                "--out",
                str(tmp_path / "run"),
                "--train.sample_tokens",
                "0",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "nope"], "Unknown preset 'nope'; available presets:"),
        (["train", "--preset", "tiny", "--data", "/no/such/file.txt"], "does not exist"),
        (["train", "--preset", "tiny", "--max-iters", "ten"], "train.max_iters must be int"),
        (["train", "--preset", "tiny", "--dtype", "float8"], "train.dtype must be"),
        (["generate", "/no/such/checkpoint"], "Checkpoint /no/such/checkpoint does not exist."),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_no_traceback(args, message):
    done = run_cli(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--train.nonsense", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --train.nonsense" in capsys.readouterr().err


def test_non_utf8_corpus_from_the_cli(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("Ünïcödé ".encode("latin-1") * 100)
    done = run_cli("train", *TINY, "--data", str(bad), "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "bad.txt is not valid utf-8: byte 0xdc at offset 0" in done.stderr
    done = run_cli(
        "train",
        *TINY,
        "--data",
        str(bad),
        "--data.errors",
        "replace",
        "--out",
        str(tmp_path / "run"),
        "--train.sample-tokens",
        "0",
    )
    assert done.returncode == 0, done.stderr


def test_presets_lists_names_and_descriptions(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("shakespeare-char", "nanogpt-cpu-baseline", "tiny"):
        assert name in out
    assert main(["presets", "--show", "nanogpt-cpu-baseline"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["n_embd"] == 128 and shown["train"]["batch_size"] == 12


# A learning rate that does not depend on the run's length, so runs of different lengths compare.
CONSTANT_LR = ("--optim.schedule", "constant", "--optim.warmup_iters", "0")


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])  # Ctrl-C; kill or a scheduler's preemption
def test_ctrl_c_saves_a_resumable_state_and_exits_130(tmp_path, shakespeare_excerpt, signal_name):
    """A real signal to a running `lmforge train`: exit 130, then --resume finishes the run."""
    import signal
    import time

    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "train",
        *TINY,
        "--max-iters",
        "100000",
        "--data",
        str(shakespeare_excerpt),
        "--out",
        str(out),
        "--train.sample_tokens",
        "0",
        *CONSTANT_LR,
    ]
    # A shell that starts the tests in the background hands its children SIGINT ignored,
    # and Python keeps it ignored: restore the default so that Ctrl-C reaches the trainer.
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (out / "train_state").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["step"] > 0
    done = run_cli(
        "train",
        *TINY,
        "--max-iters",
        str(state["step"] + 5),
        "--data",
        str(shakespeare_excerpt),
        "--out",
        str(out),
        "--resume",
        "--train.sample_tokens",
        "0",
        *CONSTANT_LR,
    )
    assert done.returncode == 0, done.stderr
    assert f"Resuming {out} at step {state['step']}" in done.stdout
    # Exact: the same weights as a run that was never interrupted (the signal was taken at a step
    # boundary, so no batch was skipped or repeated).
    straight = tmp_path / "straight"
    whole = run_cli("train", *TINY, "--max-iters", str(state["step"] + 5), "--data", str(shakespeare_excerpt),
                    "--out", str(straight), "--train.sample_tokens", "0", *CONSTANT_LR)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    a = load_file(str(out / "train_state" / "model.safetensors"))
    b = load_file(str(straight / "train_state" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
