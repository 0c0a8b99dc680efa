import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from lmforge.config import DataConfig
from lmforge.data.batches import RandomWindows, fixed_windows
from lmforge.data.corpus import clean_text
from lmforge.data.datasets import DATASETS, download, resolve_dataset
from lmforge.data.prepare import open_prepared, prepare, resolve_data
from lmforge.errors import UserError
from lmforge.io import sha256_file

from .conftest import SHAKESPEARE


def test_prepare_writes_tokens_meta_and_the_standard_split(tmp_path, shakespeare_excerpt):
    data = prepare([shakespeare_excerpt], tmp_path / "prep", DataConfig(tokenizer="char"))
    text = shakespeare_excerpt.read_text()
    meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    assert meta["train_tokens"] == int(len(text) * 0.9)
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert meta["sources"][0]["sha256"] == hashlib.sha256(shakespeare_excerpt.read_bytes()).hexdigest()
    train = np.fromfile(tmp_path / "prep" / "train.bin", dtype=np.uint16)
    assert data.tokenizer.decode(train.tolist()) == text[: meta["train_tokens"]]
    assert data.tokenizer.decode(data.tokens("val").tolist()) == text[meta["train_tokens"] :]


def test_prepare_reads_folders_and_jsonl_with_document_separators(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha\r\nbeta\r\n")
    (folder / "b.md").write_text("gamma\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"body": "delta"}) + "\n\n" + json.dumps({"body": "epsilon"}) + "\n")
    cfg = DataConfig(tokenizer="char", val_fraction=0.2, text_field="body")
    data = prepare([folder, jsonl], tmp_path / "prep", cfg)
    ids = np.concatenate([data.tokens("train"), data.tokens("val")]).tolist()
    text = data.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "alpha\nbeta\n<|endoftext|>gamma\n<|endoftext|>delta<|endoftext|>epsilon"
    assert data.meta["documents"] == 4


def test_explicit_validation_file_and_uint32_for_large_vocabularies(tmp_path):
    train, val = tmp_path / "t.txt", tmp_path / "v.txt"
    train.write_text("abcabc" * 10)
    val.write_text("cab")
    data = prepare([train], tmp_path / "p", DataConfig(tokenizer="char", val_path=str(val)))
    assert data.tokenizer.decode(data.tokens("val").tolist()) == "cab"
    assert data.meta["train_tokens"] == 60
    from lmforge.data.prepare import token_dtype

    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_cleaning_and_dedup(tmp_path):
    assert clean_text("a\x00b   c\t\t d\n\n\n\n\ne \n") == "ab c d\n\ne\n"
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("1.txt", "2.txt", "3.txt"):
        (folder / name).write_text("same text\n" if name != "3.txt" else "other text\n")
    data = prepare([folder], tmp_path / "p", DataConfig(tokenizer="char", dedup=True, val_fraction=0.5))
    assert data.meta["documents"] == 2


def test_non_utf8_bytes_name_the_file_and_offset(tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"hello caf\xe9 world" * 10)
    with pytest.raises(UserError, match=r"latin.txt is not valid utf-8: byte 0xe9 at offset 9"):
        prepare([bad], tmp_path / "p", DataConfig())
    assert not (tmp_path / "p" / "meta.json").exists()
    data = prepare([bad], tmp_path / "p", DataConfig(errors="replace"))
    assert "\ufffd" in data.tokenizer.decode(data.tokens("train").tolist())
    data = prepare([bad], tmp_path / "q", DataConfig(encoding="latin-1"))
    assert "café" in data.tokenizer.decode(data.tokens("train").tolist())


@pytest.mark.parametrize(
    "content, message",
    [("", "holds no text"), ("   \n\n", "holds no text")],
)
def test_empty_corpus_is_refused(tmp_path, content, message):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        prepare([path], tmp_path / "p", DataConfig())


def test_missing_file_and_bad_jsonl(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "p", DataConfig())
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"content": "hi"}\n')
    with pytest.raises(UserError, match="x.jsonl:1 has no 'text' field"):
        prepare([jsonl], tmp_path / "p", DataConfig())
    jsonl.write_text('{"text": "hi"\n')
    with pytest.raises(UserError, match="x.jsonl:1 is not valid JSON"):
        prepare([jsonl], tmp_path / "p", DataConfig())


def test_raw_text_is_prepared_once_into_the_cache(shakespeare_excerpt):
    first = resolve_data(DataConfig(path=str(shakespeare_excerpt)), log=lambda _: None)
    messages = []
    second = resolve_data(DataConfig(path=str(shakespeare_excerpt)), log=messages.append)
    assert first.dir == second.dir and messages == []
    third = resolve_data(DataConfig(path=str(shakespeare_excerpt), val_fraction=0.2), log=lambda _: None)
    assert third.dir != first.dir
    assert open_prepared(first.dir).meta["train_tokens"] == first.meta["train_tokens"]


def test_truncated_prepared_data_is_detected(tmp_path, shakespeare_excerpt):
    prepare([shakespeare_excerpt], tmp_path / "p", DataConfig())
    with open(tmp_path / "p" / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="missing or truncated"):
        open_prepared(tmp_path / "p")


def test_default_corpus_comes_from_the_data_dir_then_cache_then_download(tmp_path, monkeypatch, data_dir):
    assert resolve_dataset("tinyshakespeare") == data_dir / "tinyshakespeare.txt"
    # The test slice stands in for the real file: its checksum is the one expected.
    real = DATASETS["tinyshakespeare"]
    monkeypatch.setitem(
        DATASETS, "tinyshakespeare", dataclasses.replace(real, sha256=sha256_file(SHAKESPEARE))
    )
    # Without a local copy it is downloaded (here from a file:// URL standing in for the web).
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    path = resolve_dataset("tinyshakespeare", url=SHAKESPEARE.as_uri())
    assert path == tmp_path / "cache" / "datasets" / "tinyshakespeare.txt"
    assert path.read_bytes() == SHAKESPEARE.read_bytes()
    # Next time the cached copy is used, with no URL needed.
    assert resolve_dataset("tinyshakespeare", url="file:///does/not/exist") == path


def test_download_with_a_wrong_checksum_keeps_nothing(tmp_path):
    source = tmp_path / "evil.txt"
    source.write_text("tampered")
    dest = tmp_path / "cache" / "x.txt"
    with pytest.raises(UserError, match="expected 0000"):
        download(source.as_uri(), dest, "0" * 64)
    assert not dest.exists()
    with pytest.raises(UserError, match="Could not download"):
        download((tmp_path / "missing").as_uri(), dest, "0" * 64)


def test_random_windows_are_reproducible_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    a = RandomWindows(tokens, 8, 4, seed=1, device=torch.device("cpu"))
    x, y = a.next_batch()
    assert x.shape == (4, 8) and (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    state = a.state_dict()
    expected = a.next_batch()[0]
    b = RandomWindows(tokens, 8, 4, seed=999, device=torch.device("cpu"))
    b.load_state_dict(state)
    assert (b.next_batch()[0] == expected).all()


def test_fixed_windows_cover_the_split_evenly():
    starts = fixed_windows(np.zeros(1000), length=10, count=5)
    assert starts.tolist() == [0, 247, 494, 741, 989]
    assert fixed_windows(np.zeros(12), length=10, count=5).tolist() == [0, 1]
