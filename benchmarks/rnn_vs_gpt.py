"""LSTM against GPT on tiny Shakespeare (character level) at equal wall-clock budgets.

For each budget, each model first times 40 steps to size its run, then trains with
its learning-rate schedule fitted to that many steps and a hard time limit. Reports
the final validation loss (fixed windows; the whole split for the last weights),
tokens/s and parameters. Results: benchmarks/results/rnn_vs_gpt.json.

    python benchmarks/rnn_vs_gpt.py                     # budgets of 1 and 3 minutes
    python benchmarks/rnn_vs_gpt.py --budgets 120 300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = {"gpt": "shakespeare-char", "lstm": "shakespeare-char-lstm"}


def run(preset: str, overrides: dict, out: str):
    import lmforge
    from lmforge.config import apply_overrides

    config = apply_overrides(
        lmforge.load_preset(preset),
        {**overrides, "train.out": out, "train.progress": False, "train.sample_tokens": 0},
    )
    return lmforge.train(config, overwrite=True, log=lambda _: None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[60, 180], help="seconds")
    parser.add_argument("--output", default=str(RESULTS / "rnn_vs_gpt.json"))
    args = parser.parse_args()

    from lmforge.device import set_threads
    from lmforge.models import build_model

    set_threads(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        step_time = {}
        for name, preset in MODELS.items():
            # Time steps 20-60 of a run from the difference of two runs, after a throwaway run
            # that pays the one-off costs (data preparation, first kernels), so that start-up
            # does not shrink the real run.
            times = []
            for n in (5, 20, 60):
                result = run(
                    preset,
                    {"train.max_iters": n, "train.eval_interval": 1000, "train.final_full_eval": False},
                    f"{tmp}/{name}-calibrate-{n}",
                )
                times.append(result.elapsed_s)
            step_time[name] = (times[2] - times[1]) / 40
            if step_time[name] <= 0:  # a noisy machine: fall back to the whole 60-step run
                step_time[name] = times[2] / 60
            print(f"  {name}: {step_time[name] * 1000:.0f} ms/step", flush=True)
        for budget in args.budgets:
            for name, preset in MODELS.items():
                # 10% of the budget is left for the five evaluations; the time limit is the backstop.
                steps = max(50, int(budget / step_time[name] * 0.9))
                result = run(
                    preset,
                    {
                        "train.max_iters": steps,
                        "train.max_time_s": budget,
                        "train.eval_interval": max(1, steps // 5),
                    },
                    f"{tmp}/{name}-{budget}",
                )
                import lmforge

                model = build_model(lmforge.load_checkpoint(f"{tmp}/{name}-{budget}")[2].model)
                rows.append(
                    {
                        "budget_s": budget,
                        "model": name,
                        "preset": preset,
                        "steps": result.step,
                        "val_loss": result.final_val_loss,
                        "best_val_loss": result.best_val_loss,
                        "val_loss_full_split": result.full_val_loss,
                        "elapsed_s": result.elapsed_s,
                        "tokens_per_s": result.tokens_per_s,
                        "params": sum(p.numel() for p in model.parameters()),
                    }
                )
                r = rows[-1]
                print(
                    f"  {budget:.0f}s {name}: {r['steps']} steps, val {r['val_loss']:.4f} "
                    f"(whole split {r['val_loss_full_split']:.4f}), {r['tokens_per_s']:.0f} tok/s",
                    flush=True,
                )
    print("\n| budget | model | parameters | steps | tokens/s | val loss | val loss, whole split |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['budget_s'] / 60:g} min | {r['model']} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
            f"{r['tokens_per_s']:.0f} | {r['val_loss']:.4f} | {r['val_loss_full_split']:.4f} |"
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"benchmark": "rnn_vs_gpt", "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    sys.exit(main())
