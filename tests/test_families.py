"""The model families: each run's config holds only what applies to its family, a setting of another
family is refused by name, checkpoints are written in format 2, and a command refuses a family it
does not serve in one sentence naming the commands that do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge.checkpoint import load_checkpoint
from lmforge.cli import main
from lmforge.config import apply_overrides, config_from_dict, load_preset, preset_names, validate
from lmforge.errors import UserError
from lmforge.families import FAMILIES, family_of
from lmforge.training.trainer import train

from .conftest import ENG_FRA_SAMPLE, tiny_config

V1 = Path(__file__).resolve().parent / "data" / "v1"
ELSEWHERE = {"hidden_size", "n_encoder_layer", "copy_attention", "source_block_size", "embedding_norm"}


def test_every_arch_has_one_family_and_every_preset_validates():
    archs = [a for f in FAMILIES for a in f.archs]
    assert len(archs) == len(set(archs)) and {"gpt", "lstm", "gru", "rnn", "seq2seq", "encoder"} == set(archs)
    for name in preset_names():
        config = load_preset(name)
        validate(config)
        assert config_from_dict(config.to_dict()) == config  # the compact form reads back whole
    with pytest.raises(UserError, match="Unknown model.arch 'transformer'; available: gpt, lstm"):
        family_of("transformer")


def test_the_default_run_shows_and_saves_only_what_applies():
    saved = load_preset("shakespeare-char").to_dict()
    assert set(saved) == {"name", "description", "data", "model", "optim", "train"}  # no finetune, privacy
    assert not ELSEWHERE & set(saved["model"])
    assert not {"task", "target_path", "source_field", "max_source_tokens"} & set(saved["data"])
    assert "label_smoothing" not in saved["train"] and {"n_head", "rope_theta", "qk_norm"} <= set(
        saved["model"]
    )
    lstm = load_preset("shakespeare-char-lstm").to_dict()["model"]
    assert "hidden_size" in lstm and not {"n_head", "qk_norm", "n_encoder_layer"} & set(lstm)
    pairs = load_preset("eng-fra-translation").to_dict()
    assert {"target_path", "task"} <= set(pairs["data"]) and "text_field" not in pairs["data"]
    assert "label_smoothing" in pairs["train"] and "n_encoder_layer" in pairs["model"]
    used = apply_overrides(load_preset("tiny"), {"finetune.init_from": "x", "privacy.target_epsilon": 8.0})
    assert {"finetune", "privacy"} <= set(used.to_dict())


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.hidden_size", "64", "model.hidden_size does not apply to a GPT decoder .*recurrent"),
        ("model.copy_attention", "true", "model.copy_attention does not apply .*an encoder–decoder"),
        ("data.target_path", "t.txt", "data.target_path does not apply .*source/target pairs"),
        ("train.label_smoothing", "0.1", "train.label_smoothing does not apply .*encoder–decoder"),
    ],
)
def test_a_setting_of_another_family_is_refused_by_name(tmp_path, key, value, message):
    with pytest.raises(UserError, match=message) as caught:
        apply_overrides(load_preset("tiny"), {key: value})
    assert caught.value.settings == (key,)
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), f"--{key}", value])
    assert code == 2 and not (tmp_path / "run").exists()


def test_switching_family_leaves_the_presets_other_settings_behind():
    """`--model.arch lstm` on a GPT preset: the preset's head count does not apply, is not saved, and
    is no error; naming it on the command line is."""
    config = apply_overrides(load_preset("tiny"), {"model.arch": "lstm", "model.hidden_size": 16})
    validate(config)
    assert "n_head" not in config.to_dict()["model"] and config.to_dict()["model"]["hidden_size"] == 16
    with pytest.raises(UserError, match="model.n_head does not apply to a recurrent"):
        apply_overrides(load_preset("tiny"), {"model.arch": "lstm", "model.n_head": 4})


def test_new_checkpoints_are_version_2_with_the_family_fields_alone(tmp_path, shakespeare_excerpt):
    train(tiny_config(tmp_path / "run", shakespeare_excerpt), log=lambda _: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text("utf-8"))
    assert saved["version"] == 2 and not ELSEWHERE & set(saved["config"]["model"])
    assert "finetune" not in saved["config"] and "privacy" not in saved["config"]
    state = json.loads((tmp_path / "run" / "train_state" / "state.json").read_text("utf-8"))
    assert state["config"] == saved["config"]
    model, _, config = load_checkpoint(tmp_path / "run")
    assert config.model.hidden_size == 0 and config.model.n_layer == 2  # left out: at its default


@pytest.mark.parametrize("command", ["generate", "chat", "explain"])
def test_a_command_refuses_a_family_it_does_not_serve_in_one_sentence(tmp_path, capsys, command):
    run = shutil.copytree(V1 / "seq2seq", tmp_path / "seq2seq")
    extra = (
        ["--text", "abc"] if command == "explain" else (["--prompt", "abc"] if command == "generate" else [])
    )
    assert main([command, str(run), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "an encoder–decoder" in err
    assert "`lmforge summarize` or `lmforge translate`" in err and "Traceback" not in err


def test_a_classifier_cannot_start_from_an_encoder_decoder(tmp_path, capsys):
    run = shutil.copytree(V1 / "seq2seq", tmp_path / "seq2seq")
    sample = Path(__file__).resolve().parent / "data" / "sst2-dev-sample.tsv"
    code = main(["train-classifier", "--data", str(sample), "--init", str(run), "--out", str(tmp_path / "c")])
    assert code == 2 and "`lmforge train-classifier` does not work on" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_damaged_version_is_one_clear_error(tmp_path, capsys):
    run = shutil.copytree(V1 / "gpt", tmp_path / "gpt")
    data = json.loads((run / "config.json").read_text("utf-8"))
    (run / "config.json").write_text(json.dumps({**data, "version": "1"}), encoding="utf-8")
    assert main(["generate", str(run), "--max-new-tokens", "3"]) == 2
    assert "its version must be a whole number, not '1'" in capsys.readouterr().err


@pytest.mark.parametrize("family, route", [("encoder", "/v1/embeddings"), ("classifier", "/v1/classify"),
                                           ("gpt", "/v1/chat/completions")])  # fmt: skip
def test_serve_gives_each_family_its_routes(family, route, monkeypatch, capsys):
    """An encoder serves embeddings, a classifier its labels, a language model the OpenAI API and chat."""
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: served.setdefault("app", app))
    assert main(["serve", str(V1 / family), "--port", "0"]) == 0
    paths = {route.path for route in served["app"].routes}
    assert route in paths and ("/" in paths) == (family == "gpt")
    assert route.split(" ")[0] in capsys.readouterr().out or family == "gpt"


def test_finetune_takes_the_families_that_serve_it(tmp_path, shakespeare_excerpt):
    """A recurrent, masked-LM or encoder–decoder base fine-tunes (training continues from its
    weights, on text or on pairs)."""
    common = {"train.max_iters": 2, "train.eval_interval": 2, "finetune.seq_len": 16, "train.device": "cpu",
              "train.sample_tokens": 0, "train.progress": False}  # fmt: skip
    for name in ("lstm", "encoder", "seq2seq"):
        data = ENG_FRA_SAMPLE if name == "seq2seq" else shakespeare_excerpt
        config = apply_overrides(load_preset("finetune"), {**common, "data.path": str(data),
                                                           "finetune.init_from": str(V1 / name),
                                                           "train.out": str(tmp_path / name)})  # fmt: skip
        result = train(config, log=lambda _: None)
        assert result.step == 2 and load_checkpoint(tmp_path / name)[2].model.arch == name
