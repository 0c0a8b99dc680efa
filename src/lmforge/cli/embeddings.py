"""`lmforge embeddings`: word vectors (train, neighbors, analogies)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.errors import UserError
from lmforge.io import check_output


def add_embeddings_parser(sub) -> None:
    p = sub.add_parser(
        "embeddings",
        help="train word vectors (Word2Vec) and query them",
        description="Word vectors with gensim: train skip-gram or CBOW vectors on text, list a word's "
        "neighbors, solve analogies. Use them to start a model with --init-embeddings.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    t = actions.add_parser("train", help="train vectors on text files (TSV/CSV/JSONL: the text column)")
    t.add_argument("corpus", nargs="+", help="text files, one sentence per line")
    t.add_argument("--out", default="out/vectors.txt", help="word2vec text format; a .bin name writes binary")
    defaults = embeddings_defaults()
    t.add_argument("--method", choices=["skipgram", "cbow"], default=defaults.method)
    for name in ("dim", "window", "min_count", "epochs", "negative", "seed", "workers"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    t.add_argument("--lowercase", action="store_true", help="fold words to lower case")
    t.add_argument(
        "--text-column",
        default="",
        help="TSV/CSV/JSONL corpora: the text column (default: text/sentence/...)",
    )
    t.add_argument("--overwrite", action="store_true")
    n = actions.add_parser("neighbors", help="the words nearest to a word")
    n.add_argument("vectors", help="word2vec text/binary or GloVe text file")
    n.add_argument("--word", required=True)
    n.add_argument("--topn", type=int, default=10)
    a = actions.add_parser("analogy", help="a - b + c: --positive king woman --negative man")
    a.add_argument("vectors")
    a.add_argument("--positive", nargs="+", required=True)
    a.add_argument("--negative", nargs="*", default=[])
    a.add_argument("--topn", type=int, default=5)


def embeddings_defaults():
    from lmforge.embeddings import EmbeddingsConfig

    return EmbeddingsConfig()


def cmd_embeddings(args: argparse.Namespace) -> int:
    from lmforge import embeddings

    if args.action == "train":
        check_output(args.out, "file", "out")
        if Path(args.out).exists() and not args.overwrite:
            raise UserError(f"{args.out} already exists; pass --overwrite or choose another --out.")
        cfg = embeddings.EmbeddingsConfig(method=args.method, dim=args.dim, window=args.window,
                                          min_count=args.min_count, epochs=args.epochs, negative=args.negative,
                                          lowercase=args.lowercase, seed=args.seed, workers=args.workers,
                                          text_column=args.text_column)  # fmt: skip
        info = embeddings.train_vectors(args.corpus, args.out, cfg)
        print(f"Wrote {info['out']}: {info['words']:,} words x {info['dim']} ({cfg.method}, "
              f"{info['corpus_words']:,} words of text in {info['sentences']:,} lines).")  # fmt: skip
        return 0
    if args.topn < 1:
        raise UserError("--topn must be at least 1.")
    vectors = embeddings.load_vectors(args.vectors)
    if args.action == "neighbors":
        found = embeddings.neighbors(vectors, args.word, args.topn)
    else:
        found = embeddings.analogy(vectors, args.positive, args.negative, args.topn)
    for word, similarity in found:
        print(f"{similarity:.4f}  {word}")
    return 0
