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
}
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
    return download(url or ds.url, cached, ds.sha256)
