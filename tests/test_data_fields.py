"""Data whose fields are not what they seem: numbers are text as written, lists and objects are one
error naming the line, rows with more fields than the header or a pair are refused, a long row is no
error, an unknown chat role is refused, and a missing file is named with its setting."""

from __future__ import annotations

import json

import pytest

from lmforge.config import apply_overrides, load_preset
from lmforge.data.instructions import read_conversations
from lmforge.data.labeled import read_labeled
from lmforge.errors import UserError
from lmforge.seq2seq.data import prepare_pairs, read_pairs


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_number_is_text_as_written_and_a_list_is_refused(tmp_path):
    pairs = read_pairs(
        _jsonl(tmp_path / "p.jsonl", [{"q": "How many?", "a": 0}, {"q": "Pi?", "a": 3.14}]), "q", "a"
    )
    assert pairs.targets == ["0", "3.14"]  # (a target of 0 is not "empty")
    texts, labels = read_labeled(
        _jsonl(tmp_path / "l.jsonl", [{"text": "good", "label": 1}, {"text": 7, "label": 0}])
    )
    assert texts == ["good", "7"] and labels == ["1", "0"]
    for bad, match in (({"q": ["a", "b"], "a": "x"}, r"p2.jsonl:1: the source \('q'\) is \[\"a\", \"b\"\], not text"),
                       ({"q": "x", "a": {"k": 1}}, r"the target \('a'\) is \{\"k\": 1\}, not text"),
                       ({"q": "x", "a": True}, r"the target \('a'\) is true, not text")):  # fmt: skip
        with pytest.raises(UserError, match=match):
            read_pairs(_jsonl(tmp_path / "p2.jsonl", [bad]), "q", "a")


def test_rows_with_more_fields_than_they_should_have_are_refused(tmp_path):
    (tmp_path / "p.tsv").write_text("a\tb\nc\td\te\n", encoding="utf-8")
    with pytest.raises(
        UserError, match=r"p.tsv:2 has 3 tab-separated fields; each line needs source<TAB>target"
    ):
        read_pairs(tmp_path / "p.tsv")
    (tmp_path / "l.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\textra\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"l.tsv:3 has 3 fields but the header names 2"):
        read_labeled(tmp_path / "l.tsv")


def test_a_three_megabyte_row_is_an_example_like_any_other(tmp_path):
    long = "word " * 600_000
    (tmp_path / "l.tsv").write_text(f"sentence\tlabel\n{long}\t1\nshort\t0\n", encoding="utf-8")
    texts, labels = read_labeled(tmp_path / "l.tsv")
    assert len(texts[0]) == len(long.strip()) and labels == ["1", "0"]


def test_an_unknown_chat_role_is_refused(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = _jsonl(tmp_path / "good.jsonl", [good])
    assert read_conversations(path, path.read_text("utf-8"))
    path = _jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(
        UserError, match="bad.jsonl:2: the role 'human' is not one of assistant, system, tool, user"
    ):
        read_conversations(path, path.read_text("utf-8"))


def test_a_missing_target_file_is_named_with_its_setting(tmp_path):
    (tmp_path / "src.txt").write_text("a\nb\n", encoding="utf-8")
    config = apply_overrides(load_preset("eng-fra-translation"), {"data.path": str(tmp_path / "src.txt"),
                             "data.target_path": str(tmp_path / "none.txt"), "data.val_path": ""})  # fmt: skip
    with pytest.raises(UserError, match=r"none.txt \(data.target_path\) does not exist") as caught:
        prepare_pairs(config, log=lambda _: None)
    assert caught.value.settings == ("data.target_path",)
