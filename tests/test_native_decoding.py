"""The whole-step native decoder (native/decode_step.c, native/decoding.py): every option of a GPT
that changes inference, with padding, batches and a sliding window, against the PyTorch forward pass
on the same int8, 4-bit, float32 or bfloat16 weights; attached only where it applies and measures faster."""

import copy

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config, ModelConfig
from lmforge.inference import timing_cache
from lmforge.inference.generation import GenerationConfig, generate, generate_ids
from lmforge.inference.loading import (
    Int4Linear,
    Int8Linear,
    fuse_projections,
    load_for_inference,
    quantize_int4,
    quantize_int8,
)
from lmforge.inference.native.decoding import NativeDecoder, attach, step_logits, why_not_native
from lmforge.models.gpt import GPT
from lmforge.tokenizers import train_char_tokenizer
from tests.native_loops import PRODUCT_LOOPS, TILE_SETTINGS, product_loops, tiles_from

VARIANTS = {
    "gpt2-like": dict(norm="layernorm", activation="gelu", pos_encoding="learned", bias=True),
    "llama-like": dict(norm="rmsnorm", activation="swiglu", pos_encoding="rope", n_kv_head=2, bias=False),
    "qk-norm softcap": dict(norm="rmsnorm", activation="swiglu", pos_encoding="rope", qk_norm=True, logit_softcap=5.0),
    "sinusoidal gelu-tanh": dict(norm="layernorm", activation="gelu_tanh", pos_encoding="sinusoidal", bias=False),
    "relu2 mqa qkv-bias": dict(norm="layernorm", activation="relu2", pos_encoding="rope", n_kv_head=1, qkv_bias=True),
}  # fmt: skip


def int8_model(seed: int = 0, bits: int = 8, **options) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_embd=64, block_size=32, **options)
    model = GPT(cfg).eval()
    with torch.no_grad():  # GPT-2's initialisation leaves biases and gains flat: make them matter
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    fuse_projections(model)
    (quantize_int8 if bits == 8 else quantize_int4)(model)
    for layer in model.modules():
        if isinstance(layer, Int8Linear | Int4Linear):
            layer.kernel = "dequantize"  # the reference: the same quantised weights, multiplied in float
    return model


def prefilled_caches(model: GPT, rows: int, generator: torch.Generator):
    """The last prompt position of each row, and two caches holding the same 6-token prompts (rows
    after the first left-padded by two: the native step must skip those slots)."""
    prompt = torch.randint(0, 61, (rows, 6), generator=generator)
    mask = torch.ones(rows, 6, dtype=torch.bool)
    mask[1:, :2] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    caches = model.new_cache(rows, 12), model.new_cache(rows, 12)
    for cache in caches:
        model(prompt, cache=cache, positions=positions, attention_mask=mask)
    return positions[:, -1], *caches


