"""The product loops of the native kernels a test can run on this machine (int8_dot.h): the 256-bit
ones everywhere, the 512-bit ones where the compiler targets AVX-512 with VNNI."""

import contextlib
import subprocess

from lmforge import native


def avx512_vnni_targeted() -> bool:
    """Whether the compiler, told -march=native, targets AVX-512 with VNNI on this CPU."""
    macros = subprocess.run([native._compiler(), "-march=native", "-dM", "-E", "-"], input="",
                            capture_output=True, text=True).stdout  # fmt: skip
    return all(f"__{name}__" in macros for name in ("AVX512F", "AVX512BW", "AVX512VNNI"))


# The product loops this build has: the 256-bit ones everywhere, the 512-bit ones with AVX-512 VNNI.
PRODUCT_LOOPS = [False, True] if avx512_vnni_targeted() else [False]


@contextlib.contextmanager
def product_loops(wide: bool):
    """Products by the 512-bit loops (wide) or the 256-bit ones, then back to what was chosen."""
    lib = native.library()
    lib.set_wide_products(int(wide), int(wide))
    try:
        yield
    finally:
        lib.set_wide_products(*map(int, native.wide_products() or (0, 0)))
