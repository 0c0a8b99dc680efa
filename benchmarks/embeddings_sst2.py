"""Word vectors as a head start: a BiLSTM sentiment classifier on SST-2 whose word embedding
starts from Word2Vec vectors, against the same classifier from random vectors, same budget.

    1. `lmforge embeddings train` skip-gram vectors on the SST-2 training sentences plus tiny
       Shakespeare (text only, no labels: what any unlabeled corpus would give)
    2. train-classifier --init-embeddings VECTORS   vs   train-classifier (random init)
       each for the same number of minutes, same seed; accuracy on the whole sst2-dev.tsv

    python benchmarks/embeddings_sst2.py [--minutes 2] [--dim 128]

Data from ../shared/data (or $LMFORGE_DATA_DIR). Writes benchmarks/results/embeddings_sst2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA = Path(os.environ.get("LMFORGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget of each classifier")
    parser.add_argument(
        "--dim", type=int, default=128, help="vector width = the classifier's embedding width"
    )
    parser.add_argument("--vector-epochs", type=int, default=5)
    parser.add_argument("--output", default=str(RESULTS / "embeddings_sst2.json"))
    args = parser.parse_args()

    from lmforge.embeddings import EmbeddingsConfig, train_vectors

    train_tsv, dev_tsv = DATA / "sst2-train.tsv", DATA / "sst2-dev.tsv"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vectors = Path(tmp) / "vectors.txt"
        start = time.perf_counter()
        info = train_vectors([train_tsv, DATA / "tinyshakespeare.txt"], vectors,
                             EmbeddingsConfig(dim=args.dim, epochs=args.vector_epochs))  # fmt: skip
        vector_s = time.perf_counter() - start
        print(f"vectors: {info['words']:,} words x {args.dim} in {vector_s:.1f}s", flush=True)
        for name, init in (("random-init", ""), ("word2vec-init", str(vectors))):
            # Each classifier in a process of its own, as a user runs it (nothing carried between runs).
            run = Path(tmp) / name
            command = [sys.executable, "-m", "lmforge", "train-classifier", "--data", str(train_tsv),
                       "--val", str(dev_tsv), "--out", str(run), "--epochs", "20", "--eval-every", "500",
                       "--max-minutes", str(args.minutes), "--n-embd", str(args.dim), "--quiet"]  # fmt: skip
            if init:
                command += ["--init-embeddings", init]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            print(done.stdout.strip(), flush=True)
            history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            accuracies = [r["val_accuracy"] for r in history if "val_accuracy" in r]
            rows.append({"run": name, "best_val_accuracy": max(accuracies), "first_eval_accuracy": accuracies[0],
                         "steps": history[-1]["step"], "elapsed_s": history[-1]["elapsed_s"],
                         "history": history})  # fmt: skip
    out = {"benchmark": "embeddings_sst2", "machine": machine_info(), "minutes_per_classifier": args.minutes,
           "vectors": {**{k: v for k, v in info.items() if k != "out"}, "seconds": round(vector_s, 1),
                       "corpus": ["sst2-train.tsv (text)", "tinyshakespeare.txt"]},
           "dev": "sst2-dev.tsv", "rows": rows}  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
