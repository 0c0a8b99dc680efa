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
    """Every product by the 512-bit loops (wide) or the 256-bit ones, then back to what was chosen."""
    native.use_wide_products((wide, wide), wide)
    try:
        yield
    finally:
        chosen = native.wide_products() or {"int8": (False, False), "float32": (False, False)}
        native.use_wide_products(chosen["int8"], chosen["float32"][0])
