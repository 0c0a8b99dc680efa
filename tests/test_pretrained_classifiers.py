"""Pretrained sequence classifiers (BERT, DistilBERT, RoBERTa ...ForSequenceClassification) open as
lmforge text classifiers: tiny random models that transformers builds give the same probabilities
through `classify` and the same accuracy through `eval`; the tokenizer frames texts as transformers
does; damaged folders are one clear error."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.classification.inference import load_classifier, predict
from lmforge.cli import main
from lmforge.config import classifier_run
from lmforge.errors import UserError

from .conftest import saved_with_random_norms

WORDS = "the a movie film was is good great bad awful boring fun not very plot actors love hate it".split()
TEXTS = ["the movie was great", "a very boring film", "not good , not fun", "i love it !", "awful actors"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def wordpiece_tokenizer(folder):
    """A BERT WordPiece tokenizer (vocab.txt) over a few words, as transformers' fast tokenizer."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "!", ",", "##s", "##ing", "i"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    assert len(tokenizer) == len(vocab)
    return tokenizer


def tiny_classifier(kind: str, vocab_size: int):
    import transformers

    common = dict(vocab_size=vocab_size, max_position_embeddings=24, id2label=LABELS,
                  label2id={v: k for k, v in LABELS.items()}, pad_token_id=0)  # fmt: skip
    if kind == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, **common)
        model = transformers.DistilBertForSequenceClassification(config)
    else:
        sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
        if kind == "bert":
            model = transformers.BertForSequenceClassification(transformers.BertConfig(**sizes, **common))
        else:  # RoBERTa numbers positions from pad_token_id + 1
            model = transformers.RobertaForSequenceClassification(
                transformers.RobertaConfig(**sizes, **common)
            )
    return model.eval()


def saved_classifier(kind: str, folder):
    hf_tokenizer = wordpiece_tokenizer(folder)
    torch.manual_seed(0)
    model = tiny_classifier(kind, len(hf_tokenizer))

    class Saver:  # saved_with_random_norms writes tokenizer.json through .save
        def save(self, path):
            hf_tokenizer.save_pretrained(folder)

    saved_with_random_norms(model, folder, Saver())
    return model, hf_tokenizer


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
def test_probabilities_equal_transformers(kind, tmp_path):
    theirs, hf_tokenizer = saved_classifier(kind, tmp_path / kind)
    model, tokenizer, labels = load_classifier(tmp_path / kind)
    assert labels == ["negative", "neutral", "positive"]
    assert model.cfg.pooling == "first" and model.cfg.special_tokens
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert int((batch.input_ids == hf_tokenizer.unk_token_id).sum()) == 0  # every word is in the vocabulary
    assert tokenizer.encode_framed(TEXTS, 24) == hf_tokenizer(TEXTS).input_ids
    with torch.no_grad():
        expected = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.softmax(-1)
    got = predict(model, tokenizer, TEXTS)
    assert (expected - got).abs().max() < 1e-5


def test_a_folder_with_only_vocab_txt_tokenizes_as_transformers(tmp_path):
    _, hf_tokenizer = saved_classifier("bert", tmp_path / "c")
    (tmp_path / "c" / "tokenizer.json").unlink()
    _, tokenizer, _ = load_classifier(tmp_path / "c")
    assert (
        tokenizer.encode_framed([*TEXTS, "The MOVIES"], 24) == hf_tokenizer([*TEXTS, "The MOVIES"]).input_ids
    )


def test_a_long_text_is_cut_inside_its_frame(tmp_path):
    _, hf_tokenizer = saved_classifier("bert", tmp_path / "c")
    _, tokenizer, _ = load_classifier(tmp_path / "c")
    text = " ".join(WORDS * 3)
    framed = tokenizer.encode_framed([text], 10)[0]
    assert framed == hf_tokenizer(text, truncation=True, max_length=10).input_ids
    assert len(framed) == 10 and framed[-1] == hf_tokenizer.sep_token_id


