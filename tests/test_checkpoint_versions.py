"""Every checkpoint format this release ever wrote keeps working: the version-1 runs of every family
kept in tests/data/v1 (see its README) load, do their job, and resume training exactly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, open_checkpoint
from lmforge.config import config_from_dict
from lmforge.generation_config import GenerationConfig
from lmforge.inference.generation import generate
from lmforge.training.trainer import train

V1 = Path(__file__).resolve().parent / "data" / "v1"
RESUMABLE = ("gpt", "lstm", "encoder", "seq2seq")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A folder holding a copy of every v1 run and its data, as the current directory (the runs'
    data paths are relative)."""
    for name in (*RESUMABLE, "classifier", "data"):
        shutil.copytree(V1 / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_fixtures_are_version_1():
    for name in (*RESUMABLE, "classifier"):
        assert json.loads((V1 / name / "config.json").read_text("utf-8"))["version"] == 1


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_v1_language_models_load_and_generate(name):
    model, tokenizer, config = load_checkpoint(V1 / name)
    assert config.model.arch == name and config.model.n_embd == 16
    text = generate(model, tokenizer, "ROMEO:", GenerationConfig(max_new_tokens=12, temperature=0.0))[0]
    assert len(tokenizer.encode(text)) == 12  # (greedy, no end token in a character vocabulary)
    again = generate(model, tokenizer, "ROMEO:", GenerationConfig(max_new_tokens=12, temperature=0.0))[0]
    assert again == text


def test_v1_encoder_decoder_translates_and_encoder_fills_masks():
    from lmforge.seq2seq.decoding import transduce

    model, tokenizer, config = load_checkpoint(V1 / "seq2seq")
    assert config.data.task == "translation" and config.model.n_encoder_layer == 1
    outputs = transduce(model, tokenizer, ["abc", "gfe"], GenerationConfig(max_new_tokens=6, num_beams=1))
    assert len(outputs) == 2 and all(isinstance(o, str) and len(o) <= 6 for o in outputs)
    encoder, bpe, saved = load_checkpoint(V1 / "encoder")
    ids = torch.tensor([bpe.encode("To be, or not to be")])
    logits, _ = encoder(ids)
    assert saved.model.arch == "encoder" and logits.shape == (1, ids.shape[1], saved.model.vocab_size)
    assert torch.isfinite(logits).all()


def test_v1_classifier_classifies():
    from lmforge.classification.inference import load_classifier, predict

    assert open_checkpoint(V1 / "classifier").is_classifier
    model, tokenizer, labels = load_classifier(V1 / "classifier")
    probabilities = predict(model, tokenizer, ["a gorgeous, witty film", "dull and tedious"])
    assert probabilities.shape == (2, len(labels)) and len(labels) == 2
    assert torch.allclose(probabilities.sum(-1), torch.ones(2))


@pytest.mark.parametrize("name", RESUMABLE)
def test_v1_runs_resume_exactly_where_they_stopped(workdir, name):
    """Resumed from its saved step 10 to step 14, a v1 run has the weights of the same run trained
    without a stop by this release."""
    state = json.loads((workdir / name / "train_state" / "state.json").read_text("utf-8"))
    assert state["step"] == 10
    config = config_from_dict(state["config"])
    config.train.max_iters = 14
    resumed = train(config, resume=True, log=lambda _: None)
    assert resumed.step == 14
    config.train.out = "again"
    whole = train(config, log=lambda _: None)
    losses = [[r.get("val_loss") for r in run.history if "val_loss" in r] for run in (resumed, whole)]
    assert len(losses[1]) >= 3 and not any(math.isnan(x) for x in losses[1])
    assert losses[0][-1] == pytest.approx(losses[1][-1], abs=1e-4)
    a, b = (load_checkpoint(workdir / out)[0].state_dict() for out in (name, "again"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in b)


def test_v1_classifier_state_resumes_with_its_flat_settings_read(workdir, monkeypatch):
    """A classifier's version-1 training state (one flat config) resumes under today's sectioned
    settings: the same data and model are recognised, another vocabulary is refused by name."""
    from lmforge.classification.training import train_classifier
    from lmforge.config import classifier_run
    from lmforge.errors import UserError

    shutil.copy(V1.parent / "sst2-dev-sample.tsv", workdir / "sst2-dev-sample.tsv")
    (workdir / "sub").mkdir()  # the saved paths are relative to a folder beside the data
    saved = json.loads((workdir / "classifier" / "train_state" / "state.json").read_text("utf-8"))
    assert saved["step"] == 13 and saved["config"]["train_path"] == "../sst2-dev-sample.tsv"
    settings = {"data.path": "../sst2-dev-sample.tsv", "data.val_path": "../sst2-dev-sample.tsv",
                "data.vocab_size": 300, "model.n_embd": 16, "model.hidden_size": 16, "train.epochs": 2,
                "train.out": "../classifier", "train.device": "cpu", "train.progress": False}  # fmt: skip
    monkeypatch.chdir(workdir / "sub")
    with pytest.raises(UserError, match="Cannot resume .*: data.vocab_size differ"):
        train_classifier(
            classifier_run({**settings, "data.vocab_size": 301}), resume=True, log=lambda _: None
        )
    result = train_classifier(classifier_run(settings), resume=True, log=lambda _: None)
    assert result["steps"] == 26 and 0.5 <= result["best_val_accuracy"] <= 1.0
    state = json.loads((workdir / "classifier" / "train_state" / "state.json").read_text("utf-8"))
    assert state["step"] == 26 and state["config"]["data"]["path"] == "../sst2-dev-sample.tsv"
