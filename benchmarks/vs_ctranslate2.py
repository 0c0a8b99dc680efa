"""lmforge against CTranslate2 on the same encoder–decoder, on the same CPU.

    1. train lmforge's eng→fra model (`--preset eng-fra-translation`, with the norm after the
       embeddings that mBART's layout has) for --minutes, or reuse --run
    2. export it to mBART (`lmforge export`), convert that with CTranslate2's own transformers
       converter, in float32 and int8
    3. translate the first --sources distinct sources of eng-fra-dev.tsv with both engines, 2 threads,
       batch 1 and 32, greedy and beam 4: output tokens per second (median of --repeats after a
       warm-up), and BLEU / chrF against the dev references (sacrebleu)

    python benchmarks/vs_ctranslate2.py --minutes 10
    python benchmarks/vs_ctranslate2.py --run runs/ct2-eng-fra --skip-train

Needs `pip install ctranslate2` (the engine OpenNMT and faster-whisper use for CPU decoding).
Writes benchmarks/results/vs_ctranslate2_<cpu kind>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA = Path(os.environ.get("LMFORGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
MAX_NEW = 63  # the preset's target length (block_size 64) less the start token


def lmforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True,
                   env={**os.environ, "LMFORGE_DATA_DIR": str(DATA)})  # fmt: skip


def prepare(run: Path, minutes: float, skip_train: bool) -> tuple[Path, dict[str, Path]]:
    """The lmforge run, and CTranslate2 conversions of its mBART export by compute type."""
    import ctranslate2

    if not skip_train:
        lmforge("train", "--preset", "eng-fra-translation", "--model.embedding_norm", "true", "--out", str(run),
                "--overwrite", "--train.max_time_s", str(minutes * 60), "--train.progress", "false")  # fmt: skip
    exported = run.with_name(run.name + "-mbart")
    lmforge("export", str(run), "--out", str(exported), "--overwrite")
    converted = {}
    for kind, quantization in (("float32", None), ("int8", "int8")):
        out = run.with_name(f"{run.name}-ct2-{kind}")
        ctranslate2.converters.TransformersConverter(str(exported)).convert(str(out), quantization=quantization,
                                                                          force=True)  # fmt: skip
        # Its mBART loader needs an unknown token's name (lmforge's byte-level BPE has none) and leaves
        # the start token to the target prefix (mBART starts from a language code): ctranslate2_engine.
        config = json.loads((out / "config.json").read_text())
        config["unk_token"] = config["unk_token"] or config["eos_token"]
        (out / "config.json").write_text(json.dumps(config, indent=1))
        converted[kind] = out
    return exported, converted


def dev_sources(count: int) -> tuple[list[str], list[list[str | None]]]:
    from lmforge.seq2seq.data import read_pairs
    from lmforge.seq2seq.decoding import references_by_source

    pairs = read_pairs(DATA / "eng-fra-dev.tsv", "", "", "")
    sources, references = references_by_source(pairs.sources, pairs.targets)
    return sources[:count], [refs[:count] for refs in references]


def timed(engines: dict, sources: list[str], batch: int, beams: int, repeats: int) -> dict:
    """Each engine's median seconds over `repeats` runs after a warm-up, and its outputs (token ids).
    One engine at a time, the previous one released first: a CTranslate2 translator's threads slow
    whatever else runs on 2 cores while it exists, and keep spinning for a while after each call
    (Intel OpenMP's KMP_BLOCKTIME), which the warm-up of the next engine absorbs."""
    import gc

    out = {}
    for name, make in engines.items():
        decode = partial(make(sources), batch, beams)
        outputs, seconds = decode(), []
        for _ in range(repeats):
            start = time.perf_counter()
            decode()
            seconds.append(time.perf_counter() - start)
        out[name] = (statistics.median(seconds), outputs)
        del decode
        gc.collect()
    return out


def ctranslate2_engine(folder: Path, compute_type: str, tokenizer, sources: list[str]):
    import ctranslate2

    translator = ctranslate2.Translator(str(folder), device="cpu", compute_type=compute_type, intra_threads=2,
                                        inter_threads=1)  # fmt: skip
    pieces = [[tokenizer.hf.id_to_token(i) for i in tokenizer.encode(s)] for s in sources]
    start = [[tokenizer.hf.id_to_token(tokenizer.eot_id)] for _ in sources]  # lmforge's start token

    def decode(batch: int, beams: int) -> list[list[int]]:
        results = translator.translate_batch(pieces, max_batch_size=batch, beam_size=beams,
                                             max_decoding_length=MAX_NEW + 1, target_prefix=start,
                                             return_scores=False)  # fmt: skip
        out = []
        for result in results:
            tokens = [tokenizer.hf.token_to_id(t) for t in result.hypotheses[0]]
            out.append([t for t in tokens if t is not None and t != tokenizer.eot_id])
        return out

    return decode


def lmforge_engine(run: Path, precision: str, tokenizer, sources: list[str]):
    import torch

    from lmforge.generation_config import GenerationConfig
    from lmforge.inference.loading import load_for_inference
    from lmforge.seq2seq.decoding import transduce

    dtype, quantize = ("float32", "int8") if precision == "int8" else (precision, None)
    model, _ = load_for_inference(str(run), "cpu", dtype, quantize, notice=lambda _: None)
    torch.set_num_threads(2)

    def decode(batch: int, beams: int) -> list[list[int]]:
        texts = transduce(model, tokenizer, sources, GenerationConfig(num_beams=beams, max_new_tokens=MAX_NEW),
                          batch_size=batch)  # fmt: skip
        return [tokenizer.encode(t) for t in texts]

    return decode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--run", default="runs/ct2-eng-fra")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--batch-one-sources", type=int, default=100, help="sources timed at batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="float32,int8,bfloat16", help="lmforge's precisions to time")
    args = parser.parse_args()

    import torch

    from lmforge.checkpoint import open_checkpoint
    from lmforge.evaluation.metrics import bleu_chrf

    torch.set_num_threads(2)
    run = Path(args.run)
    _, converted = prepare(run, args.minutes, args.skip_train)
    tokenizer = open_checkpoint(run).tokenizer()
    sources, references = dev_sources(args.sources)
    engines = {f"ctranslate2 {kind}": (lambda s, k=kind: ctranslate2_engine(converted[k], k, tokenizer, s))
               for kind in converted}  # fmt: skip
    for precision in args.precisions.split(","):
        engines[f"lmforge {precision}"] = lambda s, p=precision: lmforge_engine(run, p, tokenizer, s)
    cells = []
    for batch in (1, 32):
        chosen = sources[: args.batch_one_sources] if batch == 1 else sources
        refs = [r[: len(chosen)] for r in references]
        for beams in (1, 4):
            for name, (seconds, outputs) in timed(engines, chosen, batch, beams, args.repeats).items():
                texts = [tokenizer.decode(ids).strip() for ids in outputs]
                tokens = sum(len(ids) + 1 for ids in outputs)  # (+ the end of each output)
                scores = bleu_chrf(texts, refs)
                cell = {"engine": name, "batch": batch, "beams": beams, "sources": len(chosen),
                        "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                        "bleu": round(scores["bleu"], 2), "chrf": round(scores["chrf"], 2)}  # fmt: skip
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    for cell in cells:  # each engine against CTranslate2 int8 in the same cell
        base = next(c for c in cells if c["engine"] == "ctranslate2 int8" and c["batch"] == cell["batch"]
                    and c["beams"] == cell["beams"])  # fmt: skip
        cell["vs_ctranslate2_int8"] = round(cell["tokens_per_s"] / base["tokens_per_s"], 2)
    info = machine_info()
    kind = (
        "amx" if "amx_int8" in info["cpu_flags"] else "avx512" if "avx512f" in info["cpu_flags"] else "avx2"
    )
    import ctranslate2

    result = {"benchmark": "vs_ctranslate2", "machine": info, "ctranslate2": ctranslate2.__version__,
              "model": f"{run} (eng-fra-translation + embedding_norm, exported as mBART)",
              "val_loss": open_checkpoint(run).metadata.get("val_loss"), "cells": cells}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"vs_ctranslate2_{kind}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