@pytest.mark.parametrize("wide", PRODUCT_LOOPS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.inference_mode()
def test_a_native_step_equals_the_forward_pass_on_the_same_quantised_weights(variant, rows, bits, wide):
    model = int8_model(bits=bits, **VARIANTS[variant])
    assert why_not_native(model) is None
    assert any(isinstance(layer, Int4Linear if bits == 4 else Int8Linear) for layer in model.modules())
    decoder = NativeDecoder(model)
    generator = torch.Generator().manual_seed(1)
    last, reference, native = prefilled_caches(model, rows, generator)
    for _ in range(4):
        tokens = torch.randint(0, 61, (rows,), generator=generator)
        at = last + 1 + torch.arange(reference.length - 6, reference.length - 5).expand(rows)
        expected = model(tokens[:, None], cache=reference, positions=at[:, None])[0][:, -1]
        with product_loops(wide):
            got = decoder.step(tokens, at, native)
        # the weights are the same; the native kernel rounds each input row to int16 per block of 64
        # (relative error < 2e-5 of the block's largest value) and sums in another order. A 4-bit
        # block multiplies the rounded input by scale * q, which spans max - min of the block: up to
        # twice an int8 weight's largest, so up to twice the error
        slack = 1 if bits == 8 else 2
        assert torch.allclose(got, expected, rtol=0, atol=slack * 2e-4 * expected.abs().max().item())
        assert native.length == reference.length
        for mine, theirs in ((native.k, reference.k), (native.v, reference.v)):
            assert torch.allclose(mine, theirs, rtol=0, atol=slack * 1e-4 * theirs.abs().max().item())
        assert torch.equal(native.valid, reference.valid)


@pytest.mark.parametrize("tiles", TILE_SETTINGS)
@pytest.mark.parametrize("variant", ["gpt2-like", "llama-like"])
@torch.inference_mode()
def test_a_native_step_with_int8_inputs_equals_the_forward_pass_on_the_same_products(variant, tiles):
    """With int8 inputs (native/int8_inputs.h: every product of both rounds its inputs to int8 per
    block of 64), the C step and the forward pass multiply alike: they differ in the float order of
    norms and attention, which can move a value across a rounding boundary (one step of 1/127)."""
    model = int8_model(**VARIANTS[variant])
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            layer.kernel, layer.int8_inputs = "native", True
            layer.native_prompts = True  # the prompt too
    decoder = NativeDecoder(model)
    generator = torch.Generator().manual_seed(1)
    last, reference, native = prefilled_caches(model, 3, generator)
    for _ in range(4):
        tokens = torch.randint(0, 61, (3,), generator=generator)
        at = last + 1 + torch.arange(reference.length - 6, reference.length - 5).expand(3)
        expected = model(tokens[:, None], cache=reference, positions=at[:, None])[0][:, -1]
        with tiles_from(tiles):
            got = decoder.step(tokens, at, native)
        assert torch.allclose(got, expected, rtol=0, atol=2e-3 * expected.abs().max().item())


def float_model(dtype: torch.dtype, seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_embd=64, block_size=32, **options)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return fuse_projections(model).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.inference_mode()
def test_a_native_step_with_float_weights_equals_float32_arithmetic_on_the_same_weights(variant, rows, dtype):
    """Float32 or bfloat16 weights: the native step computes in float32 throughout, so its reference
    is the float32 forward pass of the very same weights (bfloat16 ones widened exactly)."""
    model = float_model(dtype, **VARIANTS[variant])
    assert why_not_native(model) is None
    decoder = NativeDecoder(model)
    reference_model = copy.deepcopy(model).float()
    generator = torch.Generator().manual_seed(1)
    last, reference, native = prefilled_caches(reference_model, rows, generator)
    for step in range(4):
        tokens = torch.randint(0, 61, (rows,), generator=generator)
        at = last + 1 + step
        expected = reference_model(tokens[:, None], cache=reference, positions=at[:, None])[0][:, -1]
        got = decoder.step(tokens, at, native)
        # the same weights and float32 arithmetic: only the order of the sums differs
        assert torch.allclose(got, expected, rtol=0, atol=2e-5 * expected.abs().max().item())
        for mine, theirs in ((native.k, reference.k), (native.v, reference.v)):
            assert torch.allclose(mine, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
    # the model's own memory, not a copy: a bfloat16 model's weights are read as bfloat16
    assert decoder._layers[0].qkv.weight_bf16 == (
        model.blocks[0].attn.c_attn.weight.data_ptr() if dtype == torch.bfloat16 else None
    )


@torch.inference_mode()
def test_a_rotary_model_slides_its_window_natively_as_it_does_in_pytorch():
    model = int8_model(**VARIANTS["llama-like"])
    decoder = NativeDecoder(model)
    reference, native = model.new_cache(1, 8), model.new_cache(1, 8)
    prompt = torch.tensor([[5, 9, 12, 40, 2, 33]])
    for cache in (reference, native):
        model(prompt, cache=cache)
    for step in range(6):  # past the cache's 8 slots: the oldest ones are dropped
        token, at = torch.tensor([step + 7]), torch.tensor([6 + step])
        expected = model(token[:, None], cache=reference, positions=at[:, None])[0][:, -1]
        got = decoder.step(token, at, native)
        assert torch.allclose(got, expected, rtol=0, atol=2e-4 * expected.abs().max().item())
    assert native.length == reference.length == 8


def checkpoint(tmp_path, **options):
    cfg = ModelConfig(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=32, **options)
    tokenizer = train_char_tokenizer(["abcdefghij klmnopqrstuvwxyz,.!?"])
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    save_checkpoint(tmp_path / "run", model, Config(model=cfg), tokenizer, {})
    return str(tmp_path / "run")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("options", [{}, VARIANTS["llama-like"]], ids=["gpt2-like", "llama-like"])
def test_quantised_loading_attaches_the_decoder_and_generation_keeps_its_tokens(tmp_path, options, quantize):
    model, tokenizer = load_for_inference(checkpoint(tmp_path, **options), quantize=quantize)
    assert model.native_decoder is not None  # a tiny model is all dispatch: native measures faster
    assert isinstance(model.lm_head, Int8Linear)  # the head int8 either way
    kind = Int8Linear if quantize == "int8" else Int4Linear
    assert sum(isinstance(layer, kind) for layer in model.modules()) == 4 * 2 + (
        quantize == "int8"
    )  # 4 a block
    for layer in model.modules():  # the PyTorch path below: weight-only too (FBGEMM would round activations)
        if isinstance(layer, Int8Linear | Int4Linear):
            layer.kernel = "dequantize"
            # so the native step too, which rounds inputs to int16, not to int8 where that pays:
            # a tiny random model's greedy tokens hang on the last bits (int8 inputs are tested below)
            layer.int8_inputs = False
    model.native_decoder = NativeDecoder(model)
    prompts = ["abc", "hello, world"]  # different lengths: left padding
    # 40 tokens: past the 24-token context
    greedy = GenerationConfig(max_new_tokens=40, temperature=0, stop_at_eot=False)
    sampled = GenerationConfig(max_new_tokens=15, temperature=1.0, top_k=10, seed=3, stop_at_eot=False)
    native = [generate(model, tokenizer, prompts, c) for c in (greedy, sampled)]
    model.native_decoder = None
    assert [generate(model, tokenizer, prompts, c) for c in (greedy, sampled)] == native
    assert all(native[0]) and len(native[0][0]) > 10


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("options", [{}, VARIANTS["llama-like"]], ids=["gpt2-like", "llama-like"])
def test_float_loading_attaches_the_decoder_and_generation_keeps_its_tokens(tmp_path, options, dtype):
    model, tokenizer = load_for_inference(checkpoint(tmp_path, **options), dtype=dtype)
    assert model.native_decoder is not None  # a tiny model is all dispatch: native measures faster
    assert model.new_cache(1).k.dtype == torch.float32  # the native step's cache, whatever the weights
    assert model.lm_head.weight.dtype == getattr(torch, dtype)
    prompts = ["abc", "hello, world"]  # left padding; 40 tokens go past the 24-token context
    greedy = GenerationConfig(max_new_tokens=40, temperature=0, stop_at_eot=False)
    sampled = GenerationConfig(max_new_tokens=15, temperature=1.0, top_k=10, seed=3, stop_at_eot=False)
    native = [generate(model, tokenizer, prompts, c) for c in (greedy, sampled)]
    assert all(native[0]) and len(native[0][0]) > 10
    reference = copy.deepcopy(model)  # a copy decodes in PyTorch: the decoder is the original's
    assert reference.native_decoder is None
    if dtype == "float32":  # the same arithmetic in PyTorch: the same tokens
        assert [generate(reference, tokenizer, prompts, c) for c in (greedy, sampled)] == native
        return
    # bfloat16: the prompt goes through PyTorch in bfloat16 either way; the native steps then compute in
    # float32 (on the bfloat16 weights) where PyTorch's round every activation to bfloat16
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    first = [
        generate_ids(m, tokenizer, prompt_ids, greedy)[row][:1] for m in (model, reference) for row in (0, 1)
    ]
    assert first[:2] == first[2:]
    ids = torch.tensor([tokenizer.encode("hello, wor")])
    steps = []
    for candidate in (model, reference):
        cache = candidate.new_cache(1, 16)
        candidate(ids, cache=cache)
        steps.append(step_logits(candidate, ids[0, -1:], torch.tensor([ids.shape[1]]), cache).float())
    assert torch.allclose(steps[0], steps[1], rtol=0, atol=0.03 * steps[1].abs().max().item())


def test_batches_beyond_the_row_limit_take_the_forward_pass_on_a_cache_of_the_weights_dtype(tmp_path):
    model, tokenizer = load_for_inference(checkpoint(tmp_path, **VARIANTS["llama-like"]), dtype="bfloat16")
    model.native_decoder.max_rows = 1
    ids = torch.tensor([tokenizer.encode("hello, wor")] * 2)
    for rows, native in ((1, True), (2, False)):
        cache = model.new_cache(rows, 16)
        model(ids[:rows], cache=cache)
        assert cache.k.dtype == torch.float32  # the native step's cache, until a step has too many rows
        step_logits(model, ids[:rows, -1], torch.full((rows,), ids.shape[1]), cache)
        assert cache.k.dtype == (torch.float32 if native else torch.bfloat16)
    reference = copy.deepcopy(model)  # a copy has no decoder: the forward pass throughout
    prompts = ["abc", "hello, world"]  # two rows: over the limit, so the same arithmetic as the copy
    greedy = GenerationConfig(max_new_tokens=20, temperature=0, stop_at_eot=False)
    assert generate(model, tokenizer, prompts, greedy) == generate(reference, tokenizer, prompts, greedy)
    assert len(generate(model, tokenizer, prompts, greedy)[1]) > 10


def test_the_row_limit_is_half_the_first_batch_size_where_the_c_step_measured_slower(tmp_path, monkeypatch):
    import lmforge.inference.native.decoding as decoding

    model, tokenizer = load_for_inference(checkpoint(tmp_path))
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))  # a fresh timings cache
    monkeypatch.setattr(timing_cache, "_timings", None)
    measured = []

    def timed(step, model, prompt, repeats=3, dtype=None, rows=1):  # the C step slower from 32 rows
        measured.append(rows)
        native = isinstance(getattr(step, "__self__", None), NativeDecoder)
        return (1.0 if rows < 32 else 3.0) if native else 2.0

    monkeypatch.setattr(decoding, "_seconds_per_step", timed)
    decoder = model.native_decoder
    assert decoding.row_limit(model, decoder) == 16 and measured == [16, 16, 32, 32]
    assert decoding.row_limit(model, decoder) == 16 and len(measured) == 4  # remembered, not measured again
    assert (tmp_path / "cache" / "kernel-timings.json").is_file()
    monkeypatch.setattr(decoding, "MEASURED_ROWS", (64,))
    assert decoding.row_limit(model, decoder) == 32
    # A first step with more rows than the C step always takes asks for the limit, once.
    monkeypatch.setattr(decoding, "MEASURED_ROWS", (16,))
    monkeypatch.setattr(timing_cache, "_timings", None)
    (tmp_path / "cache" / "kernel-timings.json").unlink()
    cache = model.new_cache(12, 8)
    model(torch.zeros(12, 3, dtype=torch.long), cache=cache)
    step_logits(model, torch.zeros(12, dtype=torch.long), torch.full((12,), 3), cache)
    assert decoder.rows_measured and decoder.max_rows is None  # faster at 16 rows: no limit
    assert cache.k.dtype == torch.float32  # the C step took the 12 rows


