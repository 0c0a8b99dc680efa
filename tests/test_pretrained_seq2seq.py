"""Pretrained encoder–decoders (BART, Marian) open as lmforge checkpoints: the logits, greedy and
beam outputs of tiny random models that transformers builds, their token protocol, the commands,
and the export back to a folder transformers loads."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from lmforge.checkpoint import open_checkpoint
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.generation_config import GenerationConfig
from lmforge.seq2seq.decoding import beam_search, greedy
from lmforge.seq2seq.training import pair_tokens
from lmforge.tokenizers import train_bpe_tokenizer

from .conftest import ENG_FRA_SAMPLE, saved_with_random_norms

# Special ids of the tiny models: any ids of the vocabulary do, as long as the two sides agree.
PAD, BOS, EOS = 1, 2, 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([ENG_FRA_SAMPLE.read_text("utf-8")], vocab_size=300)


def tiny_bart(tokenizer, forced_bos: bool):
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                        decoder_ffn_dim=48, max_position_embeddings=40, pad_token_id=PAD, bos_token_id=BOS,
                        eos_token_id=EOS, decoder_start_token_id=EOS, forced_eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config.forced_bos_token_id = BOS if forced_bos else None  # (generation_config.json)
    return model


def tiny_marian(tokenizer):
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                          decoder_ffn_dim=48, max_position_embeddings=40, pad_token_id=PAD, eos_token_id=EOS,
                          decoder_start_token_id=PAD, forced_eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    return MarianMTModel(config).eval()


def final_bias(model) -> None:
    """A non-zero final_logits_bias (transformers starts it at zero), so that a lost one shows."""
    model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))


def opened(theirs, folder, tokenizer):
    final_bias(theirs)
    saved_with_random_norms(theirs, folder, tokenizer)
    ours, _ = open_checkpoint(folder).load()
    return ours.eval()


def generated_text(row: torch.Tensor) -> list[int]:
    """The tokens transformers generated in `row`: after the start token, up to the first end (the
    padding after it is no output)."""
    tokens = row[1:].tolist()
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def assert_same_as_transformers(
    theirs, ours, tokenizer, texts: list[str], longest: int, steps: int, target_length: int, **generate
) -> list[list[int]]:
    """The logits of a teacher-forced batch within 1e-4 of transformers', and greedy and beam-4 outputs
    of `steps` tokens identical to its `generate`; the sources (with the model's own tokens) back."""
    tokens = pair_tokens(ours.config, tokenizer)
    sources = [tokens.around(tokenizer.encode(t), longest) for t in texts]
    width = max(map(len, sources))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in sources])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources])
    target = torch.randint(4, tokenizer.vocab_size, (len(texts), target_length))
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
        got, _ = ours(ids, mask.bool(), target)
    assert (expected - got).abs().max() < 1e-4
    for beams in (1, 4):
        with torch.no_grad():
            generated = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, num_beams=beams,
                                        do_sample=False, early_stopping=True, length_penalty=1.0, min_length=0,
                                        no_repeat_ngram_size=0, **generate)  # fmt: skip
        decode = greedy if beams == 1 else partial(beam_search, beams=beams)
        for row, output in enumerate(decode(ours, sources, tokens, steps)):
            assert generated_text(generated[row]) == output, (beams, row)
    return sources


BUILDERS = {"bart": lambda tok: tiny_bart(tok, forced_bos=True), "marian": tiny_marian}


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_logits_greedy_and_beams_equal_transformers(kind, tokenizer, tmp_path):
    theirs = BUILDERS[kind](tokenizer)
    ours = opened(theirs, tmp_path / kind, tokenizer)
    assert ours.config.post_norm and ours.config.logits_bias
    texts = ["The cat sits on the mat.", "Where is the station?"]
    sources = assert_same_as_transformers(
        theirs, ours, tokenizer, texts, longest=40, steps=12, target_length=6
    )
    assert sources[0][-1] == EOS and (sources[0][0] == BOS) == (kind == "bart")
    tokens = pair_tokens(ours.config, tokenizer)
    if kind == "bart":  # the forced first token
        assert all(output[0] == BOS for output in greedy(ours, sources, tokens, 12))


