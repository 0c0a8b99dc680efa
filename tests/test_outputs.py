"""Output paths: every command that writes checks its --out/--output before any work and refuses in
one sentence (exit 2, nothing written) a path that is a file where a folder goes, a folder where a
file goes, or a path under a file; an export over a training run keeps none of the run's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge.cli import main

DATA = Path(__file__).resolve().parent / "data"
V1 = DATA / "v1"


@pytest.fixture
def places(tmp_path):
    run = shutil.copytree(V1 / "gpt", tmp_path / "run")
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me\n", encoding="utf-8")
    (tmp_path / "adir").mkdir()
    return run, afile, tmp_path / "adir"


def _cases(run: Path, afile: Path, adir: Path):
    text = str(DATA / "tinyshakespeare-head.txt")
    return [
        (["train", "--preset", "tiny", "--data", text, "--out", str(afile / "run")], "lies under"),
        (["prepare", text, "--out", str(afile)], "is a file; choose another"),
        (["prepare", text, "--out", str(afile / "x")], "lies under"),
        (["export", str(run), "--out", str(afile)], "is a file; choose another"),
        (
            ["export", str(run), "--out", str(adir), "--format", "gguf"],
            "is a folder, and a file is written there",
        ),
        (["convert", str(run), "--out", str(afile / "x")], "lies under"),
        (["explain", str(run), "--text", "ROMEO", "--out", str(afile / "why")], "lies under"),
        (["eval", str(run), "--output", str(adir)], "is a folder, and a file is written there"),
        (["train-classifier", "--data", str(DATA / "sst2-dev-sample.tsv"), "--out", str(afile)], "is a file"),
        (["embeddings", "train", text, "--out", str(adir)], "is a folder"),
    ]


def test_every_command_refuses_an_output_path_that_cannot_be_what_it_writes(places, capsys):
    run, afile, adir = places
    for argv, message in _cases(run, afile, adir):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert afile.read_text("utf-8") == "keep me\n" and not any(adir.iterdir())


def test_an_export_over_a_training_run_holds_the_export_alone(places, capsys):
    run, _, _ = places
    assert (run / "train_state").is_dir() and (run / "metrics.jsonl").is_file()
    out = run.parent / "export"
    shutil.copytree(run, out)
    assert main(["export", str(run), "--out", str(out)]) == 2  # not empty: --overwrite is needed
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"}  # fmt: skip
    assert json.loads((out / "config.json").read_text("utf-8"))["model_type"]
    assert not [p for p in run.parent.iterdir() if p.name.startswith((".write-", ".old-"))]


def test_an_export_into_an_empty_folder_needs_no_overwrite(places):
    run, _, adir = places
    assert not any(adir.iterdir())
    assert main(["export", str(run), "--out", str(adir)]) == 0
    assert (adir / "config.json").is_file() and (adir / "model.safetensors").is_file()
