"""Parallel text for encoder–decoder models: source → target pairs.

    pairs file ──read_pairs──▶ (sources, targets) ──joint tokenizer──▶ token ids, length-filtered
                                                                       (cached, like prepared text)

Where the pairs come from:
- a TSV without header: source<TAB>target on each line (Tatoeba's format);
- a TSV/CSV with a header, or JSONL, with `data.source_field` / `data.target_field` naming the
  columns or fields (arxiv-title-train.tsv: `abstract`, `title`);
- two line-aligned files: `data.path` holds the sources, `data.target_path` the targets.

One tokenizer (by default a byte-level BPE) is trained on both sides of the training pairs: one
vocabulary, one embedding. Validation comes from `data.val_path` (and `data.val_target_path`), or
else from the training file: the pairs whose source falls in a hashed `val_fraction` bucket (a
sentence with several translations stays on one side of the split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.config import Config
from lmforge.data.corpus import read_text_file
from lmforge.data.labeled import _records, field_text
from lmforge.errors import UserError
from lmforge.io import atomic_write_json, build_directory, cache_dir, sha256_file
from lmforge.tokenizers import SOURCE_TOKENIZER, TextTokenizer, build_tokenizer, load_tokenizer

FORMAT_VERSION = 1


@dataclass
class Pairs:
    sources: list[str]
    targets: list[str]


def read_pairs(
    path: str | Path, source_field: str = "", target_field: str = "", target_path: str = ""
) -> Pairs:
    """Source and target texts of a pairs file (or of two aligned files), every pair checked."""
    path = Path(path)
    if target_path:
        sources = _lines(path)
        targets = _lines(Path(target_path))
        if len(sources) != len(targets):
            raise UserError(f"{path} has {len(sources)} lines but {target_path} has {len(targets)}; aligned "
                            f"source and target files need one line per pair in both.")  # fmt: skip
        rows = [(i + 1, s, t) for i, (s, t) in enumerate(zip(sources, targets, strict=True))]
    elif source_field or target_field or path.suffix.lower() == ".jsonl":
        rows = _named_rows(path, source_field or "source", target_field or "target")
    else:
        rows = _tab_rows(path)
    pairs = Pairs([], [])
    for lineno, source, target in rows:
        for side, text in (("source", source), ("target", target)):
            if not text.strip():
                raise UserError(f"{path}:{lineno} has an empty {side}; every pair needs both sides.")
        pairs.sources.append(source.strip())
        pairs.targets.append(target.strip())
    if not pairs.sources:
        raise UserError(f"{path} holds no pairs.")
    return pairs


def _lines(path: Path) -> list[str]:
    text = read_text_file(path)
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def _tab_rows(path: Path) -> list[tuple[int, str, str]]:
    content = read_text_file(path)
    if not content.strip():
        raise UserError(f"{path} is empty; it needs source<TAB>target lines.")
    rows = []
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            problem = "no tab" if len(fields) < 2 else f"{len(fields)} tab-separated fields"
            raise UserError(f"{path}:{lineno} has {problem}; each line needs source<TAB>target (or name the "
                            f"columns of a file with a header with data.source_field and data.target_field).")  # fmt: skip
        rows.append((lineno, fields[0], fields[1]))
    return rows


def _named_rows(path: Path, source_field: str, target_field: str) -> list[tuple[int, str, str]]:
    columns, records = _records(path)
    for name, setting in ((source_field, "source_field"), (target_field, "target_field")):
        if name not in columns:
            raise UserError(f"{path} has no column {name!r} for the {setting.split('_')[0]}; its columns are: "
                            f"{', '.join(columns) or 'none'}. Set data.{setting}.")  # fmt: skip
    return [(n, field_text(path, n, r, source_field, "source"), field_text(path, n, r, target_field, "target"))
            for n, r in records]  # fmt: skip


# ---- prepared (tokenized) pairs ---------------------------------------------------------------


@dataclass
class PreparedPairs:
    """Token ids of the training and validation pairs, their texts, and the joint tokenizer."""

    dir: Path
    tokenizer: TextTokenizer
    train_sources: list[np.ndarray]
    train_targets: list[np.ndarray]
    val_sources: list[np.ndarray]
    val_targets: list[np.ndarray]
    val_texts: Pairs  # validation texts as written (references for BLEU / ROUGE)
    meta: dict = field(default_factory=dict)

    def mask(self, split: str) -> None:  # (the trainer's question for instruction data: never here)
        return None


def _split_out(pairs: Pairs, fraction: float) -> tuple[Pairs, Pairs]:
    """Validation pairs by a hash of the source, so every translation of one sentence stays together."""
    train, val = Pairs([], []), Pairs([], [])
    for s, t in zip(pairs.sources, pairs.targets, strict=True):
        bucket = int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        side = val if bucket < fraction else train
        side.sources.append(s)
        side.targets.append(t)
    if not val.sources or not train.sources:
        raise UserError(f"Splitting {len(pairs.sources)} pairs by data.val_fraction {fraction:g} leaves one side "
                        f"empty; give more pairs or a validation file (data.val_path).")  # fmt: skip
    return train, val


def _cache_key(config: Config) -> str:
    d = config.data
    digest = hashlib.sha256(f"pairs:{FORMAT_VERSION}".encode())
    for setting in ("path", "target_path", "val_path", "val_target_path"):
        name = getattr(d, setting)
        if name and not Path(name).is_file():
            raise UserError(
                f"Data file {name} (data.{setting}) does not exist.", settings=(f"data.{setting}",)
            )
        if name:
            digest.update(f"{Path(name).resolve()}:{sha256_file(name)}".encode())
    settings = dataclasses.asdict(d)
    if d.tokenizer not in ("char", "word", "bpe"):
        settings["tokenizer"] = sha256_file(d.tokenizer)
        beside = Path(d.tokenizer).parent / SOURCE_TOKENIZER  # (the sources' own, where there is one)
        if Path(d.tokenizer).name == "tokenizer.json" and beside.is_file():
            settings["source_tokenizer"] = sha256_file(beside)
    settings["limits"] = _limits(config)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _limits(config: Config) -> tuple[int, int]:
    """(longest source, longest target) in tokens; a target also needs room for its end token."""
    d, m = config.data, config.model
    # (a pretrained model's special tokens around a source take room too)
    extra = (m.source_bos_id >= 0) + (m.source_eos_id >= 0)
    source = (d.max_source_tokens or m.source_block_size or m.block_size) - extra
    target = min(d.max_target_tokens or m.block_size - 1, m.block_size - 1)
    return source, target


def _resolve_names(config: Config) -> Config:
    """Named data sets (eng-fra-train, arxiv-title-dev, ...) become the paths of their local copies."""
    from lmforge.data.datasets import DATASETS, resolve_dataset

    d = config.data
    found = {
        key: str(resolve_dataset(getattr(d, key)))
        for key in ("path", "val_path")
        if getattr(d, key) in DATASETS
    }
    return dataclasses.replace(config, data=dataclasses.replace(d, **found)) if found else config


def prepare_pairs(config: Config, log=print) -> PreparedPairs:
    """Read, tokenize and length-filter the pairs `config.data` names, cached by content and settings."""
    config = _resolve_names(config)
    d = config.data
    if not d.path:
        raise UserError("An encoder–decoder model needs pairs: set data.path to a TSV/JSONL file of them.",
                        settings=("data.path",))  # fmt: skip
    if not Path(d.path).exists():
        raise UserError(f"Data file {d.path} does not exist.", settings=("data.path",))
    target = cache_dir() / "pairs" / _cache_key(config)
    if not (target / "meta.json").is_file():
        log(f"Preparing the pairs of {d.path} (tokenizer: {d.tokenizer}) into {target}")
        build_directory(target, lambda tmp: _prepare_into(tmp, config, log))
    return open_pairs(target)


def _prepare_into(folder: Path, config: Config, log) -> None:
    d = config.data
    pairs = read_pairs(d.path, d.source_field, d.target_field, d.target_path)
    if d.val_path:
        train, val = pairs, read_pairs(d.val_path, d.source_field, d.target_field, d.val_target_path)
    else:
        train, val = _split_out(pairs, d.val_fraction)
    tokenizer = build_tokenizer(d.tokenizer, train.sources + train.targets, d.vocab_size, d.min_frequency)
    if tokenizer.source is not None:  # sources in their own vocabulary (a Marian model with two)
        tokenizer.source.save(folder / SOURCE_TOKENIZER)
    tokenizer.save(folder / "tokenizer.json")
    longest_source, longest_target = _limits(config)
    truncate = d.task == "summarization"  # a summary needs the start of a long text; a translation all of it
    arrays, kept = {}, {}
    for split, part in (("train", train), ("val", val)):
        sources, targets = (
            tokenizer.of_sources.encode_batch(part.sources),
            tokenizer.encode_batch(part.targets),
        )
        keep = [i for i in range(len(sources)) if len(targets[i]) <= longest_target
                and (truncate or len(sources[i]) <= longest_source) and sources[i] and targets[i]]  # fmt: skip
        if split == "val":
            keep = list(range(len(sources)))  # every validation pair is scored (long ones cut to fit)
        kept[split] = keep
        for side, ids in (("source", sources), ("target", targets)):
            limit = longest_source if side == "source" else longest_target
            chosen = [ids[i][:limit] for i in keep]
            arrays[f"{split}_{side}"] = np.concatenate(
                [np.asarray(x, dtype=np.int32) for x in chosen] or [[]]
            )
            arrays[f"{split}_{side}_lengths"] = np.asarray([len(x) for x in chosen], dtype=np.int64)
    if not kept["train"]:
        raise UserError(f"No training pair of {d.path} fits the model (sources up to {longest_source} and targets "
                        f"up to {longest_target} tokens); raise model.block_size / model.source_block_size.")  # fmt: skip
    np.savez(folder / "pairs.npz", **arrays)
    atomic_write_json(folder / "val_texts.json", {"sources": val.sources, "targets": val.targets})
    dropped = len(train.sources) - len(kept["train"])
    meta = {"format": "pairs", "version": FORMAT_VERSION, "path": d.path, "train_pairs": len(kept["train"]),
            "val_pairs": len(kept["val"]), "dropped_too_long": dropped, "vocab_size": tokenizer.vocab_size,
            "train_tokens": int(arrays["train_source_lengths"].sum() + arrays["train_target_lengths"].sum())}  # fmt: skip
    atomic_write_json(folder / "meta.json", meta)
    log(f"{meta['train_pairs']:,} training pairs ({dropped:,} longer than the model takes left out), "
        f"{meta['val_pairs']:,} validation pairs, vocabulary {tokenizer.vocab_size:,}.")  # fmt: skip


def _split_arrays(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def open_pairs(folder: Path) -> PreparedPairs:
    arrays = np.load(folder / "pairs.npz")
    texts = json.loads((folder / "val_texts.json").read_text("utf-8"))
    parts = {
        f"{split}_{side}": _split_arrays(arrays[f"{split}_{side}"], arrays[f"{split}_{side}_lengths"])
        for split in ("train", "val")
        for side in ("source", "target")
    }
    return PreparedPairs(
        dir=folder,
        tokenizer=load_tokenizer(folder / "tokenizer.json"),
        train_sources=parts["train_source"],
        train_targets=parts["train_target"],
        val_sources=parts["val_source"],
        val_targets=parts["val_target"],
        val_texts=Pairs(texts["sources"], texts["targets"]),
        meta=json.loads((folder / "meta.json").read_text("utf-8")),
    )
