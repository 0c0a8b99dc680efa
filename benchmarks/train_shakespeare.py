"""The README's main job, measured: nanoGPT's CPU recipe and the default preset, one run each.

Writes tokens/s, wall time to validation loss 1.886 and final validation loss for both
to benchmarks/results/train_shakespeare.json. (`train_speed.py` is the fuller version:
repeats, the same-architecture fast path, MFU and peak memory.)

    python benchmarks/train_shakespeare.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import train_speed  # noqa: E402

if __name__ == "__main__":
    sys.argv = [
        sys.argv[0],
        "--repeats",
        "1",
        "--runs",
        "baseline",
        "fast",
        "--output",
        str(train_speed.RESULTS / "train_shakespeare.json"),
        *sys.argv[1:],
    ]
    train_speed.main()
