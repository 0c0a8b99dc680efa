"""Shared fixtures: real data from ../shared/data, a private cache, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmforge.config import Config, apply_overrides, load_preset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LMFORGE_DATA_DIR", REPO.parent / "shared" / "data"))
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own cache; the default corpus comes from ../shared/data."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(SHARED_DATA))


@pytest.fixture
def shakespeare_excerpt(tmp_path) -> Path:
    """The first 60,000 characters of tiny Shakespeare: enough to train a tiny model."""
    path = tmp_path / "excerpt.txt"
    path.write_text(SHAKESPEARE.read_text("utf-8")[:60000], encoding="utf-8")
    return path


def tiny_config(out: Path, data: Path | str = "", **overrides) -> Config:
    """A 2-layer, 32-wide GPT that trains in a second or two, float32 eager on the CPU."""
    base = {
        "data.path": str(data),
        "model.block_size": 16,
        "train.out": str(out),
        "train.max_iters": 20,
        "train.batch_size": 4,
        "train.eval_interval": 10,
        "train.eval_batches": 2,
        "train.log_interval": 5,
        "train.device": "cpu",
        "train.dtype": "float32",
        "train.progress": False,
        "train.sample_tokens": 0,
    }
    base.update(overrides)
    return apply_overrides(load_preset("tiny"), base)
