"""Encoder–decoder Transformers on their two tasks, each within a fixed CPU budget, against baselines.

    translation    eng→fra on Tatoeba: `lmforge train --preset eng-fra-translation` for N minutes, then
                   BLEU/chrF (sacrebleu) on eng-fra-dev.tsv (beam 4, and greedy); against a decoder-only
                   GPT trained for the same minutes on the same pairs written as "English: … French: …"
    summarization  arXiv abstract→title: `lmforge train --preset arxiv-titles` for N minutes, ROUGE-1/2/L
                   (rouge-score, stemming) on arxiv-title-dev.tsv; against the abstract's first 15 words
    decoding       greedy decoding of the dev sources with the decoder's caches vs without them

    python benchmarks/seq2seq.py --task translation [--minutes 20] [--gpt-baseline]
    python benchmarks/seq2seq.py --task summarization [--minutes 20]

Data from ../shared/data (or $LMFORGE_DATA_DIR). Runs go to --runs (kept, so --skip-train re-scores
them). Writes benchmarks/results/seq2seq_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import os
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


def decoding_speed(run: Path, sources: list[str]) -> dict:
    """Greedy decoding of the same sources with and without the caches (same outputs, two speeds)."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.seq2seq import Seq2SeqConfig, transduce

    model, tokenizer, _ = load_checkpoint(run)
    model.eval()
    timings, outputs = {}, {}
    for cached in (True, False):
        start = time.perf_counter()
        outputs[cached] = transduce(model, tokenizer, sources, Seq2SeqConfig(beams=1, use_cache=cached))
        timings[cached] = time.perf_counter() - start
    return {"sources": len(sources), "cached_s": round(timings[True], 2), "uncached_s": round(timings[False], 2),
            "speedup": round(timings[False] / timings[True], 2),
            "same_outputs": outputs[True] == outputs[False]}  # fmt: skip


def gpt_baseline(runs: Path, minutes: float, sources: list[str], references) -> dict:
    """A decoder-only GPT on "English: X\\nFrench: Y" lines, same minutes; greedy, cut at the line's end."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.data.pairs import read_pairs
    from lmforge.evaluation.metrics import bleu_chrf
    from lmforge.generation import GenerationConfig, generate

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
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    args = parser.parse_args()

    from lmforge.data.pairs import read_pairs
    from lmforge.seq2seq import Seq2SeqConfig, evaluate_pairs, references_by_source

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    run = runs / PRESETS[args.task]
    result: dict = {"benchmark": f"seq2seq_{args.task}", "machine": machine_info(), "minutes": args.minutes,
                    "preset": PRESETS[args.task]}  # fmt: skip
    if not args.skip_train:
        result["train_s"] = round(train(PRESETS[args.task], run, args.minutes, []), 1)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result["steps"] = history[-1]["step"]
    result["best_val_loss"] = min(r["val_loss"] for r in history if "val_loss" in r)
    dev = DATA / DEV[args.task]
    d = {"translation": ("", ""), "summarization": ("abstract", "title")}[args.task]
    pairs = read_pairs(dev, *d)
    sources, references = references_by_source(pairs.sources, pairs.targets)
    for name, beams in (("greedy", 1), (f"beam{args.beams}", args.beams)):
        start = time.perf_counter()
        scores = evaluate_pairs(run, dev, Seq2SeqConfig(beams=beams, length_penalty=args.length_penalty))
        keep = ("bleu", "chrf", "bleu_signature", "chrf_signature", "rouge1", "rouge2", "rougeL", "samples")
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
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"seq2seq_{args.task}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
