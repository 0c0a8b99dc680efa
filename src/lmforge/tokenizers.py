"""Tokenizers: character-level, word-level and byte-level BPE, all as Hugging Face `tokenizers`.

Whatever the kind, a tokenizer is saved as one `tokenizer.json` that the
`tokenizers` library (and `transformers`) can load. Every tokenizer made here
has the special token `<|endoftext|>`, which separates documents and starts
generation from an empty prompt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.errors import UserError

EOT = "<|endoftext|>"
SOURCE_TOKENIZER = (
    "source_tokenizer.json"  # an encoder–decoder's sources' own tokenizer, beside tokenizer.json
)
UNK = "<unk>"
_SAFE_CUT = re.compile(r"\n(?=\S)")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table that byte-level BPE vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class TextTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the few operations lmforge needs."""

    def __init__(self, tokenizer: Tokenizer, kind: str = "custom", extra_end_ids: tuple[int, ...] = ()):
        self.hf = tokenizer
        self.kind = kind
        self.extra_end_ids = extra_end_ids  # end-of-sequence ids a checkpoint declares (e.g. <|im_end|>)
        self.bos_id: int | None = None  # the beginning-of-text id a checkpoint declares, if any
        # An encoder–decoder's tokenizer of sources when they have their own vocabulary (some Marian
        # models; this one is the targets'); None: one vocabulary for both sides.
        self.source: TextTokenizer | None = None

    @property
    def of_sources(self) -> TextTokenizer:
        """The tokenizer an encoder–decoder's sources go through: `source` where they have their own."""
        return self if self.source is None else self.source

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on `len(encode(text))` found without encoding it (a server refuses a megabyte
        prompt at once): no token stands for more characters than the longest vocabulary entry has
        (byte-level BPE: bytes; characters: one). 0 for tokenizers that may drop text (whitespace
        splitting, normalizers), where no such bound holds."""
        longest = self.__dict__.get("_longest")
        if longest is None:
            import json

            spec = json.loads(self.hf.to_str())
            keeps_every_character = spec.get("normalizer") is None and (
                self.kind == "char" or '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer"))
            )
            longest = max(map(len, self.hf.get_vocab(with_added_tokens=True))) if keeps_every_character else 0
            self._longest = longest
        return len(text) // longest if longest else 0

    @property
    def eot_id(self) -> int | None:
        return self.hf.token_to_id(EOT)

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Every token that ends a generated sequence: the checkpoint's end-of-sequence ids,
        then <|endoftext|>. The first is the one that pads finished rows."""
        ids = list(self.extra_end_ids)
        if self.eot_id is not None and self.eot_id not in ids:
            ids.append(self.eot_id)
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_framed(self, texts: list[str], max_length: int) -> list[list[int]]:
        """The texts with the special tokens the tokenizer's post-processor puts around one text
        ([CLS] ... [SEP] for BERT), each text cut so that all of it fits `max_length` tokens."""
        room = max(1, max_length - self.hf.num_special_tokens_to_add(False))
        out = []
        for encoding in self.hf.encode_batch(texts, add_special_tokens=False):
            encoding.truncate(room)
            out.append(self.hf.post_process(encoding).ids)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for. A byte-level BPE token can hold part of a UTF-8 character
        (its text alone decodes to U+FFFD); its bytes are exact."""
        name = self.hf.id_to_token(token)
        if name is None:
            return b""
        byte = _BYTE_FALLBACK.fullmatch(name)  # SentencePiece-style byte tokens: <0xE2>
        if byte:
            return bytes([int(byte.group(1), 16)])
        added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        if isinstance(self.hf.decoder, decoders.ByteLevel) and name not in added:
            table = _unicode_to_byte()
            if all(ch in table for ch in name):
                return bytes(table[ch] for ch in name)
        return self.decode([token], skip_special_tokens=False).encode("utf-8")

    def save(self, path: str | Path) -> None:
        from lmforge.io import atomic_write_text

        atomic_write_text(path, self.hf.to_str(pretty=True))


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def encode_long(tokenizer: TextTokenizer, text: str) -> list[int]:
    """Encode a long text in parallel chunks.

    Chunks are cut just after a newline that is followed by a non-space
    character: byte-level and word pre-tokenizers always split there, so the
    result equals encoding the whole text at once.
    """
    if tokenizer.kind == "char":
        pieces = _chunks(text)
    else:
        pieces, start = [], 0
        while start < len(text):
            cut = _SAFE_CUT.search(text, start + (1 << 16))
            end = len(text) if cut is None else cut.end()
            pieces.append(text[start:end])
            start = end
    ids: list[int] = []
    for part in tokenizer.encode_batch(pieces):
        ids.extend(part)
    return ids


def train_char_tokenizer(texts: Iterable[str]) -> TextTokenizer:
    """One token per Unicode character seen in the texts, plus `<unk>` and `<|endoftext|>`."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {UNK: 0, EOT: 1}
    for ch in sorted(chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([UNK, EOT])
    return TextTokenizer(tok, kind="char")


def train_word_tokenizer(
    texts: Iterable[str], vocab_size: int = 10000, min_frequency: int = 1
) -> TextTokenizer:
    """Words and punctuation marks as tokens; rarer words become `<unk>`."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[UNK, EOT]
    )
    tok.train_from_iterator(_iter_chunks(texts), trainer=trainer)
    return TextTokenizer(tok, kind="word")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> TextTokenizer:
    """Byte-level BPE (GPT-2 style): any text encodes, no `<unk>` ever needed."""
    if vocab_size < 257:
        raise UserError(
            f"A byte-level BPE vocabulary needs at least 257 tokens (256 bytes + <|endoftext|>), "
            f"not {vocab_size}; raise data.vocab_size.",
            settings=("data.vocab_size",),
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_chunks(texts), trainer=trainer)
    return TextTokenizer(tok, kind="bpe")


def _iter_chunks(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from text.splitlines(keepends=True)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a `tokenizer.json` (from lmforge or any Hugging Face tokenizer), with the sources' own
    tokenizer where `source_tokenizer.json` lies beside it (an encoder–decoder with two vocabularies)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    tokenizer = _load_tokenizer_file(path)
    if path.name == "tokenizer.json" and (path.parent / SOURCE_TOKENIZER).is_file():
        tokenizer.source = _load_tokenizer_file(path.parent / SOURCE_TOKENIZER)
    return tokenizer


def _load_tokenizer_file(path: Path) -> TextTokenizer:
    if not path.is_file():
        raise UserError(f"Tokenizer file {path} does not exist.")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise UserError(f"{path} is not a valid tokenizer.json ({e}).") from None
    model = type(tok.model).__name__
    if model == "WordLevel" and isinstance(tok.decoder, decoders.Fuse):
        kind = "char"
    elif model == "WordLevel":
        kind = "word"
    elif model == "BPE":
        kind = "bpe"
    else:
        kind = model.lower()
    return TextTokenizer(tok, kind=kind)


def build_tokenizer(spec: str, texts: list[str], vocab_size: int, min_frequency: int = 1) -> TextTokenizer:
    """Make the tokenizer named by `spec`: 'char', 'word', 'bpe', or a path to a tokenizer.json."""
    if spec == "char":
        return train_char_tokenizer(texts)
    if spec == "word":
        return train_word_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    if spec == "bpe":
        return train_bpe_tokenizer(texts, vocab_size=vocab_size)
    if spec.endswith(".json") or Path(spec).is_dir():
        return load_tokenizer(spec)
    raise UserError(f"Unknown tokenizer {spec!r}; use char, word, bpe, or the path to a tokenizer.json.")
