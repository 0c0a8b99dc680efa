"""Labeled text for classification: TSV/CSV with a header, or JSONL.

The text and label columns are found by name (`text_column`, `label_column`),
or guessed from common names (sentence/text/review, label/sentiment/class).
Labels are kept as strings ("1", "positive"), whatever the file holds.
"""

from __future__ import annotations

import csv
import json
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


def field_text(path: Path, lineno: int, record: dict, key: str, what: str) -> str:
    """The text of `record[key]`: a string as written, a number as written ("0" is a target, not an
    empty one); missing or null: ""; a list, an object or true/false: one error naming the line."""
    value = record.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{path}:{lineno}: the {what} ({key!r}) is {json.dumps(value)[:60]}, not text; write it as "
                    f"a string.")  # fmt: skip


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
    csv.field_size_limit(2**31 - 1)  # (a long review or abstract is one field: no 128 KiB limit)
    reader = csv.DictReader(
        content.split("\n"),
        delimiter=delimiter,
        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
    )
    columns = [c for c in (reader.fieldnames or []) if c]
    rows = []
    for i, r in enumerate(reader):
        if None in r:  # more fields than the header names
            raise UserError(f"{path}:{i + 2} has {len(columns) + len(r[None])} fields but the header names "
                            f"{len(columns)}; quote the fields (CSV) or remove the extra separators.")  # fmt: skip
        if any((v or "").strip() for v in r.values()):
            rows.append((i + 2, r))
    return columns, rows


def read_texts(path: str | Path, text_column: str | None = None) -> list[str]:
    """The text column of a TSV/CSV/JSONL file (no labels needed), one text per row."""
    path = Path(path)
    columns, records = _records(path)
    key = _pick(columns, text_column, TEXT_NAMES, "text", path)
    texts = (field_text(path, n, r, key, "text").strip() for n, r in records if isinstance(r, dict))
    return [text for text in texts if text]


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
        text = field_text(path, lineno, record, text_key, "text").strip()
        label = field_text(path, lineno, record, label_key, "label").strip()
        if not label:
            raise UserError(f"{path}:{lineno} has an empty label; every example needs one.")
        if not text:
            raise UserError(f"{path}:{lineno} has an empty text.")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise UserError(f"{path} holds no examples below its header.")
    return texts, labels
