import json

import pytest
import torch

from lmforge.classification.inference import load_classifier, predict
from lmforge.classification.model import BiLSTMEncoder, ClassifierConfig, pool
from lmforge.classification.training import train_classifier
from lmforge.cli import main
from lmforge.config import classifier_run
from lmforge.data.labeled import read_labeled
from lmforge.errors import UserError
from lmforge.training.trainer import train

from .conftest import SST2_SAMPLE, tiny_config

POSITIVE = [
    "a wonderful film",
    "great acting and a lovely story",
    "i loved it",
    "brilliant and moving",
    "a delight from start to finish",
    "superb",
    "warm , funny and wonderful",
    "great fun",
]
NEGATIVE = [
    "a dull mess",
    "boring and far too long",
    "i hated it",
    "awful acting",
    "a tedious bore",
    "terrible",
    "flat , lifeless and dull",
    "a waste of time",
]


def write_toy(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{lb}\n" for t, lb in rows))
    return path


@pytest.fixture
def toy(tmp_path):
    train_rows = [(t, "pos") for t in POSITIVE] * 6 + [(t, "neg") for t in NEGATIVE] * 6
    val_rows = [(t, "pos") for t in POSITIVE[:4]] + [(t, "neg") for t in NEGATIVE[:4]]
    return write_toy(tmp_path / "train.tsv", train_rows), write_toy(tmp_path / "dev.tsv", val_rows)


def toy_run(tmp_path, toy, settings: dict, out: str = "clf"):
    """A classifier run on the toy data into tmp_path/out: batches of 8, on the CPU, quiet."""
    return classifier_run({"data.path": str(toy[0]), "data.val_path": str(toy[1]), "train.out": str(tmp_path / out),
                           "train.batch_size": 8, "train.progress": False, "train.device": "cpu", **settings})  # fmt: skip


def test_bilstm_learns_a_separable_task_and_classifies(tmp_path, toy):
    result = train_classifier(
        toy_run(tmp_path, toy, {"train.epochs": 8, "optim.lr": 1e-2}), log=lambda _: None
    )
    assert result["best_val_accuracy"] == 1.0 and result["labels"] == ["neg", "pos"]
    model, tokenizer, labels = load_classifier(tmp_path / "clf")
    probs = predict(model, tokenizer, ["a wonderful and lovely film", "boring , dull and awful"])
    assert [labels[i] for i in probs.argmax(-1)] == ["pos", "neg"]
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert saved["task"] == "classification" and saved["labels"] == ["neg", "pos"]
    assert (tmp_path / "clf" / "loss.png").exists()


def test_transformer_body_from_scratch(tmp_path, toy):
    gpt = {"model.body": "gpt", "model.n_embd": 32, "model.n_layer": 1, "model.pooling": "mean"}
    result = train_classifier(
        toy_run(tmp_path, toy, {"train.epochs": 8, "optim.lr": 3e-3, **gpt}), log=lambda _: None
    )
    assert result["best_val_accuracy"] >= 0.875
    model, _, _ = load_classifier(tmp_path / "clf")
    assert model.cfg.body == "lm" and model.body.config.arch == "gpt"


def test_init_from_a_language_model_reuses_its_tokenizer_and_body(tmp_path, toy, shakespeare_excerpt):
    train(tiny_config(tmp_path / "lm", shakespeare_excerpt), log=lambda _: None)
    settings = {"init.checkpoint": str(tmp_path / "lm"), "train.epochs": 6, "optim.lr": 3e-3}
    result = train_classifier(toy_run(tmp_path, toy, settings), log=lambda _: None)
    assert result["best_val_accuracy"] >= 0.75
    model, tokenizer, _ = load_classifier(tmp_path / "clf")
    assert tokenizer.kind == "char" and model.cfg.body == "lm"

    # Only the first block of the body: trained, saved and reloaded with one block.
    assert len(model.body.blocks) == 2
    one = toy_run(tmp_path, toy, {**settings, "init.layers": 1, "train.epochs": 1}, out="clf1")
    assert train_classifier(one, log=lambda _: None)["best_val_accuracy"] > 0
    small, tokenizer, _ = load_classifier(tmp_path / "clf1")
    assert len(small.body.blocks) == 1 and small.body.config.n_layer == 1
    probs = predict(small, tokenizer, ["a fine day", "a grim night"])
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))
    with pytest.raises(UserError, match="init_layers is 3 but .* has 2 blocks"):
        train_classifier(
            toy_run(tmp_path, toy, {**settings, "init.layers": 3}, out="clf3"),
            log=lambda _: None,
        )


