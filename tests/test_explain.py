"""`lmforge explain`: the numbers behind the figures are checked, not only that files exist."""

import json

import pytest
import torch

from lmforge.classification.inference import predict
from lmforge.classification.training import train_classifier
from lmforge.cli import main
from lmforge.config import ModelConfig, classifier_run
from lmforge.errors import UserError
from lmforge.explain import explain, load_for_explaining
from lmforge.models import build_model
from lmforge.models.gpt import recorded_attention
from lmforge.training.trainer import train

from .conftest import tiny_config
from .test_classify import toy  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from .conftest import SHAKESPEARE

    folder = tmp_path_factory.mktemp("lm")
    text = folder / "text.txt"
    text.write_text(SHAKESPEARE.read_text("utf-8")[:30000])
    grouped_query = {"model.n_head": 4, "model.n_kv_head": 2}
    train(tiny_config(folder / "run", text, **grouped_query), log=lambda _: None)
    return folder / "run"


@pytest.mark.parametrize("kv_heads, pos", [(0, "learned"), (2, "rope")])
def test_kept_attention_is_what_the_fused_kernel_computes(kv_heads, pos):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, block_size=12, n_layer=2, n_head=4, n_kv_head=kv_heads,
                                    n_embd=32, pos_encoding=pos)).eval()  # fmt: skip
    idx = torch.randint(0, 40, (2, 12))
    fused = model(idx)[0]
    with recorded_attention() as recorded:
        explicit = model(idx)[0]
    assert torch.allclose(fused, explicit, atol=1e-5) and len(recorded) == 2
    for probs in recorded:  # (B, heads, T, T)
        assert probs.shape == (2, 4, 12, 12)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 12), atol=1e-6)  # each row a distribution
        assert torch.all(probs.triu(1) == 0)  # causal: no query sees a later key
    model(idx)
    assert len(recorded) == 2  # outside the block nothing more is recorded


def test_language_model_explanation_adds_up(lm, tmp_path, capsys):
    model, tokenizer, labels = load_for_explaining(str(lm))
    text = "ROMEO: I will"
    e = explain(model, tokenizer, text, labels, steps=128)
    assert labels is None and e.kind == "language model" and len(e.tokens) == len(text)
    # Completeness of integrated gradients: the attributions add up to the logit's change from the baseline.
    assert sum(e.attributions) == pytest.approx(
        e.output_difference, abs=0.02 * max(1.0, abs(e.output_difference))
    )
    assert e.convergence_delta < 0.02 * max(1.0, abs(e.output_difference))
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        probs = model(ids)[0][0, -1].softmax(-1)
    assert e.decision == tokenizer.decode([int(probs.argmax())])
    assert e.probability == pytest.approx(float(probs.max()), abs=1e-5)
    assert e.top[0][0] == e.decision and e.top[0][1] == pytest.approx(e.probability, abs=1e-6)
    # The per-token losses are the model's own training loss on the text.
    with torch.no_grad():
        _, loss = model(ids[:, :-1], ids[:, 1:])
    losses = e.token_losses
    assert losses[0] is None and sum(losses[1:]) / len(losses[1:]) == pytest.approx(loss.item(), abs=1e-5)
    assert len(e.attention) == 2 and len(e.attention[0]) == 4  # layers, heads
    for head in e.attention[0]:
        assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in head)

    out = tmp_path / "report"
    assert main(["explain", str(lm), "--text", text, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "language model:" in printed and "most influential tokens" in printed
    for name in ("attention.png", "attributions.png", "token_loss.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    page = (out / "explain.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and 'src="http' not in page  # self-contained
    assert page.count('class="tok"') == 2 * len(e.tokens)  # the text twice: attributions, then losses
    saved = json.loads((out / "explain.json").read_text())
    assert saved["tokens"] == e.tokens and saved["decision"] == e.decision
    assert f'title="{saved["attributions"][0]:.4f}">R</span>' in page
    embedded = json.loads(page.split('<script type="application/json" id="data">')[1].split("</script>")[0])
    assert embedded["attributions"] == saved["attributions"]


def test_classifier_explanation_names_the_predicted_label(tmp_path, toy, capsys):  # noqa: F811
    train_path, dev_path = toy
    cfg = classifier_run({"data.path": str(train_path), "data.val_path": str(dev_path), "train.out": str(tmp_path / "clf"), "train.epochs": 6, "train.batch_size": 8, "optim.lr": 1e-2, "train.progress": False, "train.device": "cpu", "model.body": "gpt", "model.n_embd": 32, "model.n_layer": 2, "model.max_length": 16, "model.pooling": "mean"})  # fmt: skip
    train_classifier(cfg, log=lambda _: None)
    model, tokenizer, labels = load_for_explaining(str(tmp_path / "clf"))
    text = "a wonderful and lovely film"
    e = explain(model, tokenizer, text, labels, steps=128)
    assert e.kind == "classifier" and e.decision == labels[int(predict(model, tokenizer, [text]).argmax())]
    assert sum(e.attributions) == pytest.approx(
        e.output_difference, abs=0.02 * max(1.0, abs(e.output_difference))
    )
    assert e.token_losses is None and len(e.attention) == 2
    other = [label for label in labels if label != e.decision][0]
    flipped = explain(model, tokenizer, text, labels, target=other, steps=128)
    assert flipped.decision == other and flipped.probability == pytest.approx(1 - e.probability, abs=1e-5)
    with pytest.raises(UserError, match="is not one of the classifier's labels"):
        explain(model, tokenizer, text, labels, target="maybe")
    assert main(["explain", str(tmp_path / "clf"), "--text", "x " * 40, "--out", str(tmp_path / "r")]) == 2
    assert "reads at most 16" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bilstm_classifier_has_attributions_but_no_attention(tmp_path, toy):  # noqa: F811
    train_path, dev_path = toy
    cfg = classifier_run({"data.path": str(train_path), "data.val_path": str(dev_path), "train.out": str(tmp_path / "clf"), "train.epochs": 2, "train.batch_size": 8, "train.progress": False, "train.device": "cpu"})  # fmt: skip
    train_classifier(cfg, log=lambda _: None)
    model, tokenizer, labels = load_for_explaining(str(tmp_path / "clf"))
    e = explain(model, tokenizer, "boring and dull", labels, steps=512)  # max pooling: a kinked integrand
    assert e.attention is None and len(e.attributions) == 3
    assert sum(e.attributions) == pytest.approx(
        e.output_difference, abs=0.02 * max(1.0, abs(e.output_difference))
    )
