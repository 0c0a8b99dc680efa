"""Word vectors: gensim training through `lmforge embeddings`, lookups, and models started from them."""

import json
import random

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.embeddings import (
    EmbeddingsConfig,
    analogy,
    init_embedding,
    load_vectors,
    neighbors,
    train_vectors,
)
from lmforge.errors import UserError
from lmforge.tokenizers import train_word_tokenizer

from .test_classify import toy  # noqa: F401  (fixture)

ANIMALS = ["cat", "dog", "horse", "cow"]
VEHICLES = ["car", "truck", "bus", "train"]


@pytest.fixture
def corpus(tmp_path):
    """Animals and vehicles in contexts of their own: each group's words should end up neighbours."""
    rng = random.Random(0)
    lines = []
    for _ in range(600):
        lines.append(f"the {rng.choice(ANIMALS)} eats grass and sleeps in the barn .")
        lines.append(f"a {rng.choice(VEHICLES)} drives on the road with its engine running .")
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_trains_vectors_and_finds_neighbours(tmp_path, corpus, capsys):
    out = tmp_path / "vectors.txt"
    assert main(["embeddings", "train", str(corpus), "--out", str(out), "--dim", "16", "--min-count", "1",
                 "--epochs", "20", "--workers", "1", "--window", "3"]) == 0  # fmt: skip
    assert "Wrote" in capsys.readouterr().out
    header = out.read_text().split("\n", 1)[0].split()
    assert int(header[1]) == 16 and int(header[0]) == len(load_vectors(out))
    assert main(["embeddings", "neighbors", str(out), "--word", "cat", "--topn", "3"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 3
    scores = [float(line.split()[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert lines[0].split()[1] in ANIMALS  # the nearest word to an animal is an animal
    assert main(["embeddings", "train", str(corpus), "--out", str(out)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


def test_binary_format_and_analogy_arithmetic(tmp_path, corpus):
    out = tmp_path / "vectors.bin"
    train_vectors([corpus], out, EmbeddingsConfig(dim=12, min_count=1, epochs=5, workers=1))
    assert (
        out.read_bytes()[:20].split(b"\n")[0].split()[1] == b"12"
    )  # word2vec binary: text header, then bytes
    vectors = load_vectors(out)
    best, score = analogy(vectors, ["car", "cat"], ["dog"], topn=1)[0]
    unit = {w: vectors[w] / np.linalg.norm(vectors[w]) for w in vectors.index_to_key}
    query = unit["car"] + unit["cat"] - unit["dog"]
    query /= np.linalg.norm(query)
    expected = max((w for w in unit if w not in ("car", "cat", "dog")), key=lambda w: unit[w] @ query)
    assert best == expected and score == pytest.approx(float(unit[expected] @ query), abs=1e-5)


def test_glove_text_without_header_is_read(tmp_path, capsys):
    glove = tmp_path / "glove.6B.3d.txt"
    glove.write_text("king 1 0 0\nqueen 0.9 0.1 0\napple 0 0 1\n")
    vectors = load_vectors(glove)
    assert len(vectors) == 3 and vectors.vector_size == 3
    assert neighbors(vectors, "King", topn=1)[0][0] == "queen"  # looked up in lower case as well
    assert main(["embeddings", "neighbors", str(glove), "--word", "pear"]) == 2
    assert "'pear' has no vector" in capsys.readouterr().err
    broken = tmp_path / "broken.txt"
    broken.write_text("2 3\nking 1 0\n")
    with pytest.raises(UserError, match="is not a word2vec or GloVe vectors file"):
        load_vectors(broken)


def test_init_embedding_copies_known_words_and_keeps_the_rest():
    tokenizer = train_word_tokenizer(["the cat sat on the mat", "a dog"], vocab_size=100)
    vocab = tokenizer.hf.get_vocab()
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(tokenizer.vocab_size, 3)
    before = embedding.weight.detach().clone()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.txt"
        path.write_text("3 3\nCat 1 2 3\ndog -1 0 1\nzebra 5 5 5\n")
        info = init_embedding(embedding, tokenizer, path)
        assert info["covered"] == 2 and info["vocabulary"] == tokenizer.vocab_size
        assert info["coverage"] == pytest.approx(2 / tokenizer.vocab_size)
        for word, vector in (("cat", [1.0, 2.0, 3.0]), ("dog", [-1.0, 0.0, 1.0])):
            row = embedding.weight[vocab[word]].detach()
            cosine = torch.nn.functional.cosine_similarity(row, torch.tensor(vector), dim=0)
            assert cosine.item() == pytest.approx(1.0, abs=1e-6)  # the vector, rescaled
        others = [i for w, i in vocab.items() if w not in ("cat", "dog")]
        assert torch.equal(embedding.weight[others], before[others])
        with pytest.raises(UserError, match="3-dimensional vectors but the model's embedding is 4 wide"):
            init_embedding(torch.nn.Embedding(tokenizer.vocab_size, 4), tokenizer, path)


def test_classifier_and_word_level_lm_start_from_vectors(tmp_path, toy, corpus, shakespeare_excerpt, capsys):  # noqa: F811
    train_path, dev_path = toy
    vectors = tmp_path / "v.txt"
    train_vectors([train_path, corpus], vectors, EmbeddingsConfig(dim=32, min_count=1, epochs=3, workers=1))
    out = tmp_path / "clf"
    argv = ["train-classifier", "--data", str(train_path), "--val", str(dev_path), "--out", str(out),
            "--epochs", "4", "--batch-size", "8", "--lr", "0.01", "--n-embd", "32", "--quiet",
            "--init-embeddings", str(vectors)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Initialised" in printed and "vocabulary entries" in printed
    assert json.loads((out / "config.json").read_text())["val_accuracy"] >= 0.75
    assert main([*argv[:-3], "--n-embd", "48", "--init-embeddings", str(vectors), "--overwrite"]) == 2
    assert "set the embedding width to 32. (command line: --n-embd)" in capsys.readouterr().err

    text_vectors = tmp_path / "w.txt"
    train_vectors(
        [shakespeare_excerpt], text_vectors, EmbeddingsConfig(dim=32, min_count=1, epochs=1, workers=1)
    )
    lm_argv = ["train", "--preset", "tiny", "--data", str(shakespeare_excerpt), "--tokenizer", "word",
               "--data.vocab_size", "2000", "--model.n_embd", "32", "--model.block_size", "16",
               "--max-iters", "4", "--train.eval_interval", "2", "--train.eval_batches", "1",
               "--train.sample_tokens", "0", "--device", "cpu", "--quiet", "--out", str(tmp_path / "lm"),
               "--init-embeddings", str(text_vectors)]  # fmt: skip
    assert main(lm_argv) == 0
    printed = capsys.readouterr().out
    covered = int(printed.split("Initialised ")[1].split(" of ")[0].replace(",", ""))
    assert covered > 1500  # the vocabulary is made of the same text's words


def test_corpus_problems_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_vectors([tmp_path / "missing.txt"], tmp_path / "v.txt", EmbeddingsConfig())
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(UserError, match="no words to train vectors on"):
        train_vectors([empty], tmp_path / "v.txt", EmbeddingsConfig())
    rare = tmp_path / "rare.txt"
    rare.write_text("one two three\n")
    with pytest.raises(UserError, match="lower --min-count"):
        train_vectors([rare], tmp_path / "v.txt", EmbeddingsConfig(min_count=5))
    assert not (tmp_path / "v.txt").exists()


def test_a_tsv_corpus_needs_only_a_text_column(tmp_path, capsys):
    corpus = tmp_path / "texts.tsv"
    corpus.write_text("id\tbody\n1\tthe cat sat\n2\tthe dog sat\n")
    out = tmp_path / "v.txt"
    assert main(["embeddings", "train", str(corpus), "--out", str(out), "--min-count", "1"]) == 2
    assert "has no text column" in capsys.readouterr().err  # named, with the columns it has
    assert main(["embeddings", "train", str(corpus), "--out", str(out), "--min-count", "1", "--dim", "8",
                 "--workers", "1", "--text-column", "body"]) == 0  # fmt: skip
    assert set(load_vectors(out).index_to_key) == {"the", "cat", "dog", "sat"}