def test_frozen_embeddings_stay_as_the_language_model_had_them(tmp_path, toy, shakespeare_excerpt):
    from lmforge.checkpoint import load_checkpoint

    train(tiny_config(tmp_path / "lm", shakespeare_excerpt), log=lambda _: None)
    lm, _, _ = load_checkpoint(tmp_path / "lm")
    frozen = {
        "init.checkpoint": str(tmp_path / "lm"),
        "init.freeze_embeddings": True,
        "train.epochs": 2,
        "optim.lr": 3e-3,
    }
    train_classifier(toy_run(tmp_path, toy, frozen), log=lambda _: None)
    model, _, _ = load_classifier(tmp_path / "clf")
    assert torch.equal(model.body.wte.weight, lm.wte.weight)  # the token embedding: untouched
    assert not torch.equal(
        model.body.blocks[0].mlp.c_fc.weight, lm.blocks[0].mlp.c_fc.weight
    )  # the rest: trained


def test_batches_grouped_by_length_visit_every_example_once_with_less_padding():
    from lmforge.classification.training import ExampleSource

    lengths = torch.randint(1, 60, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    encoded = [[i] * n for i, n in enumerate(lengths)]  # every token of example i is i: rows are traceable
    targets = torch.zeros(1000, dtype=torch.long)

    def one_epoch(grouped: bool) -> tuple[list[int], list[int], int]:
        source = ExampleSource(encoded, targets, 16, 0, torch.device("cpu"), None, dict, grouped)
        rows, sizes, padded = [], [], 0
        for _ in range(63):  # 62 batches of 16 and one of 8
            ids, batch_lengths, _ = source.next_batch()
            rows += ids[:, 0].tolist()
            sizes.append(len(ids))
            padded += ids.numel()
        return rows, sizes, padded

    grouped_rows, grouped_sizes, grouped_padded = one_epoch(True)
    random_rows, random_sizes, random_padded = one_epoch(False)
    assert sorted(grouped_rows) == sorted(random_rows) == list(range(1000))
    assert grouped_sizes == random_sizes == [16] * 62 + [8]
    assert grouped_padded < 0.6 * random_padded  # random batches pad to their longest example
    assert sum(lengths) <= grouped_padded < 1.1 * sum(lengths)


def test_packed_sequences_equal_unpadded_single_examples():
    torch.manual_seed(0)
    body = BiLSTMEncoder(ClassifierConfig(vocab_size=20, n_embd=8, hidden_size=6)).eval()
    seqs = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    ids = torch.zeros(3, 5, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([5, 2, 3])
    batched = pool(body.features(ids, lengths), lengths, "mean")
    for i, s in enumerate(seqs):
        alone = pool(body.features(torch.tensor([s]), torch.tensor([len(s)])), torch.tensor([len(s)]), "mean")
        assert torch.allclose(batched[i], alone[0], atol=1e-6)


def test_reads_sst2_and_jsonl_with_string_labels(tmp_path):
    texts, labels = read_labeled(SST2_SAMPLE)
    assert len(texts) == 400 and set(labels) == {"0", "1"}
    assert texts[0] == "the expressive power of the camera" and labels[0] == "1"  # trailing space stripped
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(
        '{"review": "nice", "sentiment": "positive"}\n{"review": "bad", "sentiment": "negative"}\n'
    )
    assert read_labeled(jsonl) == (["nice", "bad"], ["positive", "negative"])


@pytest.mark.parametrize(
    "content, message",
    [
        ("words\tlabel\nhello\t1\n", "has no text column"),
        ("sentence\tstars\nhello\t1\n", "has no label column"),
        ("sentence\tlabel\nhello\t\n", "train.tsv:2 has an empty label"),
        ("", "is empty"),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "train.tsv"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_labeled(path)


def test_single_class_and_unknown_labels_are_refused(tmp_path, toy):
    train_path, _ = toy
    one = write_toy(tmp_path / "one.tsv", [("good", "pos"), ("fine", "pos")])
    with pytest.raises(UserError, match="a single class"):
        train_classifier(
            classifier_run({"data.path": str(one), "train.out": str(tmp_path / "o")}), log=lambda _: None
        )
    odd = write_toy(tmp_path / "odd.tsv", [("meh", "neutral")])
    with pytest.raises(UserError, match="'neutral' that do not occur"):
        train_classifier(
            classifier_run(
                {"data.path": str(train_path), "data.val_path": str(odd), "train.out": str(tmp_path / "o")}
            ),
            log=lambda _: None,
        )


def test_cli_train_classify_and_eval(tmp_path, toy, capsys):
    train_path, dev_path = toy
    out = tmp_path / "clf"
    assert (
        main(
            [
                "train-classifier",
                "--data",
                str(train_path),
                "--val",
                str(dev_path),
                "--out",
                str(out),
                "--epochs",
                "8",
                "--batch-size",
                "8",
                "--lr",
                "1e-2",
                "--quiet",
                "--device",
                "cpu",
                "--class-weights",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["classify", str(out), "--text", "a lovely , wonderful film", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["label"] == "pos" and set(line["probabilities"]) == {"neg", "pos"}
    assert main(["eval", str(out), "--data", str(dev_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == 1.0 and report["confusion_matrix"] == [[4, 0], [0, 4]]
    odd = write_toy(tmp_path / "odd.tsv", [("meh", "neutral")])
    assert main(["eval", str(out), "--data", str(odd)]) == 2
    assert "'neutral' that the classifier was not trained on" in capsys.readouterr().err
    assert main(["generate", str(out)]) == 2
    assert "is a text classifier" in capsys.readouterr().err
    assert main(["train-classifier", "--data", str(train_path), "--out", str(tmp_path / "f"), "--freeze-embeddings",
                 "--no-group-by-length", "--quiet"]) == 2  # fmt: skip
    assert "freeze_embeddings keeps pretrained embeddings fixed" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_classifier_training_resumes_exactly_after_an_interruption(tmp_path, toy):
    from lmforge.errors import TrainingInterrupted
    from lmforge.weights import read_tensors

    train_path, dev_path = toy

    def config(out, **changes):
        return classifier_run(
            {
                **changes,
                "data.path": str(train_path),
                "data.val_path": str(dev_path),
                "train.out": str(out),
                "train.epochs": 3,
                "train.batch_size": 8,
                "optim.lr": 1e-2,
                "train.eval_interval": 4,
                "train.progress": False,
                "train.device": "cpu",
            }
        )

    straight, resumed = [], []
    train_classifier(
        config(tmp_path / "a"), log=lambda _: None, on_step=lambda s, loss: straight.append(loss)
    )

    def stop_at_10(step, loss):
        resumed.append(loss)
        if step == 10:  # mid-epoch (12 steps an epoch) and between evaluations
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as stopped:
        train_classifier(config(tmp_path / "b"), log=lambda _: None, on_step=stop_at_10)
    assert stopped.value.step == 10 and stopped.value.resumable
    result = train_classifier(
        config(tmp_path / "b"), log=lambda _: None, resume=True, on_step=lambda s, loss: resumed.append(loss)
    )
    assert result["steps"] == 36 and resumed == straight  # the same batches in the same order
    a = read_tensors(tmp_path / "a" / "train_state" / "model.safetensors")
    b = read_tensors(tmp_path / "b" / "train_state" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(4, 37, 4))  # no record lost or doubled by the interruption
    with pytest.raises(UserError, match="There is no classifier training to resume"):
        train_classifier(config(tmp_path / "c"), log=lambda _: None, resume=True)
    # Other data (or another model) is named, not a mismatch of the saved tensors' shapes.
    other = config(tmp_path / "b")
    other.data.path, other.data.vocab_size = str(dev_path), 77
    with pytest.raises(
        UserError, match="Cannot resume .*: data.path, data.vocab_size differ from the saved run's"
    ):
        train_classifier(other, log=lambda _: None, resume=True)


@pytest.mark.parametrize(
    "change, message",
    [  # the ranges and rules of the optim and train sections are a language model run's own
        ({"train.epochs": 0}, "train.epochs must be at least 1, not 0"),
        ({"optim.lr": float("nan")}, "optim.lr must be above 0"),
        ({"train.patience": -1}, "train.patience must be at least 0"),
        ({"optim.weight_decay": -0.1}, "optim.weight_decay must be at least 0"),
        ({"train.max_time_s": -5.0}, "train.max_time_s must be at least 0"),
        ({"optim.min_lr": 0.5}, r"optim.min_lr \(0.5\) must not exceed optim.lr"),
        ({"optim.schedule": "linear"}, "optim.schedule must be cosine, wsd or constant"),
        ({"train.loggers": "wandb"}, "wandb"),
        ({"model.dropout": 1.0}, "model.dropout must be at least 0 and below 1"),
        (
            {"init.freeze_embeddings": True},
            "init.freeze_embeddings keeps pretrained embeddings fixed: give init",
        ),
        ({"train.max_iters": 5}, "Unknown classifier setting 'train.max_iters'; valid keys: train.out, "),
        ({"optim.lr": "fast"}, "optim.lr must be float, not 'fast'"),
    ],
)
def test_classifier_settings_are_checked_before_any_work(tmp_path, toy, change, message):
    with pytest.raises(UserError, match=message):
        cfg = classifier_run({"data.path": str(toy[0]), "train.out": str(tmp_path / "o"), **change})
        train_classifier(cfg, log=lambda _: None)
    assert not (tmp_path / "o").exists()


def test_a_classifier_run_holds_and_shows_only_the_settings_that_apply(tmp_path, toy, capsys):
    """The same sections as a language model's run; train settings of language models alone are
    neither shown nor saved, and one set in Python is refused by name; privacy and init appear when
    used."""
    cfg = classifier_run({"data.path": str(toy[0]), "optim.lr": "0.01"})
    shown = cfg.to_dict()
    assert list(shown) == ["data", "model", "optim", "train"]
    assert shown["optim"]["lr"] == 0.01 and shown["optim"]["min_lr"] == pytest.approx(0.001)
    assert (
        "max_iters" not in shown["train"] and "dtype" not in shown["train"] and shown["train"]["epochs"] == 3
    )
    used = classifier_run({"data.path": "x", "privacy.target_epsilon": 4, "init.checkpoint": "lm"}).to_dict()
    assert used["privacy"]["target_epsilon"] == 4.0 and used["init"]["checkpoint"] == "lm"
    cfg.train.dtype, cfg.train.out = "bfloat16", str(tmp_path / "o")
    with pytest.raises(UserError, match="train.dtype does not apply to a classifier run"):
        train_classifier(cfg, log=lambda _: None)
    # The command line: any setting as --section.field, printed at the start and kept in the state
    out = tmp_path / "clf"
    assert main(["train-classifier", "--data", str(toy[0]), "--val", str(toy[1]), "--out", str(out), "--epochs", "1",
                 "--optim.beta2", "0.95", "--train.threads", "1", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "[optim] optimizer=adamw lr=0.002 min_lr=0.0002" in printed and "beta2=0.95" in printed
    assert "max_iters" not in printed and "[privacy]" not in printed
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["config"]["optim"]["beta2"] == 0.95 and state["config"]["train"]["threads"] == 1
    assert main(["train", "--train.epochs", "2", "--out", str(tmp_path / "lm")]) == 2
    assert "train.epochs does not apply to a GPT" in capsys.readouterr().err


def test_a_time_budget_sets_the_schedules_length():
    from lmforge.training.optim import BudgetHorizon

    def horizon(budget_s, step, spent_s, first_step=0):
        h = BudgetHorizon(budget_s, 1000)
        h(first_step, 0.0, now=100.0)  # the clock starts at this process's first step
        return h(step, spent_s, now=100.0 + spent_s)

    assert horizon(0.0, 50, 10.0) == 1000  # no budget: the epochs' steps
    assert horizon(60.0, 5, 1.0) == 1000  # too early to tell
    assert horizon(60.0, 50, 10.0) == 300  # 5 steps/s for 60 s
    assert horizon(6000.0, 50, 10.0) == 1000  # never beyond the epochs
    assert horizon(60.0, 50, 100.0) == 51  # over budget already: the schedule ends now
    # a resumed run: 400 steps done in an earlier process, 50 more in 10 s, 30 s of the 60 left
    h = BudgetHorizon(60.0, 1000)
    h(400, 30.0, now=0.0)
    assert h(450, 40.0, now=10.0) == 450 + 100  # 5 steps/s for the 20 s left


def test_the_automatic_validation_split_keeps_every_label_in_training(tmp_path):
    """Held out per label (about 10% each): a rare label keeps examples to learn from, and the
    validation examples never hold a label that training lacks."""
    from lmforge.classification.training import _held_out

    labels = ["common"] * 50 + ["rare"] * 3 + ["once"]
    held = _held_out(labels, seed=0)
    kept = [labels[i] for i in range(len(labels)) if i not in held]
    assert {labels[i] for i in held} <= set(kept) and set(kept) == {"common", "rare", "once"}
    assert sum(labels[i] == "common" for i in held) == 5 and len(held) == 5
    assert _held_out(["a", "b", "b"], seed=0) == {1} or _held_out(["a", "b", "b"], seed=0) == {2}
    with pytest.raises(UserError, match="Too few examples to hold any out"):
        _held_out(["a", "b"], seed=0)