def test_classify_and_eval_commands_on_a_distilbert_folder(tmp_path, capsys):
    theirs, hf_tokenizer = saved_classifier("distilbert", tmp_path / "c")
    with torch.no_grad():
        batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
        predicted = theirs(**batch).logits.argmax(-1).tolist()
    assert main(["classify", str(tmp_path / "c"), "--json", *sum((["--text", t] for t in TEXTS), [])]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["label"] for row in rows] == [LABELS[i] for i in predicted]
    gold = ["positive", "negative", "negative", "positive", "negative"]
    rows = "".join(f"{t}\t{g}\n" for t, g in zip(TEXTS, gold, strict=True))
    (tmp_path / "labeled.tsv").write_text("sentence\tlabel\n" + rows)
    assert main(["eval", str(tmp_path / "c"), "--data", str(tmp_path / "labeled.tsv"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    accuracy = sum(LABELS[p] == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
    assert scored["accuracy"] == pytest.approx(accuracy) and scored["examples"] == len(TEXTS)


def test_a_classifier_without_labels_or_weights_is_one_clear_error(tmp_path, capsys):
    saved_classifier("bert", tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "id2label": {}}))
    assert main(["classify", str(tmp_path / "c"), "--text", "good"]) == 2
    assert "names no labels" in capsys.readouterr().err
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "c" / "model.safetensors")
    del tensors["classifier.weight"]
    save_file(tensors, tmp_path / "c" / "model.safetensors")
    with pytest.raises(UserError, match="classifier.weight is missing"):
        load_classifier(tmp_path / "c")


def test_a_translation_model_is_refused_by_classify(tmp_path, capsys):
    from transformers import MarianConfig, MarianMTModel

    from lmforge.tokenizers import train_char_tokenizer

    tokenizer = train_char_tokenizer(["abcdefgh"])
    MarianMTModel(MarianConfig(vocab_size=tokenizer.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                               decoder_ffn_dim=16, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)
                 ).save_pretrained(tmp_path / "m")  # fmt: skip
    tokenizer.save(tmp_path / "m" / "tokenizer.json")
    assert main(["classify", str(tmp_path / "m"), "--text", "abc"]) == 2
    assert "not a classifier" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["distilbert", "roberta"])
def test_distilbert_and_roberta_masked_lms_give_transformers_logits(kind, tmp_path):
    import transformers

    from lmforge.checkpoint import open_checkpoint

    hf_tokenizer = wordpiece_tokenizer(tmp_path / kind)
    sizes = dict(vocab_size=len(hf_tokenizer), max_position_embeddings=24, pad_token_id=0)
    if kind == "distilbert":
        config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, **sizes)
        theirs = transformers.DistilBertForMaskedLM(config)
    else:
        config = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=48, **sizes)  # fmt: skip
        theirs = transformers.RobertaForMaskedLM(config)
    torch.manual_seed(0)
    theirs.eval()

    class Saver:
        def save(self, path):
            hf_tokenizer.save_pretrained(tmp_path / kind)

    saved_with_random_norms(theirs, tmp_path / kind, Saver())
    ours, _ = open_checkpoint(tmp_path / kind).load()
    ids = torch.randint(5, len(hf_tokenizer), (2, 12))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 8:] = False
    ids[1, 8:] = 0  # (padding)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=valid.long()).logits
        got, _ = ours.eval()(ids, valid=valid)
    assert (expected[0] - got[0]).abs().max() < 1e-4
    assert (expected[1, :8] - got[1, :8]).abs().max() < 1e-4


def test_a_classifier_trained_from_a_bert_body_frames_its_texts(tmp_path):
    """train-classifier --init from a Hugging Face BERT: texts framed by [CLS] ... [SEP] as the body was
    trained, the body's weights the starting point; the result classifies."""
    import transformers

    from lmforge.classification.training import train_classifier

    hf_tokenizer = wordpiece_tokenizer(tmp_path / "bert")
    config = transformers.BertConfig(vocab_size=len(hf_tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=24)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    hf_tokenizer.save_pretrained(tmp_path / "bert")
    rows = [("the movie was great", "pos"), ("a very boring film", "neg"), ("i love it !", "pos"),
            ("awful actors", "neg"), ("good fun", "pos"), ("bad plot", "neg")] * 4  # fmt: skip
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    cfg = classifier_run({"data.path": str(tmp_path / "train.tsv"), "data.val_path": str(tmp_path / "train.tsv"), "init.checkpoint": str(tmp_path / "bert"), "train.out": str(tmp_path / "c"), "train.epochs": 1, "train.batch_size": 8})  # fmt: skip
    train_classifier(cfg, log=lambda _: None)
    model, tokenizer, labels = load_classifier(tmp_path / "c")
    assert model.cfg.special_tokens and sorted(labels) == ["neg", "pos"]
    assert predict(model, tokenizer, ["a great movie"]).shape == (1, 2)
