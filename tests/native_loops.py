"""The int8 product loops of the native kernels a test can run on this machine (int8_dot.h): the
256-bit one everywhere, the 512-bit one where the compiler targets AVX-512 with VNNI."""

import contextlib
import subprocess

from lmforge.inference import native


def avx512_vnni_targeted() -> bool:
    """Whether the compiler, told -march=native, targets AVX-512 with VNNI on this CPU."""
    macros = subprocess.run([native._compiler(), "-march=native", "-dM", "-E", "-"], input="",
                            capture_output=True, text=True).stdout  # fmt: skip
    return all(f"__{name}__" in macros for name in ("AVX512F", "AVX512BW", "AVX512VNNI"))


def amx_targeted() -> bool:
    """Whether the compiler, told -march=native, targets AMX's int8 tiles on this CPU."""
    macros = subprocess.run([native._compiler(), "-march=native", "-dM", "-E", "-"], input="",
                            capture_output=True, text=True).stdout  # fmt: skip
    return "__AMX_TILE__" in macros and "__AMX_INT8__" in macros


# The int8 product loops this build has.
PRODUCT_LOOPS = [False, True] if avx512_vnni_targeted() else [False]
# From how many rows products with int8 inputs may take AMX tiles: never (the VNNI loop), or always.
TILE_SETTINGS = [0, 1] if amx_targeted() else [0]


@contextlib.contextmanager
def tiles_from(rows: int):
    """Products with int8 inputs on AMX tiles from `rows` rows (0: never), then back to the choice."""
    native.use_amx_rows(rows)
    try:
        yield
    finally:
        native.use_amx_rows(native.amx_rows() or 0)


@contextlib.contextmanager
def product_loops(wide: bool):
    """Every int8 product by the 512-bit loop (wide) or the 256-bit one, then back to the choice."""
    native.use_wide_products(wide, wide)
    try:
        yield
    finally:
        restore_chosen_loops()


def restore_chosen_loops() -> None:
    """The loops as chosen when the library was loaded (or none, where there is no choice)."""
    native.use_wide_products(*(native.wide_products() or (False, False)))
