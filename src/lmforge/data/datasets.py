"""Named public data sets: found locally, in the cache, or downloaded with a checksum.

Resolution order for a named data set:
1. `$LMFORGE_DATA_DIR/<file>` (a local copy; CI points this at ../shared/data),
2. the user cache (`~/.cache/lmforge/datasets/<file>`),
3. a download from the canonical URL, checked against its sha256, into the cache.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.io import atomic_write_bytes, cache_dir, sha256_file


@dataclass(frozen=True)
class Dataset:
    name: str
    filename: str
    url: str
    sha256: str
    description: str


DATASETS = {
    "tinyshakespeare": Dataset(
        name="tinyshakespeare",
        filename="tinyshakespeare.txt",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        description="40,000 lines of Shakespeare (1.1 MB, public domain)",
    ),
    # Pairs for the encoder–decoder presets. These splits are lmforge's own (the sources publish one
    # growing file, not these splits), so there is no URL to fetch them from: a local copy is used.
    "eng-fra-train": Dataset(
        "eng-fra-train", "eng-fra-train.tsv", "",
        "f38a11c48cfb35d6d62ff67b997ee77bbff65714ad00363bf4edaf686b999eb3",
        "71,385 English→French Tatoeba sentence pairs (ManyThings' Anki file; CC-BY 2.0 FR)",
    ),
    "eng-fra-dev": Dataset(
        "eng-fra-dev", "eng-fra-dev.tsv", "",
        "86724dc27cb52c2687a5ed39f33acfefb8defe695785d08a296a7d21bbd009ea",
        "1,557 held-out pairs (1,000 English sentences in no training pair)",
    ),
    "arxiv-title-train": Dataset(
        "arxiv-title-train", "arxiv-title-train.tsv", "",
        "f8e0087bd80870795fdc29efb11129a70bff4474e98ee7ceb7151deb8d32e271",
        "33,271 arXiv abstracts and titles, 2007-2015 (arXiv metadata, CC0)",
    ),
    "arxiv-title-dev": Dataset(
        "arxiv-title-dev", "arxiv-title-dev.tsv", "",
        "2cbbf241873276bd9127cd3aa513e5ff05275fe0203684f015475acb3b776cac",
        "1,000 further arXiv abstracts and titles",
    ),
}  # fmt: skip
DEFAULT_DATASET = "tinyshakespeare"


def download(url: str, dest: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest`, refusing (and keeping nothing) if the checksum differs."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as e:
        raise UserError(
            f"Could not download {url} ({e}); download it by hand and set LMFORGE_DATA_DIR "
            f"to the folder that holds it."
        ) from None
    import hashlib

    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise UserError(
            f"Download of {url} has sha256 {got}, expected {sha256}; the file was not saved. "
            f"Try again, or place a verified copy in LMFORGE_DATA_DIR."
        )
    atomic_write_bytes(dest, data)
    return dest


def resolve_dataset(name: str, url: str | None = None) -> Path:
    """Path to a local copy of the named data set, downloading it on first use."""
    if name not in DATASETS:
        raise UserError(f"Unknown data set {name!r}; known: {', '.join(DATASETS)}.")
    ds = DATASETS[name]
    data_dir = os.environ.get("LMFORGE_DATA_DIR")
    if data_dir and (Path(data_dir) / ds.filename).is_file():
        return Path(data_dir) / ds.filename
    cached = cache_dir() / "datasets" / ds.filename
    if cached.is_file():
        if sha256_file(cached) == ds.sha256:
            return cached
        cached.unlink()  # a corrupt cache entry is replaced by a fresh download
    if not (url or ds.url):
        raise UserError(f"The data set {name} ({ds.filename}) is not in LMFORGE_DATA_DIR "
                        f"({data_dir or 'not set'}); set LMFORGE_DATA_DIR to the folder that holds it, or give "
                        f"the file's path (data.path).")  # fmt: skip
    return download(url or ds.url, cached, ds.sha256)
