"""SentencePiece models (Marian's `*.spm`, T5's `spiece.model`) as Hugging Face `tokenizers` tokenizers.

Marian (OPUS-MT) folders ship no tokenizer.json: a SentencePiece model per side (`source.spm`,
`target.spm`) cuts text into pieces, and `vocab.json` gives each piece its id in the model's one
vocabulary. The tokenizer built here is a `tokenizers` Unigram over vocab.json's pieces, scored
as the source side's SentencePiece model scores them (pieces only the target side knows get a score
below every source piece, so encoding uses source pieces where it can, as Marian does), with
SentencePiece's normalisation (its precompiled character map, runs of spaces folded, trailing
spaces stripped), the "▁" word marker, and the special tokens (</s>, <unk>, <pad>, >>lang<< codes)
kept whole. Decoding needs only the vocabulary, so one tokenizer serves both sides.

Reading an .spm file needs protobuf's generated classes for SentencePiece's ModelProto, which the
`sentencepiece` package or `transformers` (lmforge's [hf] extra) brings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmforge.errors import UserError
from lmforge.tokenizers import TextTokenizer

UNIGRAM = 1  # SentencePiece's TrainerSpec.model_type of a unigram model
LANGUAGE_CODE = re.compile(r">>[^<>\s]+<<")


def _proto_module():
    try:
        from sentencepiece import sentencepiece_model_pb2

        return sentencepiece_model_pb2
    except ImportError:
        pass
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        return import_protobuf()
    except ImportError:
        raise UserError("Reading a SentencePiece model (.spm) needs protobuf's classes for it, which come with "
                        "transformers or sentencepiece: pip install 'lmforge[hf]'.") from None  # fmt: skip


def read_spm(path: Path):
    """The ModelProto of a SentencePiece model file, or one sentence saying why it cannot be read."""
    proto = _proto_module().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or an unreadable file
        raise UserError(f"{path} is not a SentencePiece model ({e}); the model folder is damaged.") from None
    if proto.trainer_spec.model_type != UNIGRAM:
        raise UserError(f"{path} is a SentencePiece model of a kind lmforge does not read (only unigram models, "
                        f"which Marian and T5 use).")  # fmt: skip
    return proto


def marian_tokenizer(folder: Path) -> TextTokenizer:
    """The tokenizer of a Marian folder: source.spm + vocab.json for both sides, or, where the model has
    separate vocabularies (a target_vocab.json beside them), the targets' (target.spm + target_vocab.json)
    with the sources' as its `source`."""
    if not (folder / "target_vocab.json").is_file():
        return _marian_side(folder, "vocab.json", "source.spm")
    tokenizer = _marian_side(folder, "target_vocab.json", "target.spm")
    tokenizer.source = _marian_side(folder, "vocab.json", "source.spm")
    return tokenizer


def _marian_side(folder: Path, vocab_file: str, spm_file: str) -> TextTokenizer:
    """One side's tokenizer: a `tokenizers` Unigram over the vocabulary's ids with the SentencePiece
    model's scores and normaliser."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    try:
        vocab = json.loads((folder / vocab_file).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / vocab_file} cannot be read ({e}); copy the model's {vocab_file} beside its "
                        f"weights.") from None  # fmt: skip
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise UserError(
            f"{folder / vocab_file} is not a Marian vocabulary (piece → id); the folder is damaged."
        )
    if "<unk>" not in vocab:
        raise UserError(f"{folder / vocab_file} has no <unk>; the folder is damaged.")
    proto = read_spm(folder / spm_file)
    scores = {p.piece: p.score for p in proto.pieces}
    floor = min(scores.values(), default=0.0) - 10.0
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise UserError(f"{folder / vocab_file} does not number its pieces 0..{len(by_id) - 1}; the folder is "
                        f"damaged.")  # fmt: skip
    tok = Tokenizer(Unigram([(piece, scores.get(piece, floor)) for piece, _ in by_id], vocab["<unk>"], False))
    charsmap = proto.normalizer_spec.precompiled_charsmap
    steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap), *steps] if charsmap else steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(
        [AddedToken(p, normalized=False) for p in ("</s>", "<unk>", "<pad>") if p in vocab]
    )
    codes = [p for p, _ in by_id if LANGUAGE_CODE.fullmatch(p)]  # kept whole, and shown when decoded
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in codes])
    return TextTokenizer(tok, kind="sentencepiece")


def t5_tokenizer(folder: Path, extra_ids: int = 100) -> TextTokenizer:
    """The tokenizer of a T5 folder that ships only SentencePiece's spiece.model: its pieces in their
    own order (<pad> 0, </s> 1, <unk> 2 ...), then the sentinel tokens <extra_id_99> … <extra_id_0>;
    SentencePiece's normaliser map, words split at whitespace with the ▁ marker, </s> after each text
    (as transformers' T5 tokenizer builds it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    proto = read_spm(folder / "spiece.model")
    vocab = [(p.piece, p.score) for p in proto.pieces] + [
        (f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))
    ]
    tok = Tokenizer(Unigram(vocab, proto.trainer_spec.unk_id, False))
    if proto.normalizer_spec.precompiled_charsmap:
        tok.normalizer = normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = [p for p in ("<pad>", "</s>", "<unk>") if tok.token_to_id(p) is not None]
    tok.add_special_tokens([AddedToken(p, normalized=False) for p in specials])
    tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", normalized=False) for i in range(extra_ids)])
    eos = tok.token_to_id("</s>")
    if eos is not None:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", eos)])  # fmt: skip
    return TextTokenizer(tok, kind="sentencepiece")
