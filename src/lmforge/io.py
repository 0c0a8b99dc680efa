"""Safe file writing: every artefact is written to a temporary file in the same
folder, flushed to disk, then renamed over the target, so a crash never leaves
a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.errors import UserError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes the file private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def umask() -> int:
    current = os.umask(0)  # (the only way to read it is to set it)
    os.umask(current)
    return current


def new_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in `parent` to fill and then rename into place, with ordinary permissions
    (mkdtemp makes it private)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, 0o777 & ~umask())
    return folder


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where lmforge keeps downloads and prepared data: $LMFORGE_CACHE_DIR or ~/.cache/lmforge."""
    if os.environ.get("LMFORGE_CACHE_DIR"):
        return Path(os.environ["LMFORGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "lmforge"


TEMPORARY = (".train_state-", ".prep-", ".write-", ".old-")  # folders being filled (new_temp_dir prefixes)


def remove_stale_temporaries(folder: Path, older_than_s: float = 0.0) -> int:
    """Delete what an interrupted write left in `folder` (`.NAME.*.tmp` files, half-filled
    `.train_state-*`/`.prep-*` folders), older than `older_than_s` seconds; returns how many."""
    import shutil
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed, now = 0, time.time()
    for entry in folder.iterdir():
        name = entry.name
        ours = (name.startswith(".") and name.endswith(".tmp") and entry.is_file()) or (
            name.startswith(TEMPORARY) and entry.is_dir())  # fmt: skip
        try:
            if ours and now - entry.stat().st_mtime >= older_than_s:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed += 1
        except OSError:  # gone already, or not ours to remove
            pass
    return removed


def build_directory(target: Path, build: Callable[[Path], None]) -> None:
    """Make the directory `target` by calling `build(tmp)` on a temporary sibling, then renaming it:
    a crash never leaves a partial entry (a cache of prepared data). If another process made `target`
    meanwhile, its copy stands."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, older_than_s=3600)  # others' may be in progress: only old ones
    tmp = new_temp_dir(target.parent, ".prep-")
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built the same entry meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(path: str | Path, kind: str, setting: str) -> Path:
    """The output path `path`, or one sentence saying why it cannot become a `kind` ("folder" or
    "file"): an entry of the other kind is there, it lies under a file, or its folder cannot be
    written. Commands check before any work, so that a mistake costs nothing."""
    path = Path(path)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; choose another {setting}.", settings=(setting,))
    if kind == "file" and path.is_dir():
        raise UserError(f"{path} is a folder, and a file is written there; give a file name (such as "
                        f"{path / 'result.json'}) as {setting}.", settings=(setting,))  # fmt: skip
    nearest = path if path.is_dir() else path.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if nearest.exists() and not nearest.is_dir():
        raise UserError(f"{path} lies under {nearest}, which is a file; choose another {setting}.",
                        settings=(setting,))  # fmt: skip
    if not os.access(nearest, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"Cannot write {path}: {nearest} is not writable here; choose another {setting}.",
                        settings=(setting,))  # fmt: skip
    return path


def write_folder(target: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Make the folder `target` by `write(tmp)` into a temporary sibling, then put it in place: a
    failure leaves `target` as it was, and an overwritten folder holds what was written now and
    nothing of before (an export over a training run keeps none of the run's files)."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(target.parent, ".write-")
    try:
        write(tmp)
        if target.exists():
            if not overwrite and any(target.iterdir()):  # (an empty folder is taken as it is)
                raise UserError(f"{target} already exists; pass --overwrite or choose another --out.")
            old = new_temp_dir(target.parent, ".old-")
            old.rmdir()
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
