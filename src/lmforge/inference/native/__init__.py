"""lmforge's own compiled kernels: weight-only int8 / 4-bit linear layers for decoding and a float32 /
bfloat16 one (int8_linear.c), and a whole decode step of a GPT model in one call (decode_step.c; Python
side in decoding.py).

The C files are compiled on first use with the system's C compiler (`$CC`, else `cc`) for this very
CPU (`-march=native`) and kept in the cache, keyed by the source, the compiler and the CPU:

    $LMFORGE_CACHE_DIR/native/lmforge-<key>.so

Without a compiler (or if the build fails) `library()` returns None, `why_unavailable()` says why,
the kernel is simply not among the candidates that kernels.py times, and decoding takes the PyTorch
path: nothing else changes.

Where the compiler targets AVX-512 VNNI the build also has a 512-bit int8 product loop, bit-identical
to the 256-bit one; loading times the two and each row count (one row, several) takes the faster
(`wide_products()`). It also has int8 weights times int8 inputs (int8_inputs.h: VNNI, and AMX tiles
where the CPU has them, from the row count timed faster, `amx_rows()`), which int8 models take where
several rows multiply half again as fast so (`int8_inputs_pay()`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from functools import partial
from pathlib import Path

import torch

from lmforge.device import machine_key

HERE = Path(__file__).parent
SOURCES = [HERE / "int8_linear.c", HERE / "decode_step.c"]
HEADERS = [HERE / "int8_dot.h", HERE / "int8_inputs.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
LIBRARIES = ["-lm"]  # after the source, where the linker looks for what it needs

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
_wide: tuple[bool, bool] | None = None  # see wide_products()
_amx_rows: int | None = None  # see amx_rows()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(compiler: str) -> Path:
    from lmforge.io import cache_dir

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join(
            [
                *(f.read_text() for f in SOURCES + HEADERS),
                compiler,
                version,
                machine_key(),
                *FLAGS,
                *LIBRARIES,
            ]
        ).encode()
    )
    target = cache_dir() / "native" / f"lmforge-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        command = [compiler, *FLAGS, *map(str, SOURCES), "-o", partial, *LIBRARIES]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[:500]}")
        os.replace(partial, target)  # whole or not at all, even with several processes building at once
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, built on first use; None where it cannot be built."""
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            compiler = _compiler()
            if compiler is None:
                _failure = "no C compiler found (set CC)"
            else:
                try:
                    lib = ctypes.CDLL(str(_build(compiler)))
                    lib.int8_linear.argtypes = (
                        [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
                    )
                    lib.int8_linear.restype = ctypes.c_int
                    lib.int4_linear.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                    lib.int4_linear.restype = ctypes.c_int
                    lib.float_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                    lib.float_linear.restype = ctypes.c_int
                    lib.decode_step.argtypes = [ctypes.c_void_p] * 4 + [
                        ctypes.c_int64,
                        ctypes.c_void_p,
                        ctypes.c_int,
                    ]
                    lib.decode_step.restype = ctypes.c_int
                    lib.set_wide_products.argtypes = [ctypes.c_int] * 2
                    lib.set_wide_products.restype = ctypes.c_int
                    lib.has_int8_inputs.restype = ctypes.c_int
                    lib.set_amx_rows.argtypes = [ctypes.c_int64]
                    lib.set_amx_rows.restype = ctypes.c_int
                    _choose_wide_products(lib)
                    _choose_amx_rows(lib)
                    _library = lib
                except OSError as e:
                    _failure = str(e)
        return _library


# The product the choice below is timed on: SmolLM2's vocabulary head in int8 (28 MB), larger than
# most caches as a decode step's weights are, so one row waits on memory as in decoding, eight rows
# on arithmetic.
WIDE_TIMING_SHAPE = (576, 49152)


def _choose_wide_products(lib: ctypes.CDLL) -> None:
    """Where this build has the 512-bit int8 products (AVX-512 VNNI), time them against the 256-bit
    ones for one input row and for eight (timings cached per machine, timing_cache.py) and take each
    where it is faster: a CPU that runs 512-bit vectors in two halves may gain nothing, and on a
    Zen 5 one row measured no faster. The two loops give the same results bit for bit, so choosing
    by rows changes no output."""
    global _wide
    if not lib.set_wide_products(0, 0):
        return
    from lmforge.inference.timing_cache import remembered

    threads = torch.get_num_threads()
    in_features, out_features = WIDE_TIMING_SHAPE
    faster = []
    for rows in (1, 8):
        shape = f"{in_features}x{out_features} rows={rows} threads={threads}"
        narrow = remembered(
            f"int8-products 256-bit {shape}", partial(_time_products, lib, False, rows, threads)
        )
        wide = remembered(f"int8-products 512-bit {shape}", partial(_time_products, lib, True, rows, threads))
        faster.append(wide < narrow)
    _wide = (faster[0], faster[1])
    lib.set_wide_products(*map(int, _wide))


def _time_products(lib: ctypes.CDLL, wide: bool, rows: int, threads: int) -> float:
    """Seconds of one int8 product of WIDE_TIMING_SHAPE for `rows` rows by the 512-bit loop (`wide`)
    or the 256-bit one."""
    lib.set_wide_products(wide, wide)
    return _time_int8_product(
        lib, f"int8 {256 << wide}-bit rows={rows}", WIDE_TIMING_SHAPE, rows, threads, False
    )


def _time_int8_product(
    lib: ctypes.CDLL, label: str, shape: tuple[int, int], rows: int, threads: int, int8_inputs: bool
) -> float:
    """Seconds of one int8 product of `shape` (in, out) for `rows` random rows, by the loops set now
    (timing_cache.measure: the median after a warm-up)."""
    from lmforge.inference.timing_cache import measure

    in_features, out_features = shape
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, in_features, generator=generator), torch.empty(rows, out_features)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = torch.full((out_features,), 1e-3)
    return measure(label,
                   lambda: lib.int8_linear(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), None, y.data_ptr(),
                                           rows, in_features, out_features, threads, int8_inputs))  # fmt: skip


