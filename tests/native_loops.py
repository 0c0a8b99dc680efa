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


# The int8 product loops this build has.
PRODUCT_LOOPS = [False, True] if avx512_vnni_targeted() else [False]


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
