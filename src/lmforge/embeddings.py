"""Word vectors: train them with gensim's Word2Vec, look them up, and start a model from them.

    corpus files ─▶ words (lmforge's word pre-tokenizer) ─▶ gensim Word2Vec (skip-gram | CBOW)
                 ─▶ vectors in the word2vec text (.txt/.vec) or binary (.bin) format
    vectors ─▶ neighbors / analogies (cosine similarity, gensim's KeyedVectors)
    vectors ─▶ init_embedding(model's nn.Embedding, its tokenizer): rows of known words

Words are split exactly as lmforge's word tokenizer splits them (whitespace, then
punctuation), so a vector's key is a token of a word-level model. GloVe's text files (no
header line) are read as well as word2vec's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError, require

TABULAR = (".tsv", ".csv", ".jsonl")


def split_words(text: str) -> list[str]:
    """The words of `text` as lmforge's word tokenizer sees them."""
    from tokenizers import pre_tokenizers

    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return [word for word, _ in splitter.pre_tokenize_str(text)]


def read_sentences(
    paths: list[str | Path], lowercase: bool = False, text_column: str = ""
) -> list[list[str]]:
    """One word list per line of text (per example of a TSV/CSV/JSONL file: its text column)."""
    from lmforge.data.corpus import read_text_file
    from lmforge.data.labeled import read_texts

    sentences: list[list[str]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"The corpus file {path} does not exist.")
        if path.suffix.lower() in TABULAR:
            lines = read_texts(path, text_column or None)
        else:
            lines = read_text_file(path).split("\n")
        for line in lines:
            words = split_words(line.lower() if lowercase else line)
            if words:
                sentences.append(words)
    if not sentences:
        raise UserError(f"{', '.join(map(str, paths))} hold(s) no words to train vectors on.")
    return sentences


@dataclass
class EmbeddingsConfig:
    method: str = "skipgram"  # skipgram | cbow
    dim: int = 100
    window: int = 5
    min_count: int = 2  # rarer words get no vector
    epochs: int = 5
    negative: int = 5  # negative samples per positive pair
    lowercase: bool = False
    text_column: str = ""  # TSV/CSV/JSONL corpora: the column with the text (default: text/sentence/...)
    seed: int = 1337
    workers: int = 0  # 0 = every core


def train_vectors(paths: list[str | Path], out: str | Path, cfg: EmbeddingsConfig) -> dict:
    """Train word vectors on the corpus files and write them to `out` (.bin = binary format)."""
    import os

    require("gensim", "embeddings", "Training word vectors")
    from gensim.models import Word2Vec

    if cfg.method not in ("skipgram", "cbow"):
        raise UserError(
            f"Unknown embedding method {cfg.method!r}; use skipgram or cbow.", settings=("method",)
        )
    for name, value, low in (("dim", cfg.dim, 1), ("window", cfg.window, 1), ("min-count", cfg.min_count, 1),
                             ("epochs", cfg.epochs, 1), ("negative", cfg.negative, 1)):  # fmt: skip
        if value < low:
            raise UserError(f"--{name} must be at least {low}, not {value}.")
    sentences = read_sentences(paths, cfg.lowercase, cfg.text_column)
    model = Word2Vec(
        vector_size=cfg.dim,
        window=cfg.window,
        min_count=cfg.min_count,
        sg=1 if cfg.method == "skipgram" else 0,
        negative=cfg.negative,
        epochs=cfg.epochs,
        seed=cfg.seed,
        workers=cfg.workers or os.cpu_count() or 1,
    )
    model.build_vocab(sentences)
    if len(model.wv) == 0:
        raise UserError(f"No word occurs {cfg.min_count} times in the corpus; lower --min-count.")
    model.train(sentences, total_examples=len(sentences), epochs=cfg.epochs)
    save_vectors(model.wv, out)
    return {
        "out": str(out),
        "words": len(model.wv),
        "dim": cfg.dim,
        "sentences": len(sentences),
        "corpus_words": sum(map(len, sentences)),
    }


