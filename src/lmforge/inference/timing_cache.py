"""This machine's measured timings, kept between runs: what kernels.py, the native library's loader
(native/__init__.py) and the native decoder (native/decoding.py) time once and then look up.

    $LMFORGE_CACHE_DIR/kernel-timings.json   {"<cpu>|<torch>": {"int8-pack 576x1536": 1.2e-5, ...}}

Keyed by the CPU model, its flags and the torch version (device.machine_key), so a cache shared by
several machines keeps each one's timings apart. A module of its own because both kernels.py and
the native library use it, and kernels.py uses the native library.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.device import machine_key

# Re-entrant: kernels.timings() holds it while asking whether the native library exists, and
# loading that library times its product loops through remembered() on the same thread.
lock = threading.RLock()
_timings: dict[str, float] | None = None  # this machine's entries of the cache file
# Told what is being measured (a first start on this machine takes a while): `lmforge serve` prints it.
progress: Callable[[str], None] | None = None


def _cache_file() -> Path:
    from lmforge.io import cache_dir

    return cache_dir() / "kernel-timings.json"


def load() -> dict[str, float]:
    """This machine's timings (read from the cache file the first time); hold `lock` around it."""
    global _timings
    if _timings is None:
        try:
            _timings = dict(json.loads(_cache_file().read_text("utf-8")).get(machine_key(), {}))
        except (OSError, ValueError, AttributeError):
            _timings = {}
    return _timings


def save() -> None:
    """Write this machine's timings back, beside other machines' entries; hold `lock` around it."""
    from lmforge.io import atomic_write_json

    path = _cache_file()
    try:
        everything = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        everything = {}
    everything[machine_key()] = _timings
    try:
        atomic_write_json(path, everything)
    except OSError:  # a read-only cache: the timings are measured again next time
        pass


def announce(what: str) -> None:
    """Tell `progress` (when set) that `what` is being timed now."""
    if progress is not None:
        progress(f"timing {what} on this CPU (once: kept in {_cache_file()})")


def remembered(key: str, seconds: Callable[[], float]) -> float:
    """This machine's cached timing `key`, measured by `seconds()` (and saved) the first time."""
    with lock:
        cached = load().get(key)
    if cached is not None:
        return cached
    announce(key)
    value = seconds()
    with lock:
        load()[key] = value
        save()
    return value


def measure(kernel: str, fn: Callable[[], object], repeats: int = 15) -> float:
    """Median seconds of one call of `fn` (the product by `kernel`), after a warm-up."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
