"""The encoder-only family: BERT's masked-language-model objective, training with the shared trainer,
the encoder as a classifier body, and Hugging Face BERT imported with equal logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint, open_checkpoint
from lmforge.classification.inference import load_classifier, predict
from lmforge.classification.training import train_classifier
from lmforge.config import ModelConfig, apply_overrides, classifier_run, load_preset
from lmforge.models import build_model
from lmforge.models.encoder import MASK_TOKEN, mask_tokens
from lmforge.training.trainer import train

from .conftest import SST2_SAMPLE, saved_with_random_norms


def test_masking_follows_bert_and_the_loss_counts_only_masked_positions():
    ids = torch.randint(3, 100, (64, 128))
    special = torch.tensor([0, 1])
    ids[:, 0] = 0  # a special token is never chosen
    inputs, targets = mask_tokens(ids, mask_id=2, vocab_size=100, generator=torch.Generator().manual_seed(0),
                                  special=special)  # fmt: skip
    chosen = targets != -100
    assert 0.13 < chosen.float().mean() < 0.17 and not chosen[:, 0].any()
    assert torch.equal(targets[chosen], ids[chosen])
    as_mask = (inputs[chosen] == 2).float().mean()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean()
    assert 0.77 < as_mask < 0.83 and 0.08 < unchanged < 0.13  # (10% kept, and a random draw may hit the same)
    assert torch.equal(inputs[~chosen], ids[~chosen])
    model = build_model(
        ModelConfig(arch="encoder", vocab_size=100, block_size=128, n_layer=1, n_head=2, n_embd=16)
    )
    logits, loss = model(inputs, targets)
    by_hand = F.cross_entropy(logits[chosen], ids[chosen])
    assert torch.allclose(loss, by_hand, atol=1e-6)


def test_padding_does_not_change_the_features_of_real_tokens():
    model = build_model(ModelConfig(arch="encoder", vocab_size=50, block_size=16, n_layer=2, n_head=2,
                                    n_embd=16)).eval()  # fmt: skip
    ids = torch.randint(0, 50, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model.features(ids, torch.tensor([6]))
        with_padding = model.features(padded, torch.tensor([6]))
    assert torch.allclose(alone, with_padding[:, :6], atol=1e-5)


def test_mlm_preset_trains_and_its_body_classifies(tmp_path, shakespeare_excerpt):
    config = apply_overrides(load_preset("mlm-shakespeare"), {
        "data.path": str(shakespeare_excerpt), "data.vocab_size": 300, "model.n_layer": 2, "model.n_embd": 32,
        "model.block_size": 32, "train.max_iters": 60, "train.eval_interval": 30, "train.batch_size": 16,
        "train.out": str(tmp_path / "mlm"), "train.progress": False, "train.device": "cpu"})  # fmt: skip
    result = train(config, log=lambda _: None)
    first, last = (r["val_loss"] for r in (result.history[0], result.history[-1]) if "val_loss" in r)
    assert last < first < 6.5  # it learns (log 301 = 5.7 at the start)
    model, tokenizer, saved = load_checkpoint(tmp_path / "mlm")
    assert saved.model.arch == "encoder" and tokenizer.hf.token_to_id(MASK_TOKEN) == tokenizer.vocab_size - 1
    # The encoder as the body of a sentiment classifier.
    cfg = classifier_run({"data.path": str(SST2_SAMPLE), "data.val_path": str(SST2_SAMPLE), "train.out": str(tmp_path / "clf"), "init.checkpoint": str(tmp_path / "mlm"), "train.epochs": 1, "train.batch_size": 16, "train.progress": False, "train.device": "cpu"})  # fmt: skip
    scores = train_classifier(cfg, log=lambda _: None)
    assert scores["steps"] == 25  # 400 examples, batch 16, one epoch
    body = open_checkpoint(tmp_path / "clf").metadata["body"]
    assert (body["arch"], body["n_layer"], body["n_embd"], body["vocab_size"]) == ("encoder", 2, 32, 301)
    classifier, _, labels = load_classifier(tmp_path / "clf")
    assert isinstance(classifier.body, type(model)) and labels == ["0", "1"]
    probabilities = predict(classifier, tokenizer, ["a gorgeous film", "dull and lifeless"])
    assert probabilities.shape == (2, 2) and torch.allclose(probabilities.sum(1), torch.ones(2))


def test_hugging_face_bert_imports_with_equal_logits(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from lmforge.tokenizers import train_word_tokenizer

    tokenizer = train_word_tokenizer([SST2_SAMPLE.read_text("utf-8")], vocab_size=200)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40)  # fmt: skip
    torch.manual_seed(0)
    theirs = BertForMaskedLM(config).eval()
    saved_with_random_norms(theirs, tmp_path / "bert", tokenizer)
    ours, _ = open_checkpoint(tmp_path / "bert").load()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 12))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 8:] = False
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=valid.long()).logits
        got, _ = ours.eval()(ids, valid=valid)
    assert (expected[0] - got[0]).abs().max() < 1e-4
    assert (expected[1, :8] - got[1, :8]).abs().max() < 1e-4  # (padding positions' outputs are unused)


@pytest.mark.parametrize("bad", [{"hidden_act": "relu"}, {"position_embedding_type": "relative_key"}])
def test_bert_variants_it_cannot_run_are_refused(tmp_path, bad):
    from lmforge.errors import UserError
    from lmforge.interop.bert import model_config_from_bert

    hf = {"vocab_size": 10, "num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8, **bad}
    with pytest.raises(UserError, match="not supported"):
        model_config_from_bert(hf, "config.json")
