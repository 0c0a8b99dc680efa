"""Standard input and text files given to commands: one reader, one clear error for bytes that are not
UTF-8 and for a source with no text, and nothing written."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from lmforge.cli import main

V1 = Path(__file__).resolve().parent / "data" / "v1"


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize(
    ("run", "argv"),
    [
        ("gpt", ["generate", "{run}", "--prompt-file", "-", "--max-new-tokens", "2"]),
        ("gpt", ["generate", "{run}", "--max-new-tokens", "2"]),  # piped prompts
        ("seq2seq", ["translate", "{run}", "--file", "-"]),
        ("classifier", ["classify", "{run}", "--file", "-"]),
    ],
)
def test_standard_input_that_is_not_utf8_is_one_error(tmp_path, monkeypatch, capsys, run, argv):
    folder = shutil.copytree(V1 / run, tmp_path / run)
    _stdin(monkeypatch, b"caf\xe9\n")
    assert main([a.replace("{run}", str(folder)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Standard input is not valid utf-8 text (byte 0xe9 at offset 3)" in err and "Traceback" not in err


def test_chat_input_that_is_not_utf8_is_one_error(tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(V1 / "gpt", tmp_path / "gpt")
    _stdin(monkeypatch, b"hello\n\xff\xfe\n")
    assert main(["chat", str(folder), "--max-new-tokens", "2"]) == 2
    assert "Standard input is not valid utf-8 text" in capsys.readouterr().err


@pytest.mark.parametrize(("run", "command"), [("seq2seq", "translate"), ("classifier", "classify")])
def test_an_empty_file_of_texts_is_named_as_such(tmp_path, capsys, run, command):
    folder = shutil.copytree(V1 / run, tmp_path / run)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    assert main([command, str(folder), "--file", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty} holds no texts; give at least one line." in err and "--text or --file" not in err


def test_eval_of_a_checkpoint_with_nan_weights_is_an_error_not_a_nan_report(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(V1 / "gpt", tmp_path / "gpt")
    text = tmp_path / "text.txt"
    text.write_text((V1 / "data" / "text.txt").read_text("utf-8")[:3000], encoding="utf-8")
    assert main(["eval", str(folder), "--data", str(text)]) == 0
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(folder), "--data", str(text), "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "on this data is nan: its weights hold NaN or infinite values" in err
    assert not (tmp_path / "r.json").exists()


def test_translate_warns_when_it_cuts_a_long_source(tmp_path, capsys):
    folder = shutil.copytree(V1 / "seq2seq", tmp_path / "seq2seq")  # reads sources of 10 tokens
    assert main(["translate", str(folder), "--text", "abcdefgabcdefg", "--text", "abc", "--beams", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 of 2 source(s) have more tokens than the model reads (10); only their first 10" in err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda c: c.pop(next(k for k in ("num_hidden_layers", "n_layer") if k in c)),
            "which a .* model needs",
        ),
        (
            lambda c: c.update(vocab_size=str(c["vocab_size"])),
            "model.vocab_size must be a whole number, not '",
        ),
        (
            lambda c: c.update(hidden_size=[32]) if "hidden_size" in c else c.update(n_embd=[32]),
            "wrong kind|must be",
        ),
    ],
)
def test_a_damaged_hugging_face_config_is_one_clear_error(tmp_path, capsys, damage, message):
    import re

    folder = tmp_path / "hf"
    assert main(["export", str(V1 / "gpt"), "--out", str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text("utf-8"))
    damage(config)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", str(folder), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "config.json" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: c.pop("labels"), "has no list of labels"),
        (lambda c: c["classifier"].update(colour="blue"), "unknown classifier setting(s) colour"),
        (lambda c: c["classifier"].update(n_embd="16"), "classifier.n_embd must be a whole number, not '16'"),
        (lambda c: c.update(classifier=None), "has no 'classifier' settings"),
    ],
)
def test_a_damaged_classifier_config_is_one_clear_error(tmp_path, capsys, damage, message):
    folder = shutil.copytree(V1 / "classifier", tmp_path / "classifier")
    config = json.loads((folder / "config.json").read_text("utf-8"))
    damage(config)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert main(["classify", str(folder), "--text", "a fine film"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("content", [{"weight": [1.0, 2.0]}, [1, 2, 3], {"x": "text"}])
def test_a_pytorch_model_bin_of_other_values_is_one_clear_error(tmp_path, capsys, content):
    import torch

    folder = tmp_path / "hf"
    assert main(["export", str(V1 / "gpt"), "--out", str(folder)]) == 0
    (folder / "model.safetensors").unlink()
    torch.save(content, folder / "pytorch_model.bin")
    capsys.readouterr()
    assert main(["generate", str(folder), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin is not a table of named tensors" in err and "Traceback" not in err, err
