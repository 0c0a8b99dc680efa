"""What `lmforge eval` and `lmforge.evaluate` run: pick the data, score, format a report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.errors import UserError
from lmforge.evaluation.metrics import bleu_chrf, classification_metrics, rouge
from lmforge.evaluation.perplexity import evaluate_ids

METRICS = ("bleu", "chrf", "rouge", "accuracy")


def evaluate(
    checkpoint: str | Path,
    data: str | Path | None = None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = False,
    dtype: str = "float32",
    quantize: str | None = None,
    adapter: str | None = None,
) -> dict:
    """Language-model metrics of a checkpoint on a text file, a prepared directory, or (default)
    the validation split of the data it was trained on."""
    from lmforge.checkpoint import LANGUAGE_MODEL, open_checkpoint
    from lmforge.data.corpus import read_text_file
    from lmforge.data.prepare import open_prepared, resolve_data
    from lmforge.inference.loading import load_for_inference
    from lmforge.tokenizers import encode_long

    opened = open_checkpoint(checkpoint)
    if opened.kind != LANGUAGE_MODEL and data is None:  # an imported model has no training data of its own
        raise UserError(
            f"{checkpoint} is an imported model with no validation split of its own; "
            f"give a text to evaluate it on (data).",
            settings=("data",),
        )
    config = opened.config
    model, tokenizer = load_for_inference(str(checkpoint), device, dtype, quantize, adapter)
    if data is None:
        prepared = resolve_data(config.data, log=lambda _: None)
        ids = np.asarray(prepared.tokens("val")).tolist()
        source = f"validation split of {config.data.path or 'tinyshakespeare'}"
    elif Path(data).is_dir():
        ids = np.asarray(open_prepared(Path(data)).tokens("val")).tolist()
        source = f"validation split of {data}"
    else:
        text = read_text_file(Path(data))
        if not text.strip():
            raise UserError(f"{data} is empty; give a file with text to evaluate.")
        ids = encode_long(tokenizer, text)
        source = str(data)
    if len(ids) < 2:
        raise UserError(f"{source} has {len(ids)} token(s); at least 2 are needed to score a prediction.")
    report = evaluate_ids(model, tokenizer, ids, context, stride, batch_size, device, progress)
    return {
        "checkpoint": str(checkpoint),
        "data": source,
        "dtype": dtype,
        "quantize": quantize or "none",
        **report.to_dict(),
    }


def _read_lines(path: str | Path) -> list[str]:
    from lmforge.data.corpus import read_text_file

    text = read_text_file(Path(path))
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def score_files(hypotheses: str | Path, references: list[str | Path], metrics: list[str]) -> dict:
    """BLEU/chrF/ROUGE/accuracy of a hypothesis file (one per line) against reference files."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"Unknown metric {unknown[0]!r}; available: {', '.join(METRICS)}.")
    if not references:
        raise UserError("Give at least one reference file (refs).", settings=("ref",))
    hyps = _read_lines(hypotheses)
    refs = [_read_lines(r) for r in references]
    return score_lines(hyps, refs, metrics)


def score_lines(hyps: list[str], refs: list[list[str]], metrics: list[str]) -> dict:
    out: dict = {"examples": len(hyps)}
    if "bleu" in metrics or "chrf" in metrics:
        scores = bleu_chrf(hyps, refs)
        out.update(
            {
                k: v
                for k, v in scores.items()
                if k.startswith("bleu") and "bleu" in metrics or k.startswith("chrf") and "chrf" in metrics
            }
        )
    if "rouge" in metrics:
        out.update(rouge(hyps, refs))
    if "accuracy" in metrics:
        out.update(classification_metrics([h.strip() for h in hyps], [r.strip() for r in refs[0]]))
    return out


def generate_hypotheses(
    checkpoint: str | Path,
    prompts_file: str | Path,
    max_new_tokens: int = 64,
    device: str = "cpu",
    adapter: str | None = None,
) -> list[str]:
    """Greedy continuations of each prompt line, cut at the first newline."""
    from lmforge.inference.generation import sample_tokens
    from lmforge.inference.loading import load_for_inference

    model, tokenizer = load_for_inference(str(checkpoint), device, adapter=adapter)
    hyps = []
    for prompt in _read_lines(prompts_file):
        ids = tokenizer.encode(prompt)[-model.block_size :] or [tokenizer.eot_id or 0]
        text = tokenizer.decode(sample_tokens(model, ids, max_new_tokens, temperature=0.0))
        hyps.append(text.split("\n")[0].strip())
    return hyps


def format_report(result: dict) -> str:
    """A readable table for the terminal."""
    lines = []
    if "examples" in result and "accuracy" in result and "checkpoint" in result:
        lines += [
            f"checkpoint      {result['checkpoint']}",
            f"data            {result['data']} ({result['examples']:,} examples)",
        ]
    if "perplexity" in result:
        lines += [
            f"checkpoint      {result['checkpoint']} ({result.get('dtype', 'float32')}"
            f"{', int8 weights' if result.get('quantize') == 'int8' else ''})",
            f"data            {result['data']}",
            f"loss            {result['loss']:.4f} nats/token",
            f"perplexity      {result['perplexity']:.3f}",
            f"bits/token      {result['bits_per_token']:.4f}",
            f"bits/byte       {result['bits_per_byte']:.4f}",
            f"bits/char       {result['bits_per_char']:.4f}",
            f"scored          {result['tokens']:,} tokens, {result['bytes']:,} bytes, "
            f"{result['characters']:,} characters (context {result['context']}, stride {result['stride']})",
        ]
    if "task" in result and "examples" in result:  # an encoder–decoder checkpoint on pairs
        lines += [f"checkpoint      {result['checkpoint']} ({result['task']})",
                  f"data            {result['data']} ({result['examples']:,} sources, "
                  f"{result['references']:,} references)"]  # fmt: skip
        for source, output in result.get("samples", [])[:2]:
            lines.append(f"example         {source[:70]} → {output[:70]}")
    if "bleu" in result:
        p = "/".join(f"{x:.1f}" for x in result["bleu_precisions"])
        lines.append(f"BLEU            {result['bleu']:.2f} ({p}, BP {result['bleu_brevity_penalty']:.3f})")
        lines.append(f"                {result['bleu_signature']}")
    if "chrf" in result:
        lines.append(f"chrF2           {result['chrf']:.2f}  {result['chrf_signature']}")
    for key in ("rouge1", "rouge2", "rougeL"):
        if key in result:
            lines.append(f"{key:<16}{result[key]:.2f}")
    if "accuracy" in result:
        lines.append(f"accuracy        {result['accuracy']:.4f}")
        lines.append(f"macro-F1        {result['macro_f1']:.4f}")
        labels = result["labels"]
        width = max(8, *(len(lb) for lb in labels)) + 1
        lines.append("confusion (rows: true, columns: predicted)")
        lines.append(" " * width + "".join(f"{lb:>{width}}" for lb in labels))
        for label, row in zip(labels, result["confusion_matrix"], strict=True):
            lines.append(f"{label:>{width}}" + "".join(f"{n:>{width}}" for n in row))
    return "\n".join(lines)
