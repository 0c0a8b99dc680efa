"""Sentiment classification on SST-2: a BiLSTM from scratch, and a classifier initialised
from a language model pre-trained on the SST-2 training sentences themselves.

Trains on ../shared/data/sst2-train.tsv (or $LMFORGE_DATA_DIR), evaluates on sst2-dev.tsv,
each within a CPU time budget, and writes accuracy, macro-F1 and time to
benchmarks/results/classify_sst2.json.

    python benchmarks/classify_sst2.py --minutes 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=4.0, help="time budget of each classifier")
    parser.add_argument(
        "--pretrain-minutes", type=float, default=3.0, help="language-model pre-training budget"
    )
    parser.add_argument("--output", default=str(RESULTS / "classify_sst2.json"))
    args = parser.parse_args()

    import lmforge
    from lmforge.classification.training import train_classifier
    from lmforge.config import apply_overrides, classifier_run

    data = Path(os.environ.get("LMFORGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    train_tsv, dev_tsv = data / "sst2-train.tsv", data / "sst2-dev.tsv"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        scratch = train_classifier(
            classifier_run(
                {
                    "data.path": str(train_tsv),
                    "data.val_path": str(dev_tsv),
                    "train.out": f"{tmp}/scratch",
                    "train.epochs": 4,
                    "train.eval_interval": 500,
                    "train.max_time_s": args.minutes * 60,
                    "train.progress": False,
                    "train.device": "cpu",
                }
            )
        )
        rows.append(
            {
                "run": "bilstm-scratch",
                "val_accuracy": scratch["best_val_accuracy"],
                "steps": scratch["steps"],
                "elapsed_s": time.perf_counter() - start,
                "history": scratch["history"],
            }
        )
        print(
            f"  BiLSTM from scratch: accuracy {scratch['best_val_accuracy']:.4f} "
            f"in {rows[-1]['elapsed_s']:.0f}s",
            flush=True,
        )

        # A word-level LSTM language model on the training sentences (text only), then --init from it.
        corpus = Path(tmp) / "sst2-sentences.txt"
        lines = train_tsv.read_text("utf-8").split("\n")[1:]
        corpus.write_text("\n".join(line.split("\t")[0] for line in lines if line.strip()) + "\n")
        start = time.perf_counter()
        lm_config = apply_overrides(
            lmforge.load_preset("shakespeare-word-lstm"),
            {
                "data.path": str(corpus),
                "data.vocab_size": 16000,
                "data.min_frequency": 1,
                "model.tie_embeddings": False,
                "model.hidden_size": 256,
                "model.n_layer": 1,
                "train.out": f"{tmp}/lm",
                "train.max_iters": 100000,
                "train.max_time_s": args.pretrain_minutes * 60,
                "train.progress": False,
                "train.sample_tokens": 0,
                "train.eval_interval": 500,
            },
        )
        lm = lmforge.train(lm_config, log=lambda _: None)
        pretrain_s = time.perf_counter() - start
        start = time.perf_counter()
        init = train_classifier(
            classifier_run(
                {
                    "data.path": str(train_tsv),
                    "data.val_path": str(dev_tsv),
                    "train.out": f"{tmp}/init",
                    "init.checkpoint": f"{tmp}/lm",
                    "train.epochs": 4,
                    "train.eval_interval": 500,
                    "train.max_time_s": args.minutes * 60,
                    "train.progress": False,
                    "train.device": "cpu",
                    "optim.lr": 2e-3,
                }
            )
        )
        rows.append(
            {
                "run": "lstm-lm-init",
                "val_accuracy": init["best_val_accuracy"],
                "steps": init["steps"],
                "elapsed_s": time.perf_counter() - start,
                "pretrain_s": pretrain_s,
                "pretrain_val_loss": lm.best_val_loss,
                "history": init["history"],
            }
        )
        print(
            f"  from the LM (pre-trained {pretrain_s:.0f}s, val loss {lm.best_val_loss:.3f}): accuracy "
            f"{init['best_val_accuracy']:.4f} in {rows[-1]['elapsed_s']:.0f}s",
            flush=True,
        )

    print("\n| run | dev accuracy | training time (s) |")
    print("|---|---|---|")
    for r in rows:
        extra = f" (+{r['pretrain_s']:.0f}s LM pre-training)" if "pretrain_s" in r else ""
        print(f"| {r['run']} | {r['val_accuracy']:.2%} | {r['elapsed_s']:.0f}{extra} |")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"benchmark": "classify_sst2", "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    sys.exit(main())
