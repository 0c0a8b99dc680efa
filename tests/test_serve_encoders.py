"""`lmforge serve` on an encoder answers OpenAI's /v1/embeddings (mean-pooled, normalised hidden states,
equal to transformers' own), and on a classifier /v1/classify (the probabilities `classify` gives)."""

from __future__ import annotations

import base64
import struct

import pytest
import torch
from fastapi.testclient import TestClient

from lmforge.checkpoint import open_checkpoint
from lmforge.classification.inference import load_classifier, predict
from lmforge.serving.encoders import create_classifier_app, create_embeddings_app
from lmforge.serving.server import ServerSettings

from .conftest import saved_with_random_norms
from .test_pretrained_classifiers import TEXTS, saved_classifier, wordpiece_tokenizer

SETTINGS = ServerSettings(model_name="tiny", allowed_hosts=("testserver",))


@pytest.fixture()
def bert(tmp_path):
    """A tiny random BERT (bare model, as sentence encoders ship) and transformers' copy of it."""
    from transformers import BertConfig, BertModel

    hf_tokenizer = wordpiece_tokenizer(tmp_path / "bert")
    config = BertConfig(vocab_size=len(hf_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=24)  # fmt: skip
    torch.manual_seed(0)
    theirs = BertModel(config, add_pooling_layer=False).eval()

    class Saver:
        def save(self, path):
            hf_tokenizer.save_pretrained(tmp_path / "bert")

    saved_with_random_norms(theirs, tmp_path / "bert", Saver())
    return tmp_path / "bert", theirs, hf_tokenizer


def test_embeddings_are_transformers_mean_pooled_hidden_states(bert):
    folder, theirs, hf_tokenizer = bert
    model, tokenizer = open_checkpoint(folder).load()
    client = TestClient(create_embeddings_app(model.eval(), tokenizer, SETTINGS))
    answer = client.post("/v1/embeddings", json={"input": TEXTS, "model": "tiny"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    got = torch.tensor([row["embedding"] for row in body["data"]])
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = theirs(**batch).last_hidden_state
    mask = batch.attention_mask[:, :, None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (got - expected).abs().max() < 1e-5
    assert [row["index"] for row in body["data"]] == list(range(len(TEXTS)))
    assert body["usage"]["prompt_tokens"] == int(batch.attention_mask.sum())
    # base64 (what OpenAI's own client asks for) holds the same numbers; `dimensions` cuts and renormalises.
    packed = client.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert torch.allclose(torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw)), got[0], atol=1e-6)
    short = client.post("/v1/embeddings", json={"input": TEXTS[0], "dimensions": 8}).json()["data"][0][
        "embedding"
    ]
    assert len(short) == 8 and abs(sum(x * x for x in short) - 1) < 1e-5


def test_the_openai_client_reads_the_embeddings(bert):
    from openai import OpenAI

    folder, _, _ = bert
    model, tokenizer = open_checkpoint(folder).load()
    client = TestClient(create_embeddings_app(model.eval(), tokenizer, SETTINGS))
    openai = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)
    answer = openai.embeddings.create(model="tiny", input=["the movie was great", "awful actors"])
    direct = client.post("/v1/embeddings", json={"input": ["the movie was great", "awful actors"]}).json()
    got, expected = (
        torch.tensor([d.embedding for d in answer.data]),
        torch.tensor([d["embedding"] for d in direct["data"]]),
    )
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(
    "body, message",
    [({"input": []}, "must not be empty"), ({"input": [""]}, "empty string"), ({"input": [[1, 99999]]}, "token id"),
     ({"input": "good", "dimensions": 4096}, "at most 32"), ({"input": [[5] * 30]}, "longer than")],
)  # fmt: skip
def test_bad_embedding_requests_are_one_clear_400(bert, body, message):
    folder, _, _ = bert
    model, tokenizer = open_checkpoint(folder).load()
    answer = TestClient(create_embeddings_app(model.eval(), tokenizer, SETTINGS)).post(
        "/v1/embeddings", json=body
    )
    assert answer.status_code == 400
    assert message in answer.json()["error"]["message"]


def test_a_classifier_serves_its_labels_and_probabilities(tmp_path):
    saved_classifier("roberta", tmp_path / "c")
    model, tokenizer, labels = load_classifier(tmp_path / "c")
    client = TestClient(create_classifier_app(model, tokenizer, labels, SETTINGS))
    body = client.post("/v1/classify", json={"input": TEXTS}).json()
    expected = predict(model, tokenizer, TEXTS)
    for row, probabilities in zip(body["data"], expected.tolist(), strict=True):
        assert row["label"] == labels[max(range(len(labels)), key=probabilities.__getitem__)]
        assert list(row["probabilities"].values()) == pytest.approx(probabilities, abs=1e-5)
    assert client.post("/v1/classify", json={"input": ["  "]}).status_code == 400
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
