"""lmforge's own weight-only int8 kernel (native/int8_linear.c): built here, equal to the
dequantised product, and simply absent (never an error) where it cannot be built."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.inference import kernels, native, timing_cache
from lmforge.inference.loading import Int4Linear, Int8Linear, dequantize_4bit, quantize_4bit
from tests.native_loops import (
    PRODUCT_LOOPS,
    TILE_SETTINGS,
    amx_targeted,
    avx512_vnni_targeted,
    product_loops,
    restore_chosen_loops,
    tiles_from,
)


def quantized(out_features: int, in_features: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    scale = weight.abs().amax(dim=1) / 127.0
    return (weight / scale[:, None]).round().to(torch.int8), scale


def test_the_kernel_builds_on_this_machine():
    assert native.library() is not None, native.why_unavailable()
    assert "int8-native" in kernels._candidates_names(64, 96)


def test_the_512_bit_products_are_built_exactly_where_the_compiler_targets_avx512_vnni():
    lib = native.library()
    assert bool(lib.set_wide_products(0, 0)) == avx512_vnni_targeted()
    restore_chosen_loops()  # (which the line above undid)
    assert (native.wide_products() is not None) == avx512_vnni_targeted()


@pytest.mark.parametrize("one_row", PRODUCT_LOOPS)
@pytest.mark.parametrize("several_rows", PRODUCT_LOOPS)
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 96), (37, 11), (576, 40), (1536, 24)])
def test_a_row_alone_gets_bit_for_bit_what_it_gets_in_a_batch_whichever_loops_each_takes(
    in_features, out_features, one_row, several_rows
):
    """Batched decoding gives each sequence exactly what it would get alone, and the loop a call takes
    depends on its rows (timed choice): a row alone (the one-row path) and the same row among 12
    others (the tiled path, groups of 8 + 5) must agree exactly, with the
    512-bit loop on either side, both, or neither (the only case where the CPU has no such loop)."""
    weight, scale = quantized(out_features, in_features)
    x = torch.randn(13, in_features)
    native.use_wide_products(one_row, several_rows)
    try:
        together = native.int8_linear(x, weight, scale, None)
        alone = torch.cat([native.int8_linear(x[row : row + 1], weight, scale, None) for row in range(13)])
    finally:
        restore_chosen_loops()
    assert torch.equal(alone, together)


def test_int8_inputs_and_amx_tiles_are_built_exactly_where_the_compiler_targets_them():
    """(AMX also needs Linux 5.16 or later to grant the tiles; these machines have it.)"""
    assert native.has_int8_inputs() == avx512_vnni_targeted()
    assert (native.amx_rows() is not None) == (amx_targeted() and avx512_vnni_targeted())


def block_rounded_product(x, weight, scale, bias):
    """What int8_inputs.h computes, in float64 from the same int8 inputs: each row rounded to int8 per
    block of 64 values (q = round(x * (127 / max|x_block|)), in float32 as the kernel does), the
    block's products summed exactly, times the block's and the channel's scales, plus the bias."""
    total = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float64)
    for k in range(0, x.shape[1], 64):
        block = x[:, k : k + 64]
        largest = block.abs().amax(dim=1, keepdim=True)
        inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
        q = torch.round(block * inverse).to(torch.int64)
        total += (q @ weight[:, k : k + 64].to(torch.int64).T).double() * (largest / 127.0).double()
    return total * scale.double() + bias.double()


