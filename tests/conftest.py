"""Shared fixtures: small slices of the real data sets (tests/data), a private cache, tiny configs.

The suite never reads the shared data sets beside the clone, nor the caller's LMFORGE_DATA_DIR: it passes on a
fresh clone with nothing beside it. The default corpus (tiny Shakespeare) is served
from a data folder the session builds out of tests/data/tinyshakespeare-head.txt (its
first 100,000 characters), the way a user's local copy is found through LMFORGE_DATA_DIR.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import Config, apply_overrides, load_preset

TEST_DATA = Path(__file__).resolve().parent / "data"
SHAKESPEARE = TEST_DATA / "tinyshakespeare-head.txt"
SST2_SAMPLE = TEST_DATA / "sst2-dev-sample.tsv"  # the first 400 rows of sst2-dev.tsv
ENG_FRA_SAMPLE = TEST_DATA / "eng-fra-dev-sample.tsv"  # the first 300 pairs of eng-fra-dev.tsv


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A folder laid out like LMFORGE_DATA_DIR, holding the test slice as tinyshakespeare.txt."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "tinyshakespeare.txt").write_bytes(SHAKESPEARE.read_bytes())
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch, data_dir):
    """Each test session gets its own cache; the default corpus is the slice in tests/data."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(data_dir))


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


def saved_with_random_norms(model, folder: Path, tokenizer) -> Path:
    """Save a freshly initialised Hugging Face model (norms at 1, biases at 0) after moving every norm
    and bias off its initial value, so that a misplaced one shows in a parity test; with `tokenizer`."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder
