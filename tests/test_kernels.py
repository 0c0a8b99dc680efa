"""Kernels and precisions are chosen by what is measured on this CPU, never by a CPU flag."""

import json

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.inference import kernels, timing_cache
from lmforge.inference.loading import Int8Linear, load_for_inference, slower_precision_notice
from lmforge.models import build_model


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(timing_cache, "_timings", None)
    return tmp_path / "cache" / "kernel-timings.json"


def fake_timings(monkeypatch, seconds: dict[str, float]) -> list[str]:
    """Replace the stopwatch: each kernel 'takes' the given time; returns the kernels measured."""
    measured = []

    def measure(kernel, fn):
        measured.append(kernel)
        return seconds.get(kernel, 1.0) * getattr(fn, "products", 1)  # seconds per product

    monkeypatch.setattr(kernels, "measure", measure)
    return measured


@pytest.mark.parametrize("fastest", ["pack", "fbgemm", "dequantize", "native"])
def test_the_int8_kernel_is_the_one_measured_fastest(fresh_cache, monkeypatch, fastest):
    if f"int8-{fastest}" not in kernels._candidates_names(64, 96):
        pytest.fail(f"this torch build lacks the {fastest} kernel the test expects")
    fake_timings(monkeypatch, {f"int8-{fastest}": 0.001})
    layer = Int8Linear(torch.nn.Linear(64, 96))
    assert layer.kernel == fastest
    x = torch.randn(3, 64)
    reference = torch.nn.functional.linear(x, layer.weight_int8.float() * layer.scale[:, None], layer.bias)
    assert torch.allclose(layer(x), reference, atol=0.05)  # whichever kernel, the same product


def test_timings_are_measured_once_per_machine_and_kept(fresh_cache, monkeypatch):
    measured = fake_timings(monkeypatch, {"int8-fbgemm": 0.5})
    kernels.fastest_int8_kernel(32, 48)
    first = len(measured)
    assert first == len(kernels._candidates_names(32, 48))
    kernels.fastest_int8_kernel(32, 48)
    monkeypatch.setattr(timing_cache, "_timings", None)  # a new process: read back from the cache file
    kernels.fastest_int8_kernel(32, 48)
    assert len(measured) == first
    saved = json.loads(fresh_cache.read_text())
    assert (
        list(saved) == [timing_cache.machine_key()]
        and saved[timing_cache.machine_key()]["int8-fbgemm 32x48"] == 0.5
    )
    assert "torch " + torch.__version__ in timing_cache.machine_key()


def test_a_precision_slower_than_float32_here_says_so(fresh_cache, monkeypatch, tmp_path):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config
    from lmforge.tokenizers import train_char_tokenizer

    cfg = ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tokenizer = train_char_tokenizer(["abcdefghij klmnop"])
    save_checkpoint(tmp_path / "run", build_model(cfg), Config(model=cfg), tokenizer, {})
    slow_int8 = {"float32": 1.0, "float32-blocked": 1.0, "bfloat16": 0.5, "int8-pack": 3.0, "int8-fbgemm": 2.0,
                 "int8-dequantize": 4.0, "int8-native": 2.5}  # fmt: skip
    fake_timings(monkeypatch, slow_int8)
    import lmforge.inference.loading

    monkeypatch.setattr(
        lmforge.inference.loading, "_probe", lambda model, tokenizer: None
    )  # (quality: see real_models)
    notes = []
    load_for_inference(str(tmp_path / "run"), quantize="int8", notice=notes.append)
    # The whole-step native decoder (native/decoding.py) is attached to this GPT: each of its products
    # is counted at the native kernel's time (2.5 against float32's 1.0), not at FBGEMM's.
    assert len(notes) == 1 and "--quantize int8 measures 0.40x float32's decoding speed" in notes[0]
    notes.clear()
    load_for_inference(str(tmp_path / "run"), dtype="bfloat16", notice=notes.append)  # faster here: quiet
    assert notes == []
    model = build_model(cfg)
    assert slower_precision_notice(model, "bfloat16") is None
    # With the native decode step, bfloat16 is weighed by the native products of both precisions
    # (their eager timings above would call it faster)
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "another-cache"))
    monkeypatch.setattr(timing_cache, "_timings", None)
    fake_timings(monkeypatch, {**slow_int8, "float32-native": 1.0, "bfloat16-native": 1.6})
    bf16, _ = load_for_inference(str(tmp_path / "run"), dtype="bfloat16", notice=notes.append)
    assert bf16.native_decoder is not None
    assert len(notes) == 1 and "--dtype bfloat16 measures 0.62x float32's decoding speed" in notes[0]


def test_real_measurements_cover_every_kernel(fresh_cache):
    measured = kernels.timings(64, 256)
    assert set(measured) == set(kernels._candidates_names(64, 256))
    assert all(0 < t < 1 for t in measured.values())
    assert kernels.fastest_int8_kernel(64, 256) in ("pack", "fbgemm", "dequantize", "native")
    assert kernels.fastest_int8_kernel(64, 256, weight_only=True) in ("pack", "dequantize", "native")


def test_an_encoder_decoder_weighs_bfloat16_at_the_rows_it_decodes_together(fresh_cache, monkeypatch):
    """transduce multiplies about DECODE_ROWS hypotheses a step: bfloat16 is judged by products of
    that many rows, not by the one-row timings a decoder-only model is judged by."""
    from lmforge.seq2seq.decoding import DECODE_ROWS

    cfg = ModelConfig(arch="seq2seq", vocab_size=40, block_size=12, source_block_size=10, n_layer=1,
                      n_encoder_layer=1, n_head=2, n_embd=16)  # fmt: skip
    model = build_model(cfg)
    assert (
        kernels.PROMPT_ROWS == DECODE_ROWS
    )  # (inference.py may not import seq2seq.py: it imports inference)
    rows = f"rows{DECODE_ROWS}"
    measured = fake_timings(monkeypatch, {"bfloat16": 2.0, f"bfloat16-{rows}": 0.5, f"float32-{rows}": 1.0})
    assert slower_precision_notice(model, "bfloat16") is None  # slower at one row, faster at DECODE_ROWS
    assert set(measured) == {f"bfloat16-{rows}", f"float32-{rows}"}
    saved = json.loads(fresh_cache.read_text())[timing_cache.machine_key()]
    assert saved[f"{rows} bfloat16 16x16"] == 0.5 and saved[f"{rows} float32 16x40"] == 1.0
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(fresh_cache.parent.parent / "another-cache"))
    monkeypatch.setattr(timing_cache, "_timings", None)
    fake_timings(monkeypatch, {"bfloat16": 0.5, f"bfloat16-{rows}": 2.0, f"float32-{rows}": 1.0})
    notice = slower_precision_notice(model, "bfloat16")
    assert "--dtype bfloat16 measures 0.50x float32's decoding speed" in notice
    assert f"per step of {DECODE_ROWS} hypotheses" in notice
