"""Does a short Optuna search beat the hand-tuned default? Tiny Shakespeare, same step budget.

    1. the default preset (shakespeare-char) trained for --steps steps: its validation loss
    2. `lmforge tune` over the optimizer's settings (space below), --trials trials of the same
       --steps steps each (TPE sampler, median pruning from the evaluations)
    3. the best trial's validation loss against the default's (same validation windows)

    python benchmarks/tune_shakespeare.py [--trials 20] [--steps 300]

Data: tiny Shakespeare from ../shared/data (or $LMFORGE_DATA_DIR). Writes
benchmarks/results/tune_shakespeare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SPACE = """
[optim.lr]
low = 1e-3
high = 3e-2
log = true

[optim.warmup_iters]
low = 0
high = 100

[optim.wsd_decay_frac]
low = 0.1
high = 0.7

[optim.beta2]
choices = [0.95, 0.99, 0.999]

[optim.weight_decay]
low = 0.0
high = 0.3
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--steps", type=int, default=300, help="the budget of the default run and of each trial"
    )
    parser.add_argument("--output", default=str(RESULTS / "tune_shakespeare.json"))
    args = parser.parse_args()
    os.environ.setdefault("LMFORGE_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

    from lmforge.config import apply_overrides, load_preset
    from lmforge.training.trainer import train
    from lmforge.tune import TuneSettings, tune

    with tempfile.TemporaryDirectory() as tmp:
        budget = {"train.max_iters": args.steps, "train.eval_interval": max(1, args.steps // 5),
                  "train.sample_tokens": 0, "train.progress": False, "train.final_full_eval": False}  # fmt: skip
        base = apply_overrides(load_preset("shakespeare-char"), budget)
        default_config = apply_overrides(base, {"train.out": str(Path(tmp) / "default")})
        default = train(default_config, log=lambda _: None)
        print(f"default: validation loss {default.best_val_loss:.4f} in {default.elapsed_s:.1f}s", flush=True)
        space = Path(tmp) / "space.toml"
        space.write_text(SPACE)
        start = time.perf_counter()
        found = tune(base, space, TuneSettings(out=str(Path(tmp) / "study"), trials=args.trials),
                     log=lambda m: print(m, flush=True))  # fmt: skip
        search_s = time.perf_counter() - start
        trials = json.loads((Path(tmp) / "study" / "trials.json").read_text())
    out = {
        "benchmark": "tune_shakespeare",
        "machine": machine_info(),
        "steps_per_run": args.steps,
        "space": SPACE.strip(),
        "default_val_loss": round(default.best_val_loss, 4),
        "default_seconds": round(default.elapsed_s, 1),
        "best_val_loss": round(found["best_value"], 4),
        "best_params": found["best_params"],
        "tuned_beats_default": found["best_value"] <= default.best_val_loss,
        "trials": args.trials,
        "completed": found["completed"],
        "pruned": found["pruned"],
        "search_seconds": round(search_s, 1),
        "trial_values": [{"number": t["number"], "state": t["state"], "value": t["value"]} for t in trials],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"default {out['default_val_loss']} vs tuned {out['best_val_loss']} ({found['completed']} completed, "
          f"{found['pruned']} pruned, {search_s:.0f}s); wrote {args.output}")  # fmt: skip


if __name__ == "__main__":
    main()