def test_the_decoder_is_left_out_where_it_does_not_apply(tmp_path):
    path = checkpoint(tmp_path)
    compiled, _ = load_for_inference(path, compile=True)
    assert getattr(compiled, "native_decoder", None) is None  # --compile decodes with its own step
    half, _ = load_for_inference(path, dtype="float16")
    assert getattr(half, "native_decoder", None) is None
    assert "float32 or bfloat16 weights" in why_not_native(half)
    assert "GPT" in why_not_native(torch.nn.Linear(2, 2))
    short = int8_model(**VARIANTS["gpt2-like"])
    short.block_size = 3
    assert "too short" in attach(short)


@torch.inference_mode()
def test_out_of_range_tokens_and_positions_are_refused_before_the_c_code_reads_them():
    model = int8_model(**VARIANTS["gpt2-like"])  # learned positions: a table of 32 rows
    decoder = NativeDecoder(model)
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="token ids"):
        decoder.step(torch.tensor([61]), torch.tensor([0]), cache)
    with pytest.raises(ValueError, match="positions"):
        decoder.step(torch.tensor([3]), torch.tensor([32]), cache)
    assert cache.length == 0 and not cache.valid.any()  # nothing written
    assert decoder.step(torch.tensor([3]), torch.tensor([0]), cache).shape == (1, 61)


def test_the_cli_generates_with_4bit_weights(tmp_path, capsys):
    from lmforge.cli import main

    path = checkpoint(tmp_path)
    args = ["generate", path, "--prompt", "abc", "--max-new-tokens", "12", "--temperature", "0"]
    assert main([*args, "--quantize", "int4"]) == 0
    four_bit = capsys.readouterr().out
    assert four_bit.startswith("abc") and len(four_bit.strip()) > 3
    with pytest.raises(SystemExit) as exit_info:  # argparse names the choices
        main([*args, "--quantize", "int3"])
    assert exit_info.value.code == 2 and "int4" in capsys.readouterr().err


@torch.inference_mode()
def test_layers_too_narrow_for_4bit_blocks_stay_int8_and_decode_natively_beside_4bit_ones():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=61, n_layer=2, n_head=4, n_embd=48, block_size=32
    )  # 48: not a multiple of 32
    model = GPT(cfg).eval()
    fuse_projections(model)
    quantize_int4(model)
    kinds = {
        name: type(layer).__name__
        for name, layer in model.named_modules()
        if "Linear" in type(layer).__name__
    }
    assert (
        kinds["blocks.0.attn.c_attn"] == "Int8Linear" and kinds["blocks.0.mlp.c_proj"] == "Int4Linear"
    )  # 192 wide
    for layer in model.modules():
        if isinstance(layer, Int8Linear | Int4Linear):
            layer.kernel = "dequantize"
    decoder = NativeDecoder(model)
    reference, native = model.new_cache(1, 8), model.new_cache(1, 8)
    for cache in (reference, native):
        model(torch.tensor([[3, 1, 4, 1, 5]]), cache=cache)
    token, at = torch.tensor([9]), torch.tensor([5])
    expected = model(token[:, None], cache=reference, positions=at[:, None])[0][:, -1]
    got = decoder.step(token, at, native)
    assert torch.allclose(got, expected, rtol=0, atol=4e-4 * expected.abs().max().item())