# The product the AMX choice is timed on: SmolLM2's MLP up projection, a decode step's typical one.
AMX_TIMING_SHAPE = (576, 1536)
AMX_TIMING_ROWS = (2, 4, 8, 16)


def _choose_amx_rows(lib: ctypes.CDLL) -> None:
    """Where this build has AMX tiles and Linux grants them, time products with int8 inputs by the
    tiles and by the VNNI loop at AMX_TIMING_ROWS rows and let the tiles take every product from the
    first row count at which they are faster (timings cached per machine). The two give the same
    results bit for bit (exact integer sums), so the choice changes no output."""
    global _amx_rows
    if not lib.set_amx_rows(0):
        return
    from lmforge.inference.timing_cache import remembered

    threads = torch.get_num_threads()
    in_features, out_features = AMX_TIMING_SHAPE
    _amx_rows = 0
    for rows in AMX_TIMING_ROWS:
        shape = f"{in_features}x{out_features} rows={rows} threads={threads}"
        vnni = remembered(f"int8-inputs vnni {shape}", partial(_time_int8_inputs, lib, 0, rows, threads))
        amx = remembered(f"int8-inputs amx {shape}", partial(_time_int8_inputs, lib, rows, rows, threads))
        if amx < vnni:
            _amx_rows = rows
            break
    lib.set_amx_rows(_amx_rows)


def _time_int8_inputs(lib: ctypes.CDLL, amx_rows: int | None, rows: int, threads: int) -> float:
    """Seconds of one product with int8 inputs of AMX_TIMING_SHAPE for `rows` rows, the tiles taking
    products from `amx_rows` rows (0: never; None: int16 inputs instead)."""
    lib.set_amx_rows(amx_rows or 0)
    try:
        label = f"int8 inputs amx_rows={amx_rows} rows={rows}"
        return _time_int8_product(lib, label, AMX_TIMING_SHAPE, rows, threads, amx_rows is not None)
    finally:
        lib.set_amx_rows(_amx_rows or 0)


def has_int8_inputs() -> bool:
    """Whether this build multiplies int8 weights by int8 inputs (AVX-512 VNNI; int8_inputs.h)."""
    lib = library()
    return lib is not None and bool(lib.has_int8_inputs())


INT8_INPUTS_TIMING_ROWS = 8
# How much faster int8 inputs must multiply INT8_INPUTS_TIMING_ROWS rows to be taken: they cost a
# little quality (SmolLM2's perplexity on tiny Shakespeare 30.11 against 30.01 with int16 inputs),
# which AMX tiles repay many times over (products 3-6x faster, a 16-row step 1.5x a one-row step
# instead of 5x); the VNNI loop alone measured 1.3-1.4x on the products, and on a Zen 4 an earlier
# VNNI version sped a 16-row step up by only 10-15%, which did not repay it.
INT8_INPUTS_MIN_GAIN = 1.5


def int8_inputs_pay() -> bool:
    """Whether int8 models here should round their inputs to int8 (int8_inputs.h) rather than to
    int16: where this build has them and a product of INT8_INPUTS_TIMING_ROWS rows of
    AMX_TIMING_SHAPE measures INT8_INPUTS_MIN_GAIN times faster so (VNNI or AMX tiles, as chosen at
    load). One row costs the same either way (reading the weights); several rows are what decides.
    Timed once per machine."""
    if not has_int8_inputs():
        return False
    from lmforge.inference.timing_cache import remembered

    lib, threads, rows = library(), torch.get_num_threads(), INT8_INPUTS_TIMING_ROWS
    shape = f"{AMX_TIMING_SHAPE[0]}x{AMX_TIMING_SHAPE[1]} rows={rows} threads={threads}"
    int16 = remembered(
        f"int8-products int16-inputs {shape}", partial(_time_int8_inputs, lib, None, rows, threads)
    )
    int8 = remembered(
        f"int8-products int8-inputs {shape}", partial(_time_int8_inputs, lib, _amx_rows or 0, rows, threads)
    )
    return int8 * INT8_INPUTS_MIN_GAIN < int16


