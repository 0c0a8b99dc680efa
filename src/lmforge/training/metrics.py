"""What a training run reports: metrics.jsonl, loss.png, and progress on the terminal.

Shared by every trainer (language models, classifiers).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.io import atomic_write, atomic_write_text

LOGGERS = ("csv", "tensorboard")


class CSVLogger:
    """metrics.csv: the records of metrics.jsonl as a table, one column per key seen so far."""

    def __init__(self, path: Path, history: list[dict[str, Any]]):
        self.path, self.rows = path, list(history)
        self._write()

    def log(self, record: dict[str, Any]) -> None:
        self.rows.append(record)
        self._write()  # (rewritten whole: a new key adds a column; a few hundred rows at most)

    def _write(self) -> None:
        import csv
        import io

        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars for TensorBoard (`tensorboard --logdir OUT/tensorboard`), one per numeric key."""

    def __init__(self, folder: Path, history: list[dict[str, Any]], resume_step: int | None):
        from lmforge.errors import require

        require("tensorboard", "tensorboard", "Logging to TensorBoard")
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events after the saved step are purged: they will be logged again.
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            for record in history:
                self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def parse_loggers(spec: str) -> list[str]:
    """'tensorboard,csv' -> the logger names, each checked."""
    from lmforge.errors import UserError

    names = [name.strip().lower() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise UserError(f"Unknown logger {unknown[0]!r}; choose from {', '.join(LOGGERS)} (comma-separated).",
                        settings=("train.loggers", "loggers"))  # fmt: skip
    return names


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended and flushed as training goes,
    and the same records to the chosen loggers (metrics.csv, TensorBoard events).

    On resume, lines logged after the saved state are dropped (they will be logged again),
    and so is a damaged last line (what a full disk or a kill mid-write leaves behind).
    """

    def __init__(self, path: Path, keep_until_step: int | None, write: bool = True, loggers: str = ""):
        self.path = path
        self.history: list[dict[str, Any]] = []
        self.file = None
        self.loggers: list[CSVLogger | TensorBoardLogger] = []
        self.write = write
        self.cut: str = ""  # a cut line found on resume (an interruption while it was written), dropped
        if not write:  # another process writes the file (distributed training)
            return
        if keep_until_step is not None and path.exists():
            for line in path.read_text("utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    self.cut = line
                    break  # a truncated line ends what can be trusted
                if isinstance(record, dict) and record.get("step", math.inf) <= keep_until_step:
                    self.history.append(record)
        self.rewrite()
        self.file = open(path, "a", encoding="utf-8")
        self.logger_names = parse_loggers(loggers)
        for name in self.logger_names:
            if name == "csv":
                self.loggers.append(CSVLogger(path.with_name("metrics.csv"), self.history))
            else:
                self.loggers.append(
                    TensorBoardLogger(path.with_name("tensorboard"), self.history, keep_until_step)
                )

    def rewrite(self) -> None:
        """Write the whole history again (after a record changed)."""
        if not self.write:
            return
        reopen = self.file is not None
        if reopen:
            self.file.close()
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        if reopen:
            self.file = open(self.path, "a", encoding="utf-8")

    def update_last(self, values: dict[str, Any]) -> None:
        """Add `values` to the last record (scores computed after training, such as the whole
        validation split's loss) in metrics.jsonl and in every logger, open or already closed."""
        self.history[-1].update(values)
        self.rewrite()
        if not self.write:
            return
        if "csv" in self.logger_names:
            CSVLogger(self.path.with_name("metrics.csv"), self.history).close()
        if "tensorboard" in self.logger_names:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.path.with_name("tensorboard")))
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    writer.add_scalar(key, value, self.history[-1]["step"])
            writer.close()

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for logger in self.loggers:
            logger.log(record)

    @property
    def last_step(self) -> int:
        return self.history[-1]["step"] if self.history else 0

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def write_loss_plot(history: list[dict[str, Any]], path: Path) -> None:
    """A PNG of training and validation loss against step (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", alpha=0.8)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


class Reporter:
    """Progress on stderr: a live bar on a terminal; when stderr is a file or a pipe (a log,
    a job scheduler), one plain line every `every_s` seconds instead. Evaluation lines always."""

    def __init__(self, enabled: bool, total: int, initial: int, every_s: float = 10.0):
        from tqdm import tqdm

        self.enabled, self.total, self.every_s = enabled, total, every_s
        self.live = enabled and sys.stderr.isatty()
        self.last_line = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, disable=not self.live, dynamic_ncols=True,
                        file=sys.stderr, unit="step", leave=False)  # fmt: skip

    def step(self, record: dict[str, Any] | None) -> None:
        if record is not None:
            if self.live:
                self.bar.set_postfix_str(postfix(record))
            elif self.enabled and time.monotonic() - self.last_line >= self.every_s:
                print(
                    f"step {record['step']:>6}/{self.total} | {postfix(record)}", file=sys.stderr, flush=True
                )
                self.last_line = time.monotonic()
        self.bar.update(1)

    def evaluation(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.bar.write(eval_line(record))  # stdout, with the final report
            self.last_line = time.monotonic()

    def close(self) -> None:
        self.bar.close()


def postfix(record: dict[str, Any]) -> str:
    text = f"loss {record['train_loss']:.3f}" if "train_loss" in record else ""
    for key, value in record.items():
        if key.startswith("val_") and isinstance(value, float) and key != "val_ppl":
            text += f" {key[4:]} {value:.3f}"
    if "tokens_per_s" in record:
        text += f" {record['tokens_per_s'] / 1000:.1f}k tok/s"
    return text.strip()


def eval_line(record: dict[str, Any]) -> str:
    """`step    250 | train 1.9876 | val 2.0011 | ppl 7.40 | 12.3s` (classifiers: their scores)."""
    parts = [f"step {record['step']:>6}"]
    if "train_loss" in record:
        parts.append(f"train {record['train_loss']:.4f}")
    for key, value in record.items():
        if key.startswith("val_") and isinstance(value, float):
            name = {"val_loss": "val", "val_ppl": "ppl"}.get(key, key[4:].replace("_", " "))
            parts.append(f"{name} {value:.2f}" if key == "val_ppl" else f"{name} {value:.4f}")
    parts.append(f"{record['elapsed_s']:.1f}s")
    return " | ".join(parts)
