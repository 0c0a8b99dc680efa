"""What differential privacy costs: a BiLSTM sentiment classifier on SST-2 trained with and without
DP-SGD (Opacus), same settings and time budget; accuracy on the whole sst2-dev.tsv, steps per
second, and the ε spent.

    python benchmarks/privacy_sst2.py [--minutes 3] [--epsilon 8] [--batch-size 64]

Data from ../shared/data (or $LMFORGE_DATA_DIR). Writes benchmarks/results/privacy_sst2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA = Path(os.environ.get("LMFORGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget of each run")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target ε of the private run")
    parser.add_argument(
        "--epochs", type=int, default=2, help="planned epochs (the target ε is for all of them)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--output", default=str(RESULTS / "privacy_sst2.json"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, privacy in (("no privacy", []), (f"DP-SGD target ε={args.epsilon:g}",
                                                    ["--privacy.target_epsilon", str(args.epsilon)])):  # fmt: skip
            run = Path(tmp) / name.split()[0]
            command = [sys.executable, "-m", "lmforge", "train-classifier", "--data", str(DATA / "sst2-train.tsv"),
                       "--val", str(DATA / "sst2-dev.tsv"), "--out", str(run), "--epochs", str(args.epochs),
                       "--batch-size", str(args.batch_size), "--vocab-size", str(args.vocab_size), "--lr",
                       str(args.lr), "--eval-every", "200", "--max-minutes", str(args.minutes), "--quiet",
                       *privacy]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr)
            print(done.stdout.strip(), flush=True)
            history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            last = history[-1]
            rows.append({"run": name, "best_val_accuracy": max(r["val_accuracy"] for r in history),
                         "steps": last["step"], "elapsed_s": last["elapsed_s"],
                         "steps_per_s": round(last["step"] / last["elapsed_s"], 2),
                         "epsilon": last.get("epsilon"),
                         "privacy": json.loads((run / "config.json").read_text()).get("privacy"),
                         "history": history})  # fmt: skip
    out = {"benchmark": "privacy_sst2", "machine": machine_info(), "minutes_per_run": args.minutes,
           "settings": {"batch_size": args.batch_size, "vocab_size": args.vocab_size, "lr": args.lr,
                        "planned_epochs": args.epochs, "target_epsilon": args.epsilon},
           "rows": rows}  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    for row in rows:
        print(f"{row['run']}: accuracy {row['best_val_accuracy']:.4f}, {row['steps_per_s']} steps/s, "
              f"ε {row['epsilon']}")  # fmt: skip


if __name__ == "__main__":
    main()
