from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.tokenizers import (
    EOT,
    build_tokenizer,
    encode_long,
    load_tokenizer,
    train_bpe_tokenizer,
    train_char_tokenizer,
    train_word_tokenizer,
)

MULTILINGUAL = "Hello, world!\nÇa va? Grüße aus Köln. 日本語のテキスト 🙂\n  indented\tline\n"


def test_char_tokenizer_round_trips_and_has_one_id_per_character():
    tok = train_char_tokenizer([MULTILINGUAL])
    ids = tok.encode(MULTILINGUAL)
    assert len(ids) == len(MULTILINGUAL)
    assert tok.decode(ids) == MULTILINGUAL
    assert tok.vocab_size == len(set(MULTILINGUAL)) + 2  # + <unk>, <|endoftext|>
    assert tok.eot_id == 1


def test_char_tokenizer_maps_unseen_characters_to_unk():
    tok = train_char_tokenizer(["abc"])
    assert tok.encode("abz") == [tok.encode("a")[0], tok.encode("b")[0], 0]


def test_bpe_tokenizer_round_trips_any_text_and_compresses():
    text = (Path(__file__).parent / "test_tokenizers.py").read_text().replace(EOT, "") * 3
    tok = train_bpe_tokenizer([text], vocab_size=400)
    assert tok.vocab_size <= 400
    for sample in (MULTILINGUAL, text):
        assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 1.5


def test_bpe_rejects_a_vocabulary_too_small_for_bytes():
    with pytest.raises(UserError, match="at least 257"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_word_tokenizer_splits_words_and_punctuation():
    tok = train_word_tokenizer(["the cat sat. the dog sat!"], vocab_size=100)
    tokens = [tok.hf.id_to_token(i) for i in tok.encode("the dog sat.")]
    assert tokens == ["the", "dog", "sat", "."]
    assert tok.hf.id_to_token(tok.encode("zebra")[0]) == "<unk>"


@pytest.mark.parametrize("kind", ["char", "bpe", "word"])
def test_saved_tokenizer_json_loads_back_identically(tmp_path, kind):
    tok = build_tokenizer(kind, [MULTILINGUAL * 5], vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.kind == kind
    assert again.encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)
    assert again.hf.token_to_id(EOT) == tok.eot_id


def test_long_texts_encode_in_chunks_exactly_as_whole(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 3000
    tok = train_bpe_tokenizer([text[:5000]], vocab_size=300)
    assert encode_long(tok, text) == tok.encode(text)
    char = train_char_tokenizer([text])
    assert encode_long(char, text) == char.encode(text)


def test_loading_a_broken_tokenizer_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(UserError, match="Unknown tokenizer"):
        build_tokenizer("sentencepiece", ["x"], 10)


def test_token_bytes_are_exact_for_parts_of_a_character_and_top_logprobs_keep_both():
    from types import SimpleNamespace

    from lmforge.serving.server import _Requests
    from lmforge.tokenizers import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["naïve café " * 50, "plain words here " * 50], vocab_size=300)
    vocab = tokenizer.hf.get_vocab()
    first, second = vocab["Ã"], vocab["©"]  # byte-level tokens of 0xC3 and 0xA9: "é" is C3 A9
    assert tokenizer.decode([first]) == "\ufffd" == tokenizer.decode([second])  # alone, neither is text
    assert tokenizer.token_bytes(first) == b"\xc3" and tokenizer.token_bytes(second) == b"\xa9"
    assert b"".join(tokenizer.token_bytes(t) for t in tokenizer.encode("café")) == "café".encode()
    eot = tokenizer.eot_id
    assert tokenizer.token_bytes(eot) == b"<|endoftext|>"
    requests = SimpleNamespace(
        tokenizer=tokenizer, piece=lambda t: tokenizer.decode([t], skip_special_tokens=False)
    )
    top = _Requests.top_dict(requests, [(first, -0.5), (second, -1.5)])
    assert len(top) == 2 and top["\ufffd"] == -0.5 and top["©"] == -1.5