@pytest.mark.parametrize("tiles", TILE_SETTINGS)
@pytest.mark.parametrize(
    ("in_features", "out_features"),
    [(576, 960), (576, 3072), (1536, 576), (100, 40), (64, 33), (37, 11)],  # SmolLM2's, and ragged ones
)
def test_int8_inputs_equal_the_block_rounded_product_and_a_row_gets_the_same_bits_alone(
    in_features, out_features, tiles
):
    """Where the build has int8 inputs (AVX-512 VNNI), the product equals the block-rounded one (its
    sums are exact integers: only the float scaling differs, in the last bits), a row alone gets what
    it gets among 16 others, and AMX tiles give what the VNNI loop gives, bit for bit; elsewhere the
    request is ignored: the inputs are rounded to int16 as always."""
    weight, scale = quantized(out_features, in_features)
    generator = torch.Generator().manual_seed(1)
    x, bias = (
        torch.randn(17, in_features, generator=generator),
        torch.randn(out_features, generator=generator),
    )
    with tiles_from(tiles):
        together = native.int8_linear(x, weight, scale, bias, int8_inputs=True)
        alone = torch.cat(
            [native.int8_linear(x[row : row + 1], weight, scale, bias, True) for row in range(17)]
        )
    assert torch.equal(alone, together)
    if not native.has_int8_inputs():
        assert torch.equal(together, native.int8_linear(x, weight, scale, bias))
        return
    expected = block_rounded_product(x, weight, scale, bias)
    assert torch.allclose(together.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    # against the float product, int8 inputs are off by up to half a step of 1/127 of a block's largest
    exact = x.double() @ (weight.double() * scale.double()[:, None]).T + bias.double()
    assert (together.double() - exact).abs().max() > 1e-4 * exact.abs().max()  # rounded, not int16
    with tiles_from(0):
        assert torch.equal(native.int8_linear(x, weight, scale, bias, True), together)


@pytest.mark.parametrize(("one_row_512", "eight_rows_512"), [(1.1, 2.0), (0.9, 3.5), (0.9, 2.0), (1.2, 3.5)])
def test_the_512_bit_products_are_taken_where_they_time_faster(
    monkeypatch, tmp_path, one_row_512, eight_rows_512
):
    """For one row and for several, each by its own timings (faked here against 1.0 and 3.0 for the
    256-bit loop; each product still runs once)."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing_cache, "_timings", None)
    chosen = native.wide_products()
    fake = {"int8 256-bit rows=1": 1.0, "int8 512-bit rows=1": one_row_512,
            "int8 256-bit rows=8": 3.0, "int8 512-bit rows=8": eight_rows_512}  # fmt: skip
    measured = []
    monkeypatch.setattr(timing_cache, "measure", lambda kernel, fn: measured.append(fn()) or fake[kernel])
    try:
        native._choose_wide_products(native.library())
        if avx512_vnni_targeted():
            assert native.wide_products() == (one_row_512 < 1.0, eight_rows_512 < 3.0) and measured == [0] * 4
        else:
            assert native.wide_products() is None and measured == []
    finally:
        monkeypatch.setattr(native, "_wide", chosen)
        restore_chosen_loops()


@pytest.mark.parametrize(("vnni_8", "amx_2", "amx_4", "amx_8"), [(2.0, 1.0, 1.0, 1.0), (2.0, 3.0, 1.0, 1.0),
                                                                  (2.5, 3.0, 3.0, 1.0), (2.5, 3.0, 3.0, 3.0)])  # fmt: skip
def test_amx_tiles_from_the_first_row_count_they_win_and_int8_inputs_where_they_pay_half_again(
    monkeypatch, tmp_path, vnni_8, amx_2, amx_4, amx_8
):
    """Timings faked (the VNNI loop 2.0 at 2 and 4 rows, int16 inputs 3.0 at 8 rows): the tiles take
    products from the first row count at which they are faster, and int8 models take int8 inputs
    where their best 8-row product is at least 1.5 times faster than int16 inputs' (each runs once)."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing_cache, "_timings", None)
    chosen = native.amx_rows()
    fake = {"amx_rows=0 rows=2": 2.0, "amx_rows=2 rows=2": amx_2, "amx_rows=0 rows=4": 2.0,
            "amx_rows=4 rows=4": amx_4, "amx_rows=0 rows=8": vnni_8, "amx_rows=8 rows=8": amx_8,
            "amx_rows=0 rows=16": 2.0, "amx_rows=16 rows=16": 3.0, "amx_rows=None rows=8": 3.0}  # fmt: skip
    fake = {f"int8 inputs {key}": value for key, value in fake.items()}
    monkeypatch.setattr(timing_cache, "measure", lambda kernel, fn: fn() * 0 + fake[kernel])
    try:
        native._choose_amx_rows(native.library())
        tiles = native.amx_rows()
        if amx_targeted() and avx512_vnni_targeted():
            assert tiles == (2 if amx_2 < 2.0 else 4 if amx_4 < 2.0 else 8 if amx_8 < vnni_8 else 0)
        else:
            assert tiles is None
        if native.has_int8_inputs():
            best_8_rows = amx_8 if tiles and tiles <= 8 else vnni_8
            monkeypatch.setitem(fake, f"int8 inputs amx_rows={tiles or 0} rows=8", best_8_rows)
            assert native.int8_inputs_pay() == (best_8_rows * 1.5 < 3.0)
        else:
            assert not native.int8_inputs_pay()
    finally:
        monkeypatch.setattr(native, "_amx_rows", chosen)
        native.use_amx_rows(chosen or 0)


def test_the_first_kernel_timing_may_load_the_library_which_times_its_loops(monkeypatch, tmp_path):
    """kernels.timings() holds the timings' lock when it first asks for the native library, whose
    loading times the product loops through the same lock: it must not wait on itself."""
    import shutil
    import threading

    built = native._build(native._compiler())  # the library as built here, copied: no new build
    (tmp_path / "native").mkdir()
    shutil.copy(built, tmp_path / "native" / built.name)
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    for name, value in (("_library", None), ("_failure", None), ("_wide", None)):
        monkeypatch.setattr(native, name, value)
    monkeypatch.setattr(timing_cache, "_timings", None)
    for module in (kernels, timing_cache):  # kernels.py's timings, and the library's own at loading
        monkeypatch.setattr(module, "measure", lambda kernel, fn: 1e-3)
    finished = []
    worker = threading.Thread(target=lambda: finished.append(kernels.timings(64, 96)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert finished and "int8-native" in finished[0]
    assert (native.wide_products() is not None) == avx512_vnni_targeted()
    monkeypatch.undo()  # the library, choice and timings of before,
    restore_chosen_loops()  # and the loops they chose (the faked timings chose others)


def rounding_bound(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The most the kernel's rounding of the input may move each output: every row is rounded to
    int16 per block of 64 values, the last block maybe shorter (half a step is max|block| / 65534);
    float accumulation order adds a little on top (the caller's rtol)."""
    blocks = x.split(64, dim=1)
    half_step = torch.cat(
        [block.abs().amax(dim=1, keepdim=True).expand_as(block) / 65534 for block in blocks], 1
    )
    return half_step @ (weight.float() * scale[:, None]).abs().T


@pytest.mark.parametrize("wide", PRODUCT_LOOPS)
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 96), (37, 11), (576, 1536), (1536, 40)])
def test_equals_the_dequantised_product(rows, in_features, out_features, wide):
    weight, scale = quantized(out_features, in_features)
    bias = torch.randn(out_features)
    x = torch.randn(rows, in_features)
    reference = F.linear(x.double(), weight.double() * scale.double()[:, None], bias.double()).float()
    allowed = rounding_bound(x, weight, scale) + 1e-5 * reference.abs().max() + 1e-5
    with product_loops(wide):
        got = native.int8_linear(x, weight, scale, bias)
        no_bias = native.int8_linear(x.view(1, rows, in_features), weight, scale, None)
    assert got.shape == (rows, out_features)
    assert ((got - reference).abs() <= allowed).all()
    assert no_bias.shape == (1, rows, out_features)
    assert ((no_bias[0] - (reference - bias)).abs() <= allowed + 1e-5 * bias.abs().max()).all()


def test_a_layer_on_the_native_kernel_takes_any_number_of_rows(monkeypatch):
    layer = Int8Linear(torch.nn.Linear(48, 80))
    layer.kernel = "native"
    calls = []
    monkeypatch.setattr(
        "lmforge.inference.loading.int8_linear", lambda *a: calls.append(a[0].shape) or native.int8_linear(*a)
    )
    for prompts_natively in [False, True]:
        layer.native_prompts = prompts_natively
        calls.clear()
        for shape in [(1, 1, 48), (2, 8, 48), (3, 20, 48)]:  # 60 rows: past 16, a prompt's size
            x = torch.randn(shape)
            reference = F.linear(x, layer.weight_int8.float() * layer.scale[:, None], layer.bias)
            assert torch.allclose(layer(x), reference, atol=1e-4)
        assert len(calls) == (3 if prompts_natively else 2)  # else the prompt is dequantised
    x = torch.randn(2, 48, requires_grad=True)  # the C kernel has no backward: training gets a float product
    layer(x).sum().backward()
    assert torch.allclose(
        x.grad, (layer.weight_int8.float() * layer.scale[:, None]).sum(0).expand(2, 48), atol=1e-5
    )
    assert len(calls) == 3


def test_whether_prompts_go_native_is_measured_once_per_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing_cache, "_timings", None)
    timed = []
    monkeypatch.setattr(
        kernels,
        "measure",
        lambda name, fn, repeats=15: timed.append(name) or {"int8-native": 1.0}.get(name, 2.0),
    )
    assert kernels.native_prompt_pays(64, 32) is True
    assert kernels.native_prompt_pays(64, 32) is True
    assert timed == ["int8-native", "int8-dequantize"]  # the second answer came from the cache
    monkeypatch.setattr(timing_cache, "_timings", None)
    monkeypatch.setattr(kernels, "measure", lambda name, fn, repeats=15: {"int8-native": 3.0}.get(name, 2.0))
    assert kernels.native_prompt_pays(64, 48) is False
    assert kernels.native_prompt_pays(64, 32) is True  # read back from the file


def test_without_a_compiler_the_kernel_is_just_not_a_candidate(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_function", None)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    assert "no C compiler" in native.why_unavailable()
    assert "int8-native" not in kernels._candidates_names(64, 96)
    with pytest.raises(RuntimeError, match="unavailable"):
        native.int8_linear(torch.randn(1, 4), *quantized(3, 4), None)


def test_a_failed_build_leaves_no_library_file(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCES", [broken])
    with pytest.raises(OSError, match="failed"):
        native._build(native._compiler())
    assert list((tmp_path / "native").iterdir()) == []


def test_fused_gate_up_gives_the_same_outputs():
    from lmforge.config import ModelConfig
    from lmforge.inference.loading import fuse_projections
    from lmforge.models import build_model

    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, activation="swiglu",
                      norm="rmsnorm", pos_encoding="rope", bias=True)  # fmt: skip
    model = build_model(cfg).eval()
    ids = torch.randint(0, 50, (2, 10))
    before = model(ids)[0]
    fuse_projections(model)
    assert all(block.mlp.c_gate_up is not None and not hasattr(block.mlp, "c_gate") for block in model.blocks)
    assert torch.allclose(model(ids)[0], before, atol=1e-5)


def test_4bit_weights_stay_within_half_a_step_two_to_a_byte():
    weight = torch.randn(5, 96)
    weight[2, 32:64] = 0.25  # a constant block: scale 0, every value exact
    packed, scale, minimum = quantize_4bit(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48) and scale.shape == minimum.shape == (5, 3)
    assert scale.dtype == minimum.dtype == torch.float16  # Q4_1's half-precision scale and minimum
    restored = dequantize_4bit(packed, scale, minimum)
    step = scale.float().repeat_interleave(32, dim=1)
    # half a step, and the rounding of the block's largest value by the half-precision scale and minimum
    assert ((restored - weight).abs() <= step / 2 + 1e-3 * weight.abs().max()).all()
    assert torch.equal(restored[2, 32:64], weight[2, 32:64]) and scale[2, 1] == 0
    # byte j of a block: value j in the low four bits, value 16 + j in the high four
    q = ((weight[0, :32] - minimum[0, 0].float()) / scale[0, 0].float()).round().clamp(0, 15)
    assert torch.equal((packed[0, :16] & 0x0F).float(), q[:16]) and torch.equal(
        (packed[0, :16] >> 4).float(), q[16:]
    )
    with pytest.raises(ValueError, match="multiple of 32"):  # a width that does not split into blocks
        quantize_4bit(torch.randn(5, 48))
    # 4-bit weights (SmolLM2's Q4_1) come back as they were, up to float rounding
    assert torch.allclose(dequantize_4bit(*quantize_4bit(restored)), restored, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 96), (96, 11), (576, 40)])
