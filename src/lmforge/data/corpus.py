"""Reading raw text: files, folders and JSONL, with optional cleaning.

A corpus is a list of documents (strings). A plain text file is one document;
a folder contributes one document per text file; a JSONL file one document per
record (its `text_field`).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.io import sha256_file

TEXT_SUFFIXES = {".txt", ".md", ".text", ".jsonl", ""}
_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class SourceFile:
    path: str
    bytes: int
    sha256: str


def read_text_file(path: Path, encoding: str = "utf-8", errors: str = "strict") -> str:
    """Read one file, normalising newlines; undecodable bytes name the file and offset."""
    if not path.exists():
        raise UserError(f"Data file {path} does not exist.")
    if not path.is_file():
        raise UserError(f"{path} is not a file.")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding, errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not valid {encoding}: byte 0x{raw[e.start]:02x} at offset {e.start} "
            f"cannot be decoded; convert the file, or set data.encoding (e.g. latin-1) "
            f"or data.errors to replace.",
            settings=("data.encoding", "data.errors"),
        ) from None
    except LookupError:
        raise UserError(f"Unknown text encoding {encoding!r}; use e.g. utf-8 or latin-1.") from None
    # Windows and old Mac line ends become "\n"; a leading byte-order mark is dropped.
    return text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")


def json_lines(path: Path, text: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a JSONL file whose content is `text`."""
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}).") from None
    return records


def _read_jsonl(path: Path, text_field: str, encoding: str, errors: str) -> list[str]:
    docs = []
    for lineno, record in json_lines(path, read_text_file(path, encoding, errors)):
        if not isinstance(record, dict) or text_field not in record:
            raise UserError(
                f"{path}:{lineno} has no {text_field!r} field; set data.text_field to the "
                f"name of the field that holds the text.",
                settings=("data.text_field",),
            )
        if not isinstance(record[text_field], str):
            raise UserError(f"{path}:{lineno}: field {text_field!r} must be a string.")
        docs.append(record[text_field])
    return docs


def list_files(path: Path) -> list[Path]:
    """The text files a path stands for: itself, or the text files under a folder (sorted)."""
    if not path.exists():
        raise UserError(f"Data path {path} does not exist.")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise UserError(f"Folder {path} holds no text files (.txt, .md, .jsonl).")
        return files
    return [path]


def read_documents(
    paths: list[Path],
    text_field: str = "text",
    encoding: str = "utf-8",
    errors: str = "strict",
) -> tuple[list[str], list[SourceFile]]:
    """Read every document from the given files and folders."""
    docs: list[str] = []
    sources: list[SourceFile] = []
    for path in paths:
        for file in list_files(path):
            if file.suffix.lower() == ".jsonl":
                docs.extend(_read_jsonl(file, text_field, encoding, errors))
            else:
                docs.append(read_text_file(file, encoding, errors))
            sources.append(SourceFile(str(file), file.stat().st_size, sha256_file(file)))
    return docs, sources


def clean_text(text: str) -> str:
    """Drop control characters (keeping newline and tab), collapse runs of spaces and blank lines."""
    text = "".join(ch for ch in text if ch in "\n\t" or not unicodedata.category(ch).startswith("C"))
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip("\n") + "\n"


def dedup_documents(docs: list[str]) -> list[str]:
    """Keep the first copy of each document (compared after stripping outer whitespace)."""
    seen: set[str] = set()
    out = []
    for doc in docs:
        key = doc.strip()
        if key not in seen:
            seen.add(key)
            out.append(doc)
    return out