def amx_rows() -> int | None:
    """From how many rows products with int8 inputs take AMX tiles, as timed when the library was
    loaded (0: never, the VNNI loop measured faster); None where there are no tiles to use."""
    library()
    return _amx_rows


def use_amx_rows(rows: int) -> None:
    """Let AMX tiles take products with int8 inputs from `rows` rows (0: never); for tests and
    benchmarks. Where there are no tiles, nothing changes."""
    lib = library()
    if lib is not None:
        lib.set_amx_rows(rows)


def wide_products() -> tuple[bool, bool] | None:
    """Whether int8 products take the 512-bit loop for (one input row, several rows), as timed when
    the library was loaded; None where this build has no such loop (no AVX-512 VNNI) or there is
    no native library."""
    library()
    return _wide


def use_wide_products(one_row: bool, several_rows: bool) -> None:
    """Set which int8 products take the 512-bit loop (for tests and benchmarks); where the build has
    no such loop, nothing changes."""
    lib = library()
    if lib is not None:
        lib.set_wide_products(int(one_row), int(several_rows))


def why_unavailable() -> str | None:
    library()
    return _failure


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    int8_inputs: bool = False,
) -> torch.Tensor:
    """x (..., in) float32 on the CPU times the int8 `weight` (out, in) with float32 per-row `scale`;
    `int8_inputs`: each row of x rounded to int8 (int8_inputs.h; where `has_int8_inputs()`), else to
    int16 per block of 64. Called ~150 times per decoded token, so it does no more than it must in
    Python."""
    function = _function or _load_function()
    out_features, in_features = weight.shape
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    failed = function(x.data_ptr(), weight.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                      y.data_ptr(), x.numel() // in_features, in_features, out_features, torch.get_num_threads(),
                      int8_inputs)  # fmt: skip
    if failed:
        raise MemoryError("the native int8 kernel could not allocate room for its rounded input")
    return y


def int4_linear(
    x: torch.Tensor,
    weight4: torch.Tensor,
    block_scale: torch.Tensor,
    block_min: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., in) float32 on the CPU times 4-bit weights: `weight4` (out, in / 2) uint8, two values a
    byte in blocks of 32 (int8_dot.h), float16 `block_scale` and `block_min` (out, in / 32)."""
    if block_scale.dtype != torch.float16 or block_min.dtype != torch.float16:
        raise TypeError("the 4-bit kernel takes float16 block scales and minima")
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native 4-bit kernel is unavailable: {_failure}")
    out_features, in_features = weight4.shape[0], weight4.shape[1] * 2
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    failed = lib.int4_linear(x.data_ptr(), weight4.data_ptr(), block_scale.data_ptr(), block_min.data_ptr(),
                             None if bias is None else bias.data_ptr(), y.data_ptr(), x.numel() // in_features,
                             in_features, out_features, torch.get_num_threads())  # fmt: skip
    if failed:
        raise MemoryError("the native 4-bit kernel could not allocate room for its rounded input")
    return y


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) float32 on the CPU times a float32 or bfloat16 `weight` (out, in), summed in float32
    on every core: the product the native decode step uses for float models."""
    if weight.dtype not in (torch.float32, torch.bfloat16) or x.dtype != torch.float32:
        raise TypeError("the native float kernel takes float32 inputs and float32 or bfloat16 weights")
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native float kernel is unavailable: {_failure}")
    out_features, in_features = weight.shape
    x, weight = x.contiguous(), weight.contiguous()
    float32 = weight if weight.dtype == torch.float32 else None
    bfloat16 = weight if weight.dtype == torch.bfloat16 else None
    bias = None if bias is None else bias.float().contiguous()  # held here while the C code reads it
    y = torch.empty(*x.shape[:-1], out_features, dtype=torch.float32)
    failed = lib.float_linear(x.data_ptr(), None if float32 is None else float32.data_ptr(),
                              None if bfloat16 is None else bfloat16.data_ptr(),
                              None if bias is None else bias.data_ptr(), y.data_ptr(),
                              x.numel() // in_features, in_features, out_features, torch.get_num_threads())  # fmt: skip
    if failed:
        raise MemoryError("the native float kernel could not allocate its scratch memory")
    return y


_function = None  # the C function, once loaded


def _load_function():
    global _function
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native int8 kernel is unavailable: {_failure}")
    _function = lib.int8_linear
    return _function
