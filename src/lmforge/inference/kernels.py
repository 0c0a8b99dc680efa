"""Matrix-vector products for decoding, and which kernel is fastest on this CPU: measured, never
assumed from a CPU flag.

Decoding one token multiplies every weight matrix by one vector, and the fastest way to do
that depends on the machine: PyTorch's int8 weight-pack kernel is fast on some AVX-512 CPUs
and four times slower than float32 on others; bfloat16 reads half the bytes yet can be
slower than float32 where the CPU converts it in software. So for each weight shape the
candidate kernels are timed once (a few milliseconds) and the result is kept in the cache,
keyed by the CPU model, its flags and the torch version (timing_cache.py):

    $LMFORGE_CACHE_DIR/kernel-timings.json   {"<cpu>|<torch>": {"int8-pack 576x1536": 1.2e-5, ...}}
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import lmforge.inference.timing_cache as timing_cache
from lmforge.inference.timing_cache import measure, remembered


class BlockedMatvecLinear(nn.Module):
    """nn.Linear whose products with a few rows use every CPU core.

    Decoding one token at a time makes each linear layer a matrix-vector product, bound
    by reading the weight from memory. PyTorch's CPU kernel for it runs on one core, which
    reads about half of what the memory can deliver (measured here: 14 GB/s of 28 GB/s).
    Viewing the weight as a batch of row blocks turns the product into a batched one that
    PyTorch spreads over the cores (26 GB/s here). Same parameters, same state-dict keys;
    larger inputs (prefill, training) take the ordinary path.
    """

    # Up to 16 rows (a served batch) the blocked product is faster too: measured on SmolLM2's
    # decode step at 16 rows, 108 ms against 148 ms with the ordinary kernel from 9 rows on.
    MAX_ROWS = 16
    BLOCKS = 4  # measured best here among 2-16 (two cores); more blocks only add bookkeeping

    def __init__(self, linear: nn.Linear, blocks: int = BLOCKS):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # shared, so tied weights stay tied
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocks = blocks
        # Rows that split evenly into blocks; the remainder (if any) is a small ordinary product.
        self.blocked_rows = self.out_features - self.out_features % blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.MAX_ROWS or x.dtype != self.weight.dtype or not self.weight.is_contiguous():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        blocked = self.weight[: self.blocked_rows].view(self.blocks, -1, self.in_features)
        columns = flat.t().expand(self.blocks, -1, -1)  # the same input for every block, not copied
        if self.bias is None:
            y = torch.bmm(blocked, columns)
        else:  # bias added inside the product: one pass over the output
            y = torch.baddbmm(self.bias[: self.blocked_rows].view(self.blocks, -1, 1), blocked, columns)
        y = y.view(self.blocked_rows, rows).t() if rows > 1 else y.view(1, self.blocked_rows)
        if self.blocked_rows < self.out_features:
            rest = self.weight[self.blocked_rows :]
            bias = None if self.bias is None else self.bias[self.blocked_rows :]
            y = torch.cat([y, F.linear(flat, rest, bias)], dim=1)
        return y.reshape(*x.shape[:-1], self.out_features)


def _candidates(in_features: int, out_features: int) -> dict[str, Callable[[], object]]:
    """One matrix-vector product of this shape, by each kernel this build of torch has."""
    x = torch.randn(1, in_features)
    weight = torch.randn(out_features, in_features)
    scale = weight.abs().amax(dim=1) / 127.0
    int8 = (weight / scale[:, None]).round().to(torch.int8)
    kernels: dict[str, Callable[[], object]] = {
        "float32": lambda: F.linear(x, weight),
    }
    x16, weight16 = x.bfloat16(), weight.bfloat16()
    kernels["bfloat16"] = lambda: F.linear(x16, weight16)
    if out_features >= BlockedMatvecLinear.BLOCKS:
        blocked = BlockedMatvecLinear(torch.nn.Linear(in_features, out_features, bias=False))
        kernels["float32-blocked"] = lambda: blocked(x)
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        kernels["int8-pack"] = lambda: torch.ops.aten._weight_int8pack_mm(x, int8, scale)
    if "fbgemm" in torch.backends.quantized.supported_engines:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                   0, torch.qint8)  # fmt: skip
        packed = torch.ops.quantized.linear_prepack(quantized, None)
        kernels["int8-fbgemm"] = lambda: torch.ops.quantized.linear_dynamic(x, packed, True)
    kernels["int8-dequantize"] = lambda: F.linear(x, int8.float() * scale[:, None])
    if native_available():
        from lmforge.inference.native import int8_linear

        kernels["int8-native"] = lambda: int8_linear(x, int8, scale, None)
        kernels["float32-native"] = Streamed(x, weight)
        kernels["bfloat16-native"] = Streamed(x, weight16)
    return kernels


class Streamed:
    """The native float product (the native decode step's) of one input row, over copies of the
    weight that together outgrow the CPU's caches, as a model's weights do while it decodes: timed in
    the cache, float32 and bfloat16 weights take alike, since what bfloat16 saves is reading from
    memory (float_linear streams both at ~30 GB/s on a Zen 4). `products` per call."""

    BYTES = 64 << 20
    MOST = 64  # the weights of a tiny model stay in the cache while it decodes, too

    def __init__(self, x: torch.Tensor, weight: torch.Tensor):
        copies = max(1, min(self.MOST, self.BYTES // (weight.numel() * weight.element_size())))
        self.x, self.products = x, copies
        # the weight itself and copies of it (none for a weight that outgrows the caches alone)
        self.weights = [weight] + [weight.clone() for _ in range(copies - 1)]

    def __call__(self) -> None:
        from lmforge.inference.native import float_linear

        for weight in self.weights:
            float_linear(self.x, weight, None)


def native_available() -> bool:
    """Whether lmforge's own int8 kernel (native/) is built, or can be, on this machine."""
    from lmforge.inference.native import library

    return library() is not None


def timings(in_features: int, out_features: int) -> dict[str, float]:
    """Seconds per matrix-vector product of this shape for every kernel (measured once per machine)."""
    with timing_cache.lock:
        cached = timing_cache.load()
        shape = f"{in_features}x{out_features}"
        wanted = {name: f"{name} {shape}" for name in _candidates_names(in_features, out_features)}
        if not all(key in cached for key in wanted.values()):
            timing_cache.announce(f"the products of a {shape} layer")
            for name, fn in _candidates(in_features, out_features).items():
                cached[f"{name} {shape}"] = measure(name, fn) / getattr(fn, "products", 1)
            timing_cache.save()
        return {name: cached[key] for name, key in wanted.items() if key in cached}


def _candidates_names(in_features: int, out_features: int) -> list[str]:
    names = ["float32", "bfloat16", "int8-dequantize"]
    if out_features >= BlockedMatvecLinear.BLOCKS:
        names.append("float32-blocked")
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        names.append("int8-pack")
    if "fbgemm" in torch.backends.quantized.supported_engines:
        names.append("int8-fbgemm")
    if native_available():
        names += ["int8-native", "float32-native", "bfloat16-native"]
    return names


def fastest_int8_kernel(in_features: int, out_features: int, weight_only: bool = False) -> str:
    """'pack', 'native', 'fbgemm' or 'dequantize': whichever multiplies this shape fastest here
    (`weight_only`: among those that keep the activations in float, i.e. not FBGEMM)."""
    measured = timings(in_features, out_features)
    int8 = {name: t for name, t in measured.items() if name.startswith("int8-")}
    if weight_only:
        int8.pop("int8-fbgemm", None)
    return min(int8, key=int8.get).removeprefix("int8-")


PROMPT_ROWS = 64  # a prompt's worth of rows: what fastest_prompt_kernel times


def fastest_prompt_kernel(label: str, in_features: int, out_features: int, names: tuple[str, ...],
                          candidates: Callable[[], dict[str, Callable[[], object]]]) -> str:  # fmt: skip
    """The fastest of the kernels `names`; `candidates()` builds them (name -> one product of
    PROMPT_ROWS rows of this shape by that kernel) when this machine has not timed them yet. The
    timings are kept in the cache under `label`, once per machine and shape."""
    with timing_cache.lock:
        cached = timing_cache.load()
        keys = {name: f"prompt{PROMPT_ROWS} {label}-{name} {in_features}x{out_features}" for name in names}
        if not all(key in cached for key in keys.values()):
            timing_cache.announce(
                f"the {label} products of {PROMPT_ROWS} rows of a {in_features}x{out_features} layer"
            )
            for name, fn in candidates().items():
                cached[keys[name]] = measure(f"{label}-{name}", fn, 5)
            timing_cache.save()
        return min(names, key=lambda name: cached[keys[name]])


def native_prompt_pays(in_features: int, out_features: int, int8_inputs: bool = False) -> bool:
    """Whether lmforge's native int8 kernel multiplies PROMPT_ROWS rows (a prompt, a scored window)
    faster than dequantising the weight for a float32 product here. Measured once per machine and
    shape: the native kernel rounds inputs to int16 for integer products, which beat float32 GEMMs
    on AVX2 (measured 75-95 against 40-85 GMAC/s at 39-312 rows on a Zen 3), but float32 GEMMs run
    twice as wide on AVX-512; with `int8_inputs` (native/int8_inputs.h) on AMX tiles, 8-10x faster
    than int16 inputs at 64 rows (576 x 1536 and 576 x 49152 on an AMX Xeon)."""
    if not native_available():
        return False

    def candidates() -> dict[str, Callable[[], object]]:
        from lmforge.inference.native import int8_linear

        x = torch.randn(PROMPT_ROWS, in_features)
        weight = torch.randn(out_features, in_features)
        scale = weight.abs().amax(dim=1) / 127.0
        int8 = (weight / scale[:, None]).round().to(torch.int8)
        return {"native": lambda: int8_linear(x, int8, scale, None, int8_inputs),
                "dequantize": lambda: F.linear(x, int8.float() * scale[:, None])}  # fmt: skip

    label = "int8-inputs" if int8_inputs else "int8"
    return (
        fastest_prompt_kernel(label, in_features, out_features, ("native", "dequantize"), candidates)
        == "native"
    )


def batched_precision_report(
    shapes: dict[tuple[int, int], int], rows: int = PROMPT_ROWS
) -> tuple[float, float]:
    """Seconds per decoding step of `rows` rows spent in the linear layers (`shapes`: (in, out) -> how
    many) with bfloat16 weights and with float32 ones: what an encoder–decoder, which decodes about
    that many hypotheses a step, pays. At 64 rows the products are arithmetic, not reading weights,
    so the answer can differ from the one-row `precision_report` (on a Zen 5: bfloat16 0.5x float32
    at one row, 1.8-3.3x at 64). Measured once per machine and shape."""

    def seconds(name: str, in_features: int, out_features: int) -> Callable[[], float]:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
        x, weight = (
            torch.randn(rows, in_features, dtype=dtype),
            torch.randn(out_features, in_features, dtype=dtype),
        )
        return lambda: measure(f"{name}-rows{rows}", lambda: F.linear(x, weight))

    step = {"bfloat16": 0.0, "float32": 0.0}
    for (in_features, out_features), count in shapes.items():
        for name in step:
            key = f"rows{rows} {name} {in_features}x{out_features}"
            step[name] += count * remembered(key, seconds(name, in_features, out_features))
    return step["bfloat16"], step["float32"]


def precision_report(
    shapes: dict[tuple[int, int], int], precision: str, native_step: bool = False
) -> tuple[float, float]:
    """Seconds per decoded token spent in the linear layers (`shapes`: (in, out) -> how many) with
    the requested precision ('int8' or 'bfloat16') and with float32, both at their fastest kernel;
    `native_step`: bfloat16 and float32 both by the native decode step's product."""
    chosen = baseline = 0.0
    for (in_features, out_features), count in shapes.items():
        measured = timings(in_features, out_features)
        if precision == "bfloat16" and native_step:
            chosen += count * measured["bfloat16-native"]
            baseline += count * measured["float32-native"]
            continue
        eager = {name: t for name, t in measured.items() if not name.endswith("-native")}
        float32 = min(t for name, t in eager.items() if name.startswith("float32"))
        if precision == "int8":
            value = min(t for name, t in measured.items() if name.startswith("int8-"))
        else:
            value = measured["bfloat16"]
        chosen += count * value
        baseline += count * float32
    return chosen, baseline
