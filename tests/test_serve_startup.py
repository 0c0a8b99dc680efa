"""`lmforge serve --quantize int8`: the first start on a CPU says what it times, and keeps the
timings, so that the next start (a new process) measures nothing and is ready sooner."""

from __future__ import annotations

from pathlib import Path

from lmforge.cli import main
from lmforge.inference import timing_cache

V1 = Path(__file__).parent / "data" / "v1"


def test_the_first_int8_start_shows_its_timing_and_the_second_measures_nothing(tmp_path, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: None)
    starts = []
    for _ in range(2):
        monkeypatch.setattr(timing_cache, "_timings", None)  # a new process: only the cache file remains
        assert main(["serve", str(V1 / "gpt"), "--quantize", "int8", "--port", "0"]) == 0
        starts.append(capsys.readouterr().out)
    first, second = starts
    assert (
        "Starting: timing the products of a" in first
        and str(tmp_path / "cache" / "kernel-timings.json") in first
    )
    assert "Starting: timing" not in second
    assert "ready in" in first and "ready in" in second
    assert timing_cache.progress is None  # (serve leaves no printer behind)