def test_the_4bit_kernel_equals_the_dequantised_product(rows, in_features, out_features):
    packed, scale, minimum = quantize_4bit(torch.randn(out_features, in_features))
    weight = dequantize_4bit(packed, scale, minimum)
    bias, x = torch.randn(out_features), torch.randn(rows, in_features)
    reference = F.linear(x.double(), weight.double(), bias.double()).float()
    # the rounded input meets scale * q (the minimum meets the exact block sums of the input)
    above_minimum = weight - minimum.float().repeat_interleave(32, dim=1)
    allowed = rounding_bound(x, above_minimum, torch.ones(out_features)) + 1e-5 * reference.abs().max() + 1e-5
    got = native.int4_linear(x, packed, scale, minimum, bias)
    assert got.shape == (rows, out_features)
    assert ((got - reference).abs() <= allowed).all()
    alone = native.int4_linear(x[-1:], packed, scale, minimum, bias)  # a row's result, whatever beside it
    assert torch.equal(alone[0], got[-1])


def test_a_4bit_layer_multiplies_natively_and_keeps_gradients(monkeypatch):
    layer = Int4Linear(torch.nn.Linear(64, 24))
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    # 0.625 bytes a weight: half a byte, and 4 bytes of scale and minimum per 32
    assert stored == 64 * 24 * 5 // 8
    calls = []
    monkeypatch.setattr(
        "lmforge.inference.loading.int4_linear", lambda *a: calls.append(1) or native.int4_linear(*a)
    )
    weight = dequantize_4bit(layer.weight_int4, layer.block_scale, layer.block_min)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), F.linear(x, weight, layer.bias), atol=1e-4) and calls == [1]
    x.requires_grad_(True)
    layer(x).sum().backward()  # no backward in C: the float product
    assert torch.allclose(x.grad, weight.sum(0).expand(3, 64), atol=1e-5) and calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 96), (37, 11), (576, 40)])
def test_the_float_kernel_equals_the_float32_product_of_the_same_weights(
    dtype, rows, in_features, out_features
):
    """Float32 or bfloat16 weights times float32 inputs, summed in float32: the bfloat16 weights are
    widened exactly, so the only difference from a float64 product is float32's summation."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    x, bias = (
        torch.randn(rows, in_features, generator=generator),
        torch.randn(out_features, generator=generator),
    )
    reference = F.linear(x.double(), weight.double(), bias.double())
    got = native.float_linear(x, weight, bias)
    no_bias = native.float_linear(x, weight, None)
    alone = native.float_linear(x[-1:], weight, None)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert torch.allclose(
        got.double(), reference, rtol=0, atol=2e-6 * in_features**0.5 * reference.abs().max()
    )
    assert torch.allclose(no_bias.double(), reference - bias.double(), rtol=0,
                          atol=2e-6 * in_features**0.5 * reference.abs().max())  # fmt: skip
    assert torch.equal(alone[0], no_bias[-1])  # a row's sums do not depend on the rows beside it
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        native.float_linear(x, weight.half(), None)
