import json
import math

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.evaluation import bleu_chrf, classification_metrics, evaluate_text, rouge
from lmforge.evaluation.perplexity import sliding_windows, token_nll
from lmforge.evaluation.run import evaluate
from lmforge.tokenizers import train_char_tokenizer
from lmforge.training.trainer import train

from .conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from .conftest import SHAKESPEARE

    root = tmp_path_factory.mktemp("evalrun")
    text = root / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:30000])
    cfg = tiny_config(root / "run", text, **{"train.max_iters": 30})
    result = train(cfg, log=lambda _: None)
    return root / "run", result


def straightforward_nll(model, ids, context):
    """Independent reference: each token predicted from up to `context` tokens of the most
    recent non-overlapping block, one token at a time."""
    total = 0.0
    for t in range(1, len(ids)):
        block_start = ((t - 1) // context) * context
        inputs = torch.tensor([ids[block_start:t]])
        logits, _ = model(inputs)
        total -= F.log_softmax(logits[0, -1].double(), -1)[ids[t]].item()
    return total


def test_perplexity_is_exp_of_mean_nll_from_a_straightforward_loop(tiny_checkpoint):
    from lmforge.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(tiny_checkpoint[0])
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    ids = tokenizer.encode(text)
    report = evaluate_text(model, tokenizer, text, context=16, stride=16, batch_size=3)
    reference = straightforward_nll(model, ids, 16)
    assert report.tokens == len(ids) - 1
    assert report.nll_sum == pytest.approx(reference, rel=1e-5)
    assert report.perplexity == pytest.approx(math.exp(reference / (len(ids) - 1)), rel=1e-5)


def test_strides_score_every_token_exactly_once():
    for n, context, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 16), (5, 16, 3), (64, 8, 1)]:
        scored = []
        for begin, end, first in sliding_windows(n, context, stride):
            assert end - begin - 1 <= context
            assert first - begin >= min(first, context - stride + 1) or begin == 0
            scored.extend(range(first, end))
        assert scored == list(range(1, n)), (n, context, stride)
    with pytest.raises(UserError, match="^stride must be between 1 and the context"):
        sliding_windows(10, 4, 5)


def test_smaller_strides_give_more_context_and_never_count_twice(tiny_checkpoint):
    from lmforge.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(tiny_checkpoint[0])
    ids = tokenizer.encode("First Citizen:\nWe are accounted poor citizens, the patricians good.\n" * 3)
    wide = token_nll(model, ids, 16, 16)
    narrow = token_nll(model, ids, 16, 4)
    assert wide.shape == narrow.shape == (len(ids) - 1,)
    assert torch.equal(wide[:16], narrow[:16])  # the first window is the same
    assert narrow.sum() < wide.sum()  # more context helps a trained model


def test_bits_per_byte_and_per_char_follow_their_definitions():
    text = "héllo wörld — ünïcödé ✓\n" * 4
    tok = train_char_tokenizer([text])

    class Uniform(torch.nn.Module):
        block_size = 8

        def forward(self, idx):
            return torch.zeros(*idx.shape, tok.vocab_size), None

    report = evaluate_text(Uniform(), tok, text, context=8)
    scored = text[1:]
    expected_bits = (len(text) - 1) * math.log2(tok.vocab_size)
    assert report.bits_per_char == pytest.approx(expected_bits / len(scored))
    assert report.bits_per_byte == pytest.approx(expected_bits / len(scored.encode()))
    assert report.bytes > report.characters  # multi-byte characters counted as bytes


def test_bleu_and_chrf_match_sacrebleu_and_its_documented_example():
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    scores = bleu_chrf(hyps, refs)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, refs).score)
    assert round(scores["bleu"], 2) == 48.53
    assert [round(p, 1) for p in scores["bleu_precisions"]] == [82.4, 50.0, 45.5, 37.5]
    assert round(scores["bleu_brevity_penalty"], 3) == 0.943
    assert round(scores["chrf"], 2) == 59.73
    assert scores["bleu_signature"].startswith("nrefs:2|")


def test_rouge_and_length_mismatch():
    scores = rouge(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert scores == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    partial = rouge(["the cat"], [["the cat sat"]])
    assert partial["rouge1"] == pytest.approx(100 * 2 * (1.0 * 2 / 3) / (1 + 2 / 3))
    with pytest.raises(UserError, match="Reference set 1 has 1 lines but there are 2 hypotheses"):
        bleu_chrf(["a", "b"], [["a"]])


def test_accuracy_macro_f1_and_confusion_matrix_on_a_hand_made_case():
    preds = ["pos", "pos", "neg", "neg", "pos", "neu"]
    gold = ["pos", "neg", "neg", "neg", "pos", "pos"]
    m = classification_metrics(preds, gold)
    assert m["labels"] == ["neg", "neu", "pos"]
    assert m["confusion_matrix"] == [[2, 0, 1], [0, 0, 0], [0, 1, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: neg p=1 r=2/3 -> 0.8; neu 0; pos p=2/3 r=2/3 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 0 + 2 / 3) / 3)


def test_eval_agrees_with_the_training_log(tiny_checkpoint):
    out, result = tiny_checkpoint
    report = evaluate(out.parent / "run")
    # The checkpoint holds the best weights; with a steadily improving run those are the last.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss_full"] == pytest.approx(result.full_val_loss, abs=1e-5)
    if result.best_val_loss == pytest.approx(result.final_val_loss):
        assert report["loss"] == pytest.approx(result.full_val_loss, abs=1e-4)
    assert report["bits_per_char"] == pytest.approx(
        report["loss"] / math.log(2) * report["tokens"] / report["characters"]
    )


def test_eval_cli_table_json_and_errors(tiny_checkpoint, tmp_path, capsys):
    out, _ = tiny_checkpoint
    assert main(["eval", str(out), "--json", "--output", str(tmp_path / "r.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert main(["eval", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", str(out), "--data", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    hyp, ref = tmp_path / "h.txt", tmp_path / "r.txt"
    hyp.write_text("the cat sat on the mat\nthe dog ran in the park\n")
    ref.write_text("the cat sat on the mat\n")
    assert main(["eval", "--hyp", str(hyp), "--ref", str(ref)]) == 2
    assert "Reference set 1 has 1 lines but there are 2" in capsys.readouterr().err
    assert main(["eval", "--hyp", str(hyp), "--ref", str(hyp), "--metric", "meteor"]) == 2
    assert "Unknown metric 'meteor'" in capsys.readouterr().err
    assert main(["eval", "--hyp", str(hyp), "--ref", str(hyp), "--metric", "bleu,chrf,rouge,accuracy"]) == 0
    table = capsys.readouterr().out
    assert "BLEU            100.00" in table and "accuracy        1.0000" in table
