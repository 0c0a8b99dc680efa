"""Differentially private training (DP-SGD through Opacus): the reported ε is the accountant's,
the runs still learn, checkpoints load as ordinary models, unsupported settings are named."""

import json

import pytest
import torch

from lmforge.classification.inference import load_classifier, predict
from lmforge.classification.training import train_classifier
from lmforge.cli import main
from lmforge.config import ClassifierRunConfig, PrivacyConfig, classifier_run
from lmforge.training.privacy import plan
from lmforge.training.trainer import train

from .conftest import tiny_config
from .test_classify import toy  # noqa: F401  (fixture)


def opacus_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε the way Opacus' own privacy engine accounts it: one accountant step per optimizer step."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
    return accountant.get_epsilon(delta)


def classifier_config(train_path, dev_path, out, **privacy) -> ClassifierRunConfig:
    return classifier_run({"data.path": str(train_path), "data.val_path": str(dev_path), "train.out": str(out), "train.epochs": 6, "train.batch_size": 8, "optim.lr": 2e-2, "train.eval_interval": 12, "train.progress": False, "train.device": "cpu", **{f"privacy.{k}": v for k, v in privacy.items()}})  # fmt: skip


def test_private_classifier_reports_the_accountants_epsilon_and_still_learns(tmp_path, toy):  # noqa: F811
    train_path, dev_path = toy  # 96 examples, batches of 8: sampling rate 1/12
    result = train_classifier(classifier_config(train_path, dev_path, tmp_path / "dp", noise_multiplier=0.8),
                              log=lambda _: None)  # fmt: skip
    assert result["steps"] == 72 and result["best_val_accuracy"] >= 0.875  # learns despite the noise
    records = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # every evaluation says how much privacy has been spent so far
        expected = opacus_epsilon(0.8, 8 / 96, record["step"], 1e-5)
        assert record["epsilon"] == pytest.approx(expected, abs=1e-4)
    assert [r["epsilon"] for r in records] == sorted(r["epsilon"] for r in records)
    saved = json.loads((tmp_path / "dp" / "config.json").read_text())["privacy"]
    assert saved["delta"] == 1e-5 and saved["noise_multiplier"] == 0.8
    assert saved["epsilon"] == pytest.approx(opacus_epsilon(0.8, 8 / 96, saved["steps"], 1e-5), abs=1e-4)
    # The BiLSTM trained through Opacus' DPLSTM loads as the ordinary model, same names, same outputs.
    model, tokenizer, labels = load_classifier(tmp_path / "dp")
    assert isinstance(model.body.rnn, torch.nn.LSTM)
    assert predict(model, tokenizer, ["a wonderful film"]).shape == (1, 2)


def test_target_epsilon_is_met_at_the_last_step(tmp_path, toy):  # noqa: F811
    train_path, dev_path = toy
    result = train_classifier(classifier_config(train_path, dev_path, tmp_path / "dp", target_epsilon=4.0),
                              log=lambda _: None)  # fmt: skip
    assert result["epsilon"] == pytest.approx(4.0, rel=0.01) and result["epsilon"] <= 4.0 + 1e-3
    privacy = plan(PrivacyConfig(target_epsilon=4.0), examples=96, batch_size=8, steps=72)
    assert opacus_epsilon(privacy.noise_multiplier, 8 / 96, 72, privacy.delta) == pytest.approx(4.0, rel=0.01)


BIAS_FREE = {"model.bias": False, "model.qk_norm": True, "model.pos_encoding": "rope",
             "model.activation": "relu2", "model.tie_embeddings": False}  # the default preset's kind  # fmt: skip


