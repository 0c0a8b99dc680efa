"""Turn raw text into a prepared data directory.

A prepared directory holds:
  tokenizer.json   the tokenizer (any kind, one format)
  train.bin        training tokens, a flat array of uint16 (or uint32 for big vocabularies)
  val.bin          validation tokens, same dtype
  meta.json        tokenizer kind and size, dtype, token counts, source files and checksums
  train.mask.bin   instruction data only: 1 where a token is part of a reply (trained on), else 0
  val.mask.bin

`resolve_data` is what training calls: a prepared directory is used as is; raw
text is prepared once into the cache, keyed by the files' checksums and the
settings, so `lmforge train --data my.txt` needs no separate prepare step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.corpus import SourceFile, clean_text, dedup_documents, read_documents
from lmforge.data.datasets import DATASETS, DEFAULT_DATASET, resolve_dataset
from lmforge.errors import UserError
from lmforge.io import atomic_write_json, build_directory, cache_dir, sha256_file
from lmforge.tokenizers import TextTokenizer, build_tokenizer, encode_long, load_tokenizer

FORMAT = "lmforge-data"
FORMAT_VERSION = 1


@dataclass
class PreparedData:
    """A prepared data directory, opened."""

    dir: Path
    meta: dict[str, Any]
    tokenizer: TextTokenizer

    def tokens(self, split: str) -> np.ndarray:
        """The token array of a split ('train' or 'val'), memory-mapped from disk."""
        path = self.dir / f"{split}.bin"
        count = self.meta[f"{split}_tokens"]
        if count == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(path, dtype=self.meta["dtype"], mode="r", shape=(count,))

    def mask(self, split: str) -> np.ndarray | None:
        """Instruction data: which tokens the loss is computed on (None: all of them)."""
        if not self.meta.get("masked") or self.meta[f"{split}_tokens"] == 0:
            return None
        return np.memmap(
            self.dir / f"{split}.mask.bin", dtype=np.uint8, mode="r", shape=(self.meta[f"{split}_tokens"],)
        )


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def _encode_documents(tokenizer: TextTokenizer, docs: list[str]) -> list[int]:
    """Encode documents into one stream, separated by the end-of-text token."""
    eot = tokenizer.eot_id
    ids: list[int] = []
    for i, doc in enumerate(docs):
        if i and eot is not None:
            ids.append(eot)
        ids.extend(encode_long(tokenizer, doc))
    return ids


def _read(paths: list[Path], cfg: DataConfig) -> tuple[list[str], list[SourceFile]]:
    docs, sources = read_documents(paths, cfg.text_field, cfg.encoding, cfg.errors)
    if cfg.clean:
        docs = [clean_text(d) for d in docs]
    if cfg.dedup:
        docs = dedup_documents(docs)
    docs = [d for d in docs if d.strip()]
    if not docs:
        names = ", ".join(s.path for s in sources) or ", ".join(map(str, paths))
        raise UserError(f"{names} holds no text (empty after reading); give a file with text.")
    return docs, sources


def prepare(paths: list[Path], out_dir: Path, cfg: DataConfig) -> PreparedData:
    """Read, tokenize and split the text at `paths` into the directory `out_dir`."""
    from lmforge.data.corpus import list_files
    from lmforge.data.instructions import is_instruction_file

    files = [f for p in paths for f in list_files(p)]
    if files and all(is_instruction_file(f, cfg.encoding) for f in files):
        return _prepare_conversations(files, out_dir, cfg)
    docs, sources = _read(paths, cfg)
    val_docs: list[str] = []
    val_sources: list[SourceFile] = []
    if cfg.val_path:
        val_docs, val_sources = _read([Path(cfg.val_path)], cfg)

    tokenizer = build_tokenizer(cfg.tokenizer, docs, cfg.vocab_size, cfg.min_frequency)
    train_ids = _encode_documents(tokenizer, docs)
    if val_docs:
        val_ids = _encode_documents(tokenizer, val_docs)
    else:
        # The standard split: the first (1 - f) of the token stream trains, the rest validates.
        cut = int(len(train_ids) * (1.0 - cfg.val_fraction))
        train_ids, val_ids = train_ids[:cut], train_ids[cut:]

    dtype = token_dtype(tokenizer.vocab_size)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "spec": cfg.tokenizer},
        "dtype": dtype,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "documents": len(docs),
        "characters": sum(len(d) for d in docs) + sum(len(d) for d in val_docs),
        "train_bytes": sum(len(d.encode("utf-8")) for d in docs),
        "sources": [dataclasses.asdict(s) for s in sources],
        "val_sources": [dataclasses.asdict(s) for s in val_sources],
        "settings": dataclasses.asdict(cfg),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir / "tokenizer.json")
    for split, ids in (("train", train_ids), ("val", val_ids)):
        _write_tokens(out_dir / f"{split}.bin", np.asarray(ids, dtype=dtype))
    atomic_write_json(out_dir / "meta.json", meta)  # written last: its presence marks completion
    return PreparedData(out_dir, meta, tokenizer)


def _prepare_conversations(files: list[Path], out_dir: Path, cfg: DataConfig) -> PreparedData:
    """Instruction/chat JSONL: rendered with the chat template, with a loss mask on the replies."""
    from lmforge.data.corpus import read_text_file
    from lmforge.data.instructions import (
        DEFAULT_CHAT_TEMPLATE,
        encode_conversation,
        read_conversations,
        render_chat,
    )

    def read(paths: list[Path]):
        conversations, sources = [], []
        for f in paths:
            conversations += read_conversations(f, read_text_file(f, cfg.encoding, cfg.errors))
            sources.append(SourceFile(str(f), f.stat().st_size, sha256_file(f)))
        return conversations, sources

    template = cfg.chat_template or DEFAULT_CHAT_TEMPLATE
    train_convs, sources = read(files)
    val_convs, val_sources = read([Path(cfg.val_path)]) if cfg.val_path else ([], [])
    if not val_convs:
        if len(train_convs) < 2:
            raise UserError(
                f"{files[0]} holds {len(train_convs)} conversation; at least 2 are needed "
                f"(one to validate on), or give a validation file (data.val_path).",
                settings=("data.val_path",),
            )
        n_val = max(1, int(len(train_convs) * cfg.val_fraction))
        train_convs, val_convs = train_convs[:-n_val], train_convs[-n_val:]
    texts = [render_chat(template, c, add_generation_prompt=False) for c in train_convs]
    tokenizer = build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, cfg.min_frequency)
    splits = {}
    for split, convs in (("train", train_convs), ("val", val_convs)):
        ids: list[int] = []
        mask: list[int] = []
        for conversation in convs:
            conv_ids, conv_mask = encode_conversation(tokenizer, template, conversation)
            ids += conv_ids
            mask += conv_mask
        splits[split] = (ids, mask)
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "masked": True,
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "spec": cfg.tokenizer},
        "dtype": dtype,
        "train_tokens": len(splits["train"][0]),
        "val_tokens": len(splits["val"][0]),
        "documents": len(train_convs),
        "val_documents": len(val_convs),
        "trained_tokens": {split: sum(m) for split, (_, m) in splits.items()},
        "characters": sum(map(len, texts)),
        "train_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "sources": [dataclasses.asdict(s) for s in sources],
        "val_sources": [dataclasses.asdict(s) for s in val_sources],
        "settings": dataclasses.asdict(cfg),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir / "tokenizer.json")
    for split, (ids, mask) in splits.items():
        _write_tokens(out_dir / f"{split}.bin", np.asarray(ids, dtype=dtype))
        _write_tokens(out_dir / f"{split}.mask.bin", np.asarray(mask, dtype=np.uint8))
    atomic_write_json(out_dir / "meta.json", meta)
    return PreparedData(out_dir, meta, tokenizer)


def _write_tokens(path: Path, array: np.ndarray) -> None:
    from lmforge.io import atomic_write

    atomic_write(path, lambda tmp: array.tofile(tmp))


def open_prepared(path: Path) -> PreparedData:
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserError(
            f"{path} is not a prepared data directory (no readable meta.json); "
            f"run `lmforge prepare` on your text or pass the text file itself."
        ) from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} was not written by lmforge prepare.")
    for split in ("train", "val"):
        expected = meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize
        file = path / f"{split}.bin"
        masks_ok = not meta.get("masked") or (path / f"{split}.mask.bin").is_file()
        if not file.is_file() or file.stat().st_size != expected or not masks_ok:
            raise UserError(
                f"{file} is missing or truncated (expected {expected} bytes); prepare the data again."
            )
    return PreparedData(path, meta, load_tokenizer(path / "tokenizer.json"))


def _cache_key(paths: list[Path], cfg: DataConfig) -> str:
    """A digest of everything that decides the prepared output: file contents and settings."""
    from lmforge.data.corpus import list_files

    digest = hashlib.sha256(f"{FORMAT}:{FORMAT_VERSION}".encode())
    files = [f for p in paths for f in list_files(p)]
    if cfg.val_path:
        files += list_files(Path(cfg.val_path))
    for f in files:
        digest.update(f"{f.resolve()}:{sha256_file(f)}".encode())
    settings = dataclasses.asdict(cfg)
    settings.pop("path")
    if cfg.tokenizer not in ("char", "word", "bpe"):
        tokenizer_file = load_path(cfg.tokenizer)
        if not tokenizer_file.is_file():
            raise UserError(f"Tokenizer file {tokenizer_file} does not exist.")
        settings["tokenizer"] = sha256_file(tokenizer_file)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def load_path(spec: str) -> Path:
    path = Path(spec)
    return path / "tokenizer.json" if path.is_dir() else path


def data_paths(cfg: DataConfig) -> list[Path]:
    """The raw files `cfg.path` names: a data-set name (default tiny Shakespeare) or paths."""
    spec = cfg.path or DEFAULT_DATASET
    if spec in DATASETS:
        return [resolve_dataset(spec)]
    parts = [p.strip() for p in spec.split(",")]
    if not all(parts):  # "a.txt," would otherwise name the current folder, and with it every text below it
        raise UserError(f"data.path {spec!r} has an empty entry; list files or folders separated by single "
                        f"commas, with none left empty.", settings=("data.path",))  # fmt: skip
    return [Path(p) for p in parts]


def resolve_data(cfg: DataConfig, log=print) -> PreparedData:
    """Open the prepared data that `cfg` describes, preparing raw text into the cache if needed."""
    spec = cfg.path or DEFAULT_DATASET
    if spec not in DATASETS and Path(spec).is_dir() and (Path(spec) / "meta.json").exists():
        return open_prepared(Path(spec))
    paths = data_paths(cfg)
    target = cache_dir() / "prepared" / _cache_key(paths, cfg)
    if (target / "meta.json").is_file():
        return open_prepared(target)
    log(f"Preparing {', '.join(map(str, paths))} (tokenizer: {cfg.tokenizer}) into {target}")
    build_directory(target, lambda tmp: prepare(paths, tmp, cfg))
    return open_prepared(target)
