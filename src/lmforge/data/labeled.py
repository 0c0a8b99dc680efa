"""Labeled text for classification: TSV/CSV with a header, or JSONL.

The text and label columns are found by name (`text_column`, `label_column`),
or guessed from common names (sentence/text/review, label/sentiment/class).
Labels are kept as strings ("1", "positive"), whatever the file holds.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lmforge.data.corpus import json_lines, read_text_file
from lmforge.errors import UserError

TEXT_NAMES = ("text", "sentence", "review", "content", "document")
LABEL_NAMES = ("label", "labels", "sentiment", "class", "category")


def _pick(columns: list[str], wanted: str | None, guesses: tuple[str, ...], what: str, path: Path) -> str:
    if wanted:
        if wanted not in columns:
            raise UserError(f"{path} has no {what} column {wanted!r}; its columns are: {', '.join(columns)}.")
        return wanted
    for name in guesses:
        if name in columns:
            return name
    raise UserError(
        f"{path} has no {what} column (looked for {', '.join(guesses)}); its columns are "
        f"{', '.join(columns) or 'none'}. Name it with --{what}-column."
    )


def _records(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The columns of a TSV/CSV (with a header) or JSONL file, and its non-empty rows with line numbers."""
    content = read_text_file(path)
    if not content.strip():
        raise UserError(f"{path} is empty; it needs a header and at least one example.")
    if path.suffix.lower() == ".jsonl":
        records = json_lines(path, content)
        columns = sorted({k for _, r in records if isinstance(r, dict) for k in r})
        return columns, records
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    reader = csv.DictReader(
        content.split("\n"),
        delimiter=delimiter,
        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
    )
    columns = [c for c in (reader.fieldnames or []) if c]
    return columns, [(i + 2, r) for i, r in enumerate(reader) if any((v or "").strip() for v in r.values())]


def read_texts(path: str | Path, text_column: str | None = None) -> list[str]:
    """The text column of a TSV/CSV/JSONL file (no labels needed), one text per row."""
    path = Path(path)
    columns, records = _records(path)
    key = _pick(columns, text_column, TEXT_NAMES, "text", path)
    return [
        str(r.get(key)).strip() for _, r in records if isinstance(r, dict) and str(r.get(key) or "").strip()
    ]


def read_labeled(
    path: str | Path, text_column: str | None = None, label_column: str | None = None
) -> tuple[list[str], list[str]]:
    """Texts and their labels, one example per row (or JSON line)."""
    path = Path(path)
    columns, records = _records(path)
    text_key = _pick(columns, text_column, TEXT_NAMES, "text", path)
    label_key = _pick(columns, label_column, LABEL_NAMES, "label", path)
    texts, labels = [], []
    for lineno, record in records:
        text, label = record.get(text_key), record.get(label_key)
        if label is None or str(label).strip() == "":
            raise UserError(f"{path}:{lineno} has an empty label; every example needs one.")
        if text is None or not str(text).strip():
            raise UserError(f"{path}:{lineno} has an empty text.")
        texts.append(str(text).strip())
        labels.append(str(label).strip())
    if not texts:
        raise UserError(f"{path} holds no examples below its header.")
    return texts, labels