def test_per_example_gradients_are_exact_for_a_bias_free_gpt():
    from opacus import GradSampleModule

    from lmforge.config import Config, apply_overrides
    from lmforge.models import build_model
    from lmforge.training.privacy import _layer_norm_without_bias_grad_sample

    torch.manual_seed(0)
    cfg = apply_overrides(Config(), {**BIAS_FREE, "model.vocab_size": 30, "model.block_size": 8,
                                     "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16}).model  # fmt: skip
    model = build_model(cfg)
    _layer_norm_without_bias_grad_sample()
    private = GradSampleModule(model)
    x, y = torch.randint(0, 30, (3, 8)), torch.randint(0, 30, (3, 8))
    private(x, y)[1].backward()
    per_example = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    private.remove_hooks()
    for i in range(3):  # each example's own gradient, by plain autograd
        model.zero_grad()
        model(x[i : i + 1], y[i : i + 1])[1].backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per_example[name][i], p.grad, atol=1e-6), name


def test_per_example_gradients_stay_exact_when_some_targets_are_unscored():
    """Instruction data scores the replies only; a GPT's head then skips the other positions, which
    would lose the batch axis Opacus needs: make_private keeps the head on every position."""
    from lmforge.config import Config, apply_overrides
    from lmforge.models import build_model
    from lmforge.training.privacy import Privacy, make_private

    torch.manual_seed(0)
    cfg = apply_overrides(Config(), {**BIAS_FREE, "model.vocab_size": 30, "model.block_size": 8,
                                     "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16}).model  # fmt: skip
    model = build_model(cfg)
    privacy = Privacy(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, delta=1e-5, batch_size=3)
    private, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), privacy)
    x, y = torch.randint(0, 30, (3, 8)), torch.randint(0, 30, (3, 8))
    y[:, :5] = -100  # the prompt part
    private(x, y)[1].backward()
    per_example = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    private.remove_hooks()
    for i in range(3):
        model.zero_grad()
        model(x[i : i + 1], y[i : i + 1])[1].backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per_example[name][i], p.grad, atol=1e-6), name


@pytest.mark.parametrize("arch, lr, extra", [("gpt", 3e-3, {}), ("gpt", 3e-3, BIAS_FREE), ("lstm", 2e-2, {})])
def test_private_language_model_learns_and_records_epsilon(tmp_path, shakespeare_excerpt, arch, lr, extra):
    config = tiny_config(tmp_path / "lm", shakespeare_excerpt, **extra, **{"model.arch": arch, "optim.min_lr": 1e-4,
        "train.max_iters": 60, "train.batch_size": 16, "train.eval_interval": 20, "train.eval_batches": 4,
        "train.eval_at_start": True, "optim.lr": lr, "optim.warmup_iters": 5,
        "privacy.noise_multiplier": 0.5, "privacy.max_grad_norm": 1.0})  # fmt: skip
    result = train(config, log=lambda _: None)
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert last < first - 0.5  # it learns
    examples = 54_000 // 16  # (the excerpt's 90% training split) / block size: one example is a window
    assert result.privacy["sample_rate"] == pytest.approx(16 / examples, rel=0.01)
    expected = opacus_epsilon(0.5, result.privacy["sample_rate"], 60, result.privacy["delta"])
    assert result.privacy["epsilon"] == pytest.approx(expected, abs=1e-4)
    saved = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert saved["privacy"]["steps"] == saved["step"]
    from lmforge.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(tmp_path / "lm")  # Opacus' layers trained it; the ordinary model loads it
    if arch == "lstm":
        assert type(model.rnn) is torch.nn.LSTM


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--optim.optimizer", "muon"], "needs a single optimizer"),
        (["--train.grad_accum", "2"], "needs train.grad_accum 1"),
        (["--privacy.noise_multiplier", "1.0"], "not both"),
        (["--privacy.target_epsilon", "-1"], "privacy.target_epsilon must be at least 0"),
    ],
)
def test_unsupported_private_settings_are_named(tmp_path, shakespeare_excerpt, capsys, flags, message):
    argv = ["train", "--preset", "tiny", "--data", str(shakespeare_excerpt), "--out", str(tmp_path / "o"),
            "--max-iters", "2", "--device", "cpu", "--quiet", "--privacy.target_epsilon", "8", *flags]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_too_few_examples_for_private_training(tmp_path, toy, capsys):  # noqa: F811
    train_path, dev_path = toy
    assert main(["train-classifier", "--data", str(train_path), "--val", str(dev_path), "--out",
                 str(tmp_path / "c"), "--batch-size", "64", "--privacy.noise-multiplier", "1", "--quiet"]) == 2  # fmt: skip
    assert "96 examples for batches of 64" in capsys.readouterr().err