def save_vectors(vectors, out: str | Path) -> None:
    """Write KeyedVectors in the word2vec format (binary when the name ends in .bin), atomically."""
    from lmforge.io import atomic_write

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: vectors.save_word2vec_format(tmp, binary=out.suffix == ".bin"))


def load_vectors(path: str | Path):
    """gensim KeyedVectors from a word2vec text or binary file, or a GloVe text file."""
    require("gensim", "embeddings", "Reading word vectors")
    from gensim.models import KeyedVectors

    path = Path(path)
    if not path.is_file():
        raise UserError(f"The vectors file {path} does not exist; make one with `lmforge embeddings train`.")
    binary = path.suffix == ".bin"
    try:
        if binary:
            return KeyedVectors.load_word2vec_format(str(path), binary=True)
        with path.open("rb") as f:
            first = f.readline().split()
        has_header = len(first) == 2 and all(part.isdigit() for part in first)
        return KeyedVectors.load_word2vec_format(str(path), binary=False, no_header=not has_header)
    except (ValueError, UnicodeDecodeError, EOFError, IndexError) as e:
        raise UserError(
            f"{path} is not a word2vec or GloVe vectors file ({e}); give a .txt/.vec text file or a .bin "
            f"word2vec binary file."
        ) from None


def neighbors(vectors, word: str, topn: int = 10) -> list[tuple[str, float]]:
    """The `topn` words nearest to `word` by cosine similarity."""
    return vectors.most_similar(_known(vectors, word), topn=topn)


def analogy(vectors, positive: list[str], negative: list[str], topn: int = 5) -> list[tuple[str, float]]:
    """Words closest to sum(positive) - sum(negative): king - man + woman ≈ queen."""
    return vectors.most_similar(
        positive=[_known(vectors, w) for w in positive],
        negative=[_known(vectors, w) for w in negative],
        topn=topn,
    )


def _known(vectors, word: str) -> str:
    """The word as the file spells it: exactly, else ignoring case (as init_embedding matches)."""
    if word in vectors.key_to_index:
        return word
    for key in vectors.index_to_key:  # most frequent first
        if key.lower() == word.lower():
            return key
    raise UserError(f"{word!r} has no vector (the file has {len(vectors):,} words); try another word.")


def init_embedding(embedding, tokenizer, path: str | Path) -> dict:
    """Copy the vectors of the tokenizer's words into the embedding's rows; returns the coverage.

    Words match exactly, else ignoring case; a token without a vector keeps its random initialisation.
    `embedding` is the model's torch.nn.Embedding.
    """
    import torch

    vectors = load_vectors(path)
    if vectors.vector_size != embedding.embedding_dim:
        raise UserError(
            f"{path} has {vectors.vector_size}-dimensional vectors but the model's embedding is "
            f"{embedding.embedding_dim} wide; set the embedding width to {vectors.vector_size}.",
            settings=("n_embd", "model.n_embd"),
        )
    found = 0
    vocab = list(tokenizer.hf.get_vocab().items())
    folded: dict[str, str] = {}  # lower-cased word -> its most frequent spelling in the file
    for key in vectors.index_to_key:
        folded.setdefault(key.lower(), key)
    # Vectors on the scale of the random rows they replace, so the optimizer's settings still fit.
    scale = embedding.weight.std().item() / max(float(vectors.vectors.std()), 1e-8)
    for token, index in vocab:
        key = token if token in vectors.key_to_index else folded.get(token.lower())
        if key is not None:
            with torch.no_grad():
                embedding.weight[index] = (torch.from_numpy(vectors[key].copy()) * scale).to(embedding.weight)
            found += 1
    if found == 0:
        raise UserError(
            f"None of the model's {len(vocab):,} tokens has a vector in {path}; vectors are looked up by "
            f"word, so they need a word-level tokenizer (data.tokenizer word)."
        )
    return {"vectors": str(path), "covered": found, "vocabulary": len(vocab), "coverage": found / len(vocab)}


def describe_coverage(info: dict) -> str:
    return (
        f"Initialised {info['covered']:,} of {info['vocabulary']:,} vocabulary entries "
        f"({100 * info['coverage']:.1f}%) from {info['vectors']}; the rest keep random vectors."
    )