@torch.inference_mode()
def test_a_native_step_on_another_thread_equals_the_same_step_on_the_main_thread():
    """The server decodes on its engine thread, where libgomp's own barriers would sleep (a second
    OpenMP team): the step's threads meet at its spinning barrier instead (int8_dot.h, team_wait).
    Same arithmetic whichever thread calls it, with every core and with one."""
    import threading

    model = int8_model(**VARIANTS["llama-like"])
    decoder = NativeDecoder(model)

    def run(threads: int) -> list[torch.Tensor]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():  # (each thread has its own mode)
                generator = torch.Generator().manual_seed(3)
                last, _, cache = prefilled_caches(model, 3, generator)
                out = []
                for step in range(4):
                    tokens = torch.randint(0, 61, (3,), generator=generator)
                    out.append(decoder.step(tokens, last + 1 + step, cache))
                return out
        finally:
            torch.set_num_threads(previous)

    for threads in (2, 1):
        on_main = run(threads)
        on_worker: list[list[torch.Tensor]] = []
        worker = threading.Thread(target=lambda: on_worker.append(run(threads)))  # noqa: B023
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive() and len(on_worker) == 1  # it returned: no thread left waiting
        for mine, theirs in zip(on_worker[0], on_main, strict=True):
            assert torch.equal(mine, theirs)