@pytest.mark.parametrize("kind", ["bart", "marian"])
def test_export_gives_back_the_same_folder_that_transformers_loads(kind, tokenizer, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    theirs = BUILDERS[kind](tokenizer)
    opened(theirs, tmp_path / "in", tokenizer)
    assert main(["export", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == kind
    for key in ("decoder_start_token_id", "eos_token_id", "bos_token_id"):
        assert written[key] == theirs.config.to_dict()[key], key
    assert written.get("forced_bos_token_id") == theirs.generation_config.forced_bos_token_id
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(theirs)
    from safetensors.torch import load_file

    before, after = (
        load_file(tmp_path / "in" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert set(before) <= set(after) | {"lm_head.weight"}  # (a tied head is not written)
    for name, tensor in after.items():
        if name.endswith("embed_positions.weight") and kind == "bart":  # the 2 rows BART never reads
            before[name], tensor = before[name][2:], tensor[2:]
        if name in before:
            assert torch.equal(before[name], tensor), name
    ids = torch.tensor([[BOS, 40, 41, 42, EOS]])
    target = torch.tensor([[EOS, 50, 51]])
    with torch.no_grad():
        assert torch.allclose(
            theirs(input_ids=ids, decoder_input_ids=target).logits,
            again(input_ids=ids, decoder_input_ids=target).logits, atol=1e-5,
        )  # fmt: skip


def test_translate_on_an_opus_mt_folder_gives_transformers_translation(tmp_path, capsys):
    """A Marian folder as OPUS-MT ships it (SentencePiece files and vocab.json, no tokenizer.json):
    `lmforge translate` gives the text of transformers' greedy output, decoded by MarianTokenizer."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    vocab = marian_folder(tmp_path / "m", ENG_FRA_SAMPLE)
    config = MarianConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                          decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=vocab["<pad>"],
                          eos_token_id=0, decoder_start_token_id=vocab["<pad>"], scale_embedding=True,
                          forced_eos_token_id=None)  # fmt: skip
    torch.manual_seed(1)
    theirs = MarianMTModel(config).eval()
    final_bias(theirs)
    theirs.save_pretrained(tmp_path / "m")
    reference = MarianTokenizer(
        *(str(tmp_path / "m" / n) for n in ("source.spm", "target.spm", "vocab.json"))
    )
    text = "Where is the station?"
    with torch.no_grad():
        ids = theirs.generate(**reference([text], return_tensors="pt"), max_new_tokens=10, num_beams=1,
                              do_sample=False)  # fmt: skip
    expected = reference.decode(ids[0], skip_special_tokens=True)
    code = main(["translate", str(tmp_path / "m"), "--text", text, "--max-new-tokens", "10", "--beams", "1"])
    assert code == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def separate_marian_folder(folder, text_file) -> tuple[dict[str, int], dict[str, int]]:
    """A Marian folder with separate vocabularies, as transformers' MarianTokenizer reads it: source.spm +
    vocab.json for the sources, target.spm + target_vocab.json for the targets (</s>, <unk>, <pad> first in
    both, so that the padding id fits both embeddings)."""
    import sentencepiece as spm

    marian_folder(folder, text_file)  # (the two SentencePiece models)
    vocabs = []
    for side in ("source", "target"):
        processor = spm.SentencePieceProcessor(model_file=str(folder / f"{side}.spm"))
        vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
        for piece in [processor.id_to_piece(i) for i in range(1, processor.get_piece_size())]:
            vocab.setdefault(piece, len(vocab))
        vocabs.append(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocabs[0], ensure_ascii=False))
    (folder / "target_vocab.json").write_text(json.dumps(vocabs[1], ensure_ascii=False))
    return vocabs[0], vocabs[1]


def test_a_marian_model_with_separate_vocabularies_translates_as_transformers_does(tmp_path, capsys):
    """Sources in their own vocabulary and embedding, targets in theirs: the logits within 1e-4 of
    transformers', `lmforge translate` prints MarianTokenizer's decoding of transformers' greedy output,
    the export is the same model again, and fine-tuning (not supported yet) is refused in one sentence."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    from lmforge.seq2seq.decoding import transduce

    source_vocab, target_vocab = separate_marian_folder(tmp_path / "m", ENG_FRA_SAMPLE)
    assert len(source_vocab) != len(target_vocab)
    config = MarianConfig(vocab_size=len(source_vocab), decoder_vocab_size=len(target_vocab),
                          share_encoder_decoder_embeddings=False, d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                          max_position_embeddings=64, pad_token_id=2, eos_token_id=0, decoder_start_token_id=2,
                          scale_embedding=True, forced_eos_token_id=None)  # fmt: skip
    torch.manual_seed(3)
    theirs = MarianMTModel(config).eval()
    final_bias(theirs)
    theirs.save_pretrained(tmp_path / "m")
    reference = MarianTokenizer(*(str(tmp_path / "m" / n) for n in ("source.spm", "target.spm", "vocab.json")),
                                target_vocab_file=str(tmp_path / "m" / "target_vocab.json"), separate_vocabs=True)  # fmt: skip
    ours, tokenizer = open_checkpoint(tmp_path / "m").load()
    assert ours.config.source_vocab_size == len(source_vocab) and ours.config.vocab_size == len(target_vocab)
    assert tokenizer.source.vocab_size == len(source_vocab)
    texts = ["Where is the station?", "I like tea."]
    batch = reference(texts, return_tensors="pt", padding=True)
    assert (
        tokenizer.source.encode(texts[0]) == reference(texts[0])["input_ids"][:-1]
    )  # (</s> added by the model)
    target = torch.randint(3, len(target_vocab), (2, 7))
    with torch.no_grad():
        expected = theirs(**batch, decoder_input_ids=target).logits
        got, _ = ours.eval()(batch["input_ids"], batch["attention_mask"].bool(), target)
        generated = theirs.generate(**batch, max_new_tokens=10, num_beams=1, do_sample=False)
    assert (expected - got).abs().max() < 1e-4
    expected_text = [reference.decode(row, skip_special_tokens=True).strip() for row in generated]
    assert [t.strip() for t in transduce(ours, tokenizer, texts, GenerationConfig(max_new_tokens=10, num_beams=1))] \
        == expected_text  # fmt: skip
    assert (
        main(["translate", str(tmp_path / "m"), "--text", texts[0], "--max-new-tokens", "10", "--beams", "1"])
        == 0
    )
    assert capsys.readouterr().out.strip() == expected_text[0]
    # exported back: transformers' model of the same weights; lmforge opens the export with both tokenizers
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "back")]) == 0
    again = MarianMTModel.from_pretrained(tmp_path / "back").eval()
    assert (
        again.config.decoder_vocab_size == len(target_vocab)
        and not again.config.share_encoder_decoder_embeddings
    )
    with torch.no_grad():
        assert (again(**batch, decoder_input_ids=target).logits - expected).abs().max() < 1e-4
    reopened, back_tokenizer = open_checkpoint(tmp_path / "back").load()
    assert back_tokenizer.source.vocab_size == len(source_vocab)
    assert transduce(reopened, back_tokenizer, texts[:1], GenerationConfig(max_new_tokens=10, num_beams=1)) == \
        transduce(ours, tokenizer, texts[:1], GenerationConfig(max_new_tokens=10, num_beams=1))  # fmt: skip
    # fine-tuned on pairs: sources in the sources' vocabulary, targets in the targets'; the run keeps both
    from lmforge.config import Config, DataConfig
    from lmforge.seq2seq.data import prepare_pairs

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("Where is the station?\tOù est la gare ?\nI like tea.\tJ'aime le thé.\n" * 4)
    (tmp_path / "tok").mkdir()
    tokenizer.source.save(tmp_path / "tok" / "source_tokenizer.json")
    tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    data = DataConfig(
        path=str(pairs), val_path=str(pairs), tokenizer=str(tmp_path / "tok" / "tokenizer.json")
    )
    prepared = prepare_pairs(Config(data=data, model=ours.config), log=lambda _: None)
    assert list(prepared.val_sources[0]) == tokenizer.source.encode(texts[0])
    assert list(prepared.val_targets[0]) == tokenizer.encode("Où est la gare ?")
    assert tokenizer.source.encode(texts[0]) != tokenizer.encode(texts[0])  # (so the two are told apart)
    capsys.readouterr()
    assert main(["finetune", str(tmp_path / "m"), "--data", str(pairs), "--out", str(tmp_path / "ft"),
                 "--max-iters", "2", "--quiet"]) == 0, capsys.readouterr().err  # fmt: skip
    tuned, tuned_tokenizer = open_checkpoint(tmp_path / "ft").load()
    assert (
        tuned.config.source_vocab_size == len(source_vocab)
        and (tmp_path / "ft" / "source_tokenizer.json").is_file()
    )
    assert tuned_tokenizer.source.encode(texts[0]) == tokenizer.source.encode(texts[0])
    assert main(["translate", str(tmp_path / "ft"), "--text", texts[0], "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    # a source vocabulary that does not fit the encoder's embedding: the files do not belong together
    (tmp_path / "m" / "vocab.json").write_text(json.dumps({**source_vocab, **{f"x{i}": len(source_vocab) + i
                                                                               for i in range(9)}}))  # fmt: skip
    assert main(["translate", str(tmp_path / "m"), "--text", "hello"]) == 2
    assert "do not belong together" in capsys.readouterr().err


def marian_folder(folder, text_file) -> dict[str, int]:
    """A Marian tokenizer's files (SentencePiece trained here on the test pairs), as OPUS-MT lays them
    out: source.spm, target.spm and one vocab.json (</s> 0, <unk> 1, the pieces, language codes, <pad>)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    lines = [part for line in text_file.read_text("utf-8").splitlines() for part in line.split("\t")[:2]]
    for side in ("source", "target"):
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / side),
                                       vocab_size=220 if side == "source" else 240, model_type="unigram",
                                       bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)  # fmt: skip
        (folder / f"{side}.model").rename(folder / f"{side}.spm")
    pieces = []
    for side in ("source", "target"):
        processor = spm.SentencePieceProcessor(model_file=str(folder / f"{side}.spm"))
        pieces += [processor.id_to_piece(i) for i in range(1, processor.get_piece_size())]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in [*pieces, ">>fra<<", ">>deu<<", "<pad>"]:
        vocab.setdefault(piece, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return vocab


def test_a_marian_tokenizer_gives_transformers_token_ids(tmp_path):
    from transformers import MarianTokenizer

    from lmforge.interop.hf import load_hf_tokenizer

    marian_folder(tmp_path, ENG_FRA_SAMPLE)
    theirs = MarianTokenizer(*(str(tmp_path / name) for name in ("source.spm", "target.spm", "vocab.json")))
    ours = load_hf_tokenizer(tmp_path)
    texts = ["The cat sits on the mat.", "Où est la gare ?  Très   loin!", "Größe: 3,5 km — naïve façade.",
             ">>fra<< I love Paris.", "東京は日本の首都です。", "  leading and trailing  ", "tab\there"]  # fmt: skip
    for text in texts:
        expected = theirs(text).input_ids  # (with the </s> it adds)
        assert ours.encode(text) + [theirs.eos_token_id] == expected, text
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True), text


def test_a_damaged_spm_file_is_one_clear_error(tmp_path, capsys):
    marian_folder(tmp_path / "m", ENG_FRA_SAMPLE)
    (tmp_path / "m" / "source.spm").write_bytes(b"not a protobuf at all \x00\xff")
    from lmforge.interop.hf import load_hf_tokenizer

    with pytest.raises(UserError, match="source.spm is not a SentencePiece model"):
        load_hf_tokenizer(tmp_path / "m")


def tiny_t5(tokenizer, flan: bool):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                      num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=20, feed_forward_proj="gated-gelu" if flan else "relu",
                      tie_word_embeddings=not flan, pad_token_id=PAD, eos_token_id=EOS,
                      decoder_start_token_id=PAD)  # fmt: skip
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("flan", [False, True], ids=["t5", "flan-t5"])
def test_t5_logits_greedy_beams_and_export_equal_transformers(flan, tokenizer, tmp_path):
    """T5 (ReLU, tied and scaled head) and T5 v1.1 / Flan-T5 (gated GELU, untied head): relative
    position buckets, long enough sources and outputs to reach the logarithmic buckets."""
    from transformers import AutoModelForSeq2SeqLM

    theirs = tiny_t5(tokenizer, flan)
    saved_with_random_norms(theirs, tmp_path / "t5", tokenizer)
    ours, _ = open_checkpoint(tmp_path / "t5").load()
    ours.eval()
    tokens = pair_tokens(ours.config, tokenizer)
    assert (tokens.start, tokens.end, tokens.source_suffix) == (PAD, EOS, (EOS,))
    texts = ["The cat sits on the mat, and the dog sleeps under the old wooden table.", "Where is it?"]
    # (use_cache False: transformers' cache assumes as many decoder layers as encoder layers)
    sources = assert_same_as_transformers(theirs, ours, tokenizer, texts, longest=512, steps=24, target_length=25,
                                          use_cache=False)  # fmt: skip
    assert main(["export", str(tmp_path / "t5"), "--out", str(tmp_path / "out")]) == 0
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    source, target = torch.tensor([sources[0]]), torch.tensor([[PAD, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = theirs(input_ids=source, decoder_input_ids=target).logits
        assert (again(input_ids=source, decoder_input_ids=target).logits - expected).abs().max() < 1e-5


def test_t5_task_prefixes_go_before_the_sources(tokenizer, tmp_path, capsys, monkeypatch):
    """T5's task_specific_params: summarize puts "summarize: " first; a model that translates several
    ways asks for --prefix; the prefix given is the one used."""
    import lmforge.seq2seq.decoding as seq2seq

    theirs = tiny_t5(tokenizer, flan=False)
    theirs.config.task_specific_params = {
        "summarization": {"prefix": "summarize: "},
        "translation_en_to_de": {"prefix": "translate English to German: "},
        "translation_en_to_fr": {"prefix": "translate English to French: "},
    }
    saved_with_random_norms(theirs, tmp_path / "t5", tokenizer)
    seen = []
    encode = seq2seq._encode_sources
    monkeypatch.setattr(
        seq2seq,
        "_encode_sources",
        lambda m, t, sources, *a: seen.append(sources) or encode(m, t, sources, *a),
    )

    def run(*command) -> list[str]:
        assert (
            main(
                [*command, str(tmp_path / "t5"), "--text", "the cat", "--beams", "1", "--max-new-tokens", "3"]
            )
            == 0
        )
        return seen.pop()

    assert run("summarize") == ["summarize: the cat"]
    assert run("summarize", "--prefix", "") == ["the cat"]
    assert run("translate", "--prefix", "translate English to French: ") == [
        "translate English to French: the cat"
    ]
    assert main(["translate", str(tmp_path / "t5"), "--text", "the cat"]) == 2
    assert "translates several ways" in capsys.readouterr().err


def test_an_encoder_decoder_loads_in_int8_close_to_float(tokenizer, tmp_path):
    """--quantize int8 on an encoder–decoder: every linear layer in int8 (the faithfulness probe reads
    the model as source and target), logits close to float32's."""
    from lmforge.inference.loading import Int8Linear, load_for_inference

    opened(tiny_marian(tokenizer), tmp_path / "m", tokenizer)
    exact, _ = load_for_inference(str(tmp_path / "m"))
    model, _ = load_for_inference(str(tmp_path / "m"), quantize="int8", notice=lambda _: None)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 5 + 2 * 8 + 1  # (and the head)
    source = torch.tensor([tokenizer.encode("The cat sits on the mat.") + [EOS]])
    valid = torch.ones_like(source, dtype=torch.bool)
    target = torch.tensor([[PAD, 40, 41, 42]])
    with torch.no_grad():
        a, b = exact(source, valid, target)[0], model(source, valid, target)[0]
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_finetuning_a_marian_model_uses_its_tokens_and_transformers_loss(tmp_path, capsys):
    """A training batch of a pretrained encoder–decoder frames sources and targets with its own tokens:
    the loss equals transformers' for the same pairs (labels = target + </s>). `lmforge finetune` then
    trains it in full and with LoRA on pairs, with its tokenizer, and the result translates."""
    from transformers import MarianConfig, MarianMTModel

    from lmforge.seq2seq.training import make_batch

    vocab = marian_folder(tmp_path / "m", ENG_FRA_SAMPLE)
    config = MarianConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                          decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=vocab["<pad>"],
                          eos_token_id=0, decoder_start_token_id=vocab["<pad>"], forced_eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    theirs = MarianMTModel(config).eval()
    final_bias(theirs)
    theirs.save_pretrained(tmp_path / "m")
    ours, tokenizer = open_checkpoint(tmp_path / "m").load()
    pairs = [("The cat sits on the mat.", "Le chat est sur le tapis."), ("Where is it?", "Où est-il ?")]
    sources = [tokenizer.encode(s) for s, _ in pairs]
    targets = [tokenizer.encode(t) for _, t in pairs]
    source, valid, target_in, labels = make_batch(
        sources, targets, pair_tokens(ours.config, tokenizer), "cpu"
    )
    assert (
        source[0, len(sources[0])] == 0 and target_in[0, 0] == vocab["<pad>"]
    )  # </s> after; starts at <pad>
    with torch.no_grad():
        _, loss = ours.eval()(source, valid, target_in, labels)
        expected = theirs(input_ids=source, attention_mask=valid.long(), labels=labels).loss
    assert abs(float(loss) - float(expected)) < 1e-5
    for name, extra in (
        ("full", []),
        ("lora", ["--lora-rank", "4", "--lora-targets", "attn.q,attn.kv,cross.q"]),
    ):
        code = main(["finetune", str(tmp_path / "m"), "--data", str(ENG_FRA_SAMPLE), "--out",
                     str(tmp_path / name), "--max-iters", "3", "--quiet", *extra])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        tuned = open_checkpoint(tmp_path / name)
        assert tuned.config.model.decoder_start_id == vocab["<pad>"] and tuned.metadata["step"] == 3
        assert (
            main(["translate", str(tmp_path / name), "--text", "Where is it?", "--max-new-tokens", "4"]) == 0
        )


def test_eval_and_serve_take_a_pretrained_translator(tmp_path, capsys):
    """`lmforge eval` scores a Marian folder on pairs (BLEU of its own translations), and the server
    answers a completion with the translation `translate` gives."""
    from lmforge.evaluation.metrics import bleu_chrf
    from lmforge.generation_config import GenerationConfig
    from lmforge.seq2seq.decoding import references_by_source, task_defaults, transduce
    from lmforge.serving.server import ServerSettings, create_app

    from .test_serve import RunningServer

    tokenizer = train_bpe_tokenizer([ENG_FRA_SAMPLE.read_text("utf-8")], vocab_size=300)
    opened(tiny_marian(tokenizer), tmp_path / "m", tokenizer)
    lines = ENG_FRA_SAMPLE.read_text("utf-8").splitlines()[:8]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    assert (
        main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "pairs.tsv"), "--beams", "1", "--json"])
        == 0
    )
    scored = json.loads(capsys.readouterr().out)
    model, _ = open_checkpoint(tmp_path / "m").load()
    sources, references = references_by_source(
        [x.split("\t")[0] for x in lines], [x.split("\t")[1] for x in lines]
    )
    outputs = transduce(model.eval(), tokenizer, sources, GenerationConfig(num_beams=1, max_new_tokens=0,
                                                                          **task_defaults("translation")))  # fmt: skip
    assert scored["bleu"] == pytest.approx(bleu_chrf(outputs, references)["bleu"])
    server = RunningServer(create_app(model, tokenizer, ServerSettings(model_name="m"), ""))
    try:
        answer = server.client().completions.create(model="m", prompt=sources[0], max_tokens=5)
    finally:
        server.stop()
    short = transduce(model, tokenizer, [sources[0]], GenerationConfig(num_beams=1, max_new_tokens=5))[0]
    assert answer.choices[0].text == short


@pytest.mark.parametrize("kind", ["marian", "t5"])
def test_an_encoder_decoder_lora_run_is_a_peft_adapter_transformers_runs(kind, tokenizer, tmp_path, capsys):
    """LoRA on a Marian or T5 model (stacked key/value layers included) is written in PEFT's format
    too: peft puts it on the transformers model with the logits of lmforge's merged run, and lmforge
    merges the PEFT folder back (`--adapter`) to the same logits."""
    from peft import PeftModel

    from lmforge.inference.loading import load_for_inference

    theirs = tiny_marian(tokenizer) if kind == "marian" else tiny_t5(tokenizer, flan=True)
    saved_with_random_norms(theirs, tmp_path / "base", tokenizer)
    code = main(["finetune", str(tmp_path / "base"), "--data", str(ENG_FRA_SAMPLE), "--out", str(tmp_path / "run"),
                 "--max-iters", "5", "--quiet", "--lora-rank", "4", "--lr", "0.05", "--optim.warmup_iters", "0",
                 "--lora-targets", "attn.q,attn.kv,cross.kv,mlp.c_fc"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    tuned, _ = open_checkpoint(tmp_path / "run").load()
    base = type(theirs).from_pretrained(tmp_path / "base").eval()
    source = torch.tensor([tokenizer.encode("The cat sits on the mat.") + [EOS]])
    valid = torch.ones_like(source, dtype=torch.bool)
    target = torch.tensor([[PAD, 40, 41, 42]])
    with torch.no_grad():
        untuned = base(input_ids=source, decoder_input_ids=target).logits
        peft_model = PeftModel.from_pretrained(base, tmp_path / "run").eval()  # (adapts `base` in place)
        ours = tuned.eval()(source, valid, target)[0]
        expected = peft_model(input_ids=source, decoder_input_ids=target).logits
    assert (ours - untuned).abs().max() > 1e-3  # the adapters changed something
    assert (ours - expected).abs().max() < 1e-4
    merged, _ = load_for_inference(
        str(tmp_path / "base"), adapter=str(tmp_path / "run" / "adapter_config.json")
    )
    with torch.no_grad():
        assert (merged(source, valid, target)[0] - ours).abs().max() < 1e-4


def test_a_t5_folder_with_only_spiece_model_tokenizes_as_transformers(tmp_path):
    """T5 folders may ship only SentencePiece's spiece.model: lmforge builds the tokenizer (the pieces,
    then <extra_id_99> … <extra_id_0>) and gives transformers' T5 tokenizer's ids."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    from lmforge.interop.hf import load_hf_tokenizer

    lines = [part for line in ENG_FRA_SAMPLE.read_text("utf-8").splitlines() for part in line.split("\t")[:2]]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=250, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)  # fmt: skip
    theirs = T5Tokenizer.from_pretrained(str(tmp_path))
    ours = load_hf_tokenizer(tmp_path)
    assert ours.vocab_size == len(theirs) == 250 + 100
    texts = ["The cat sits on the mat.", "Où est la gare ?  Très   loin!", "naïve façade <extra_id_0> end",
             "translate English to French: Hello"]  # fmt: skip
    for text in texts:
        expected = theirs(text).input_ids
        assert ours.encode(text) + [1] == expected, text
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True), text
