"""`lmforge eval`: perplexity and bits per byte, BLEU/chrF/ROUGE on pairs, accuracy of a classifier."""

from __future__ import annotations

import argparse
import json
import math
import sys

from lmforge.cli.common import add_shared, checkpoint_family, is_classifier_checkpoint
from lmforge.errors import UserError
from lmforge.io import check_output


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (perplexity, bits/byte) or score hypotheses",
        description="Language-model metrics of CHECKPOINT on --data (default: its validation "
        "split), or BLEU/chrF/ROUGE/accuracy of --hyp (or of greedy "
        "continuations of --prompts) against --ref files.",
    )
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory")
    p.add_argument(
        "--data", help="text file or prepared directory (default: the checkpoint's validation split)"
    )
    p.add_argument("--context", type=int, help="window length in tokens (default: the model's context)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: = context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--metric", default="bleu,chrf", help="comma-separated: bleu, chrf, rouge, accuracy")
    p.add_argument("--hyp", help="hypotheses, one per line")
    p.add_argument(
        "--ref", action="append", default=[], help="references, one per line (repeat for more sets)"
    )
    p.add_argument("--prompts", help="generate hypotheses from these prompts (one per line) with CHECKPOINT")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--beams", type=int, default=4, help="encoder–decoder checkpoints: beam width (1 = greedy)"
    )
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="encoder–decoder checkpoints: no n-gram twice in an output (default: the task's)")  # fmt: skip
    add_shared(p, "--device", "--dtype", "--quantize", "--adapter", "--revision")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--output", help="also write the JSON result to this file")


def cmd_eval(args: argparse.Namespace) -> int:

    from lmforge.evaluation.run import (
        _read_lines,
        evaluate,
        format_report,
        generate_hypotheses,
        score_files,
        score_lines,
    )

    if args.output:
        check_output(args.output, "file", "output")  # (before the evaluation's work)
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    if args.hyp:
        result = score_files(args.hyp, args.ref, metrics)
    elif args.prompts:
        if not args.checkpoint:
            raise UserError("--prompts needs a CHECKPOINT to generate with.")
        if not args.ref:
            raise UserError("Give the references for the prompts with --ref.")
        hyps = generate_hypotheses(
            args.checkpoint, args.prompts, args.max_new_tokens, args.device, args.adapter
        )
        result = score_lines(hyps, [_read_lines(r) for r in args.ref], metrics)
    elif args.checkpoint and (family := checkpoint_family(args.checkpoint)) and family.evaluate:
        from lmforge.checkpoint import open_checkpoint

        opened = open_checkpoint(args.checkpoint)
        result = family.evaluate(opened, args.data, args.beams, args.no_repeat_ngram_size, args.device)
    elif args.checkpoint and is_classifier_checkpoint(args.checkpoint):
        if not args.data:
            raise UserError("Evaluating a classifier needs labeled examples: pass --data FILE.tsv.")
        from lmforge.classification.inference import evaluate_classifier, load_classifier
        from lmforge.data.labeled import read_labeled

        model, tokenizer, labels = load_classifier(args.checkpoint, args.device)
        texts, gold = read_labeled(args.data)
        result = {
            "checkpoint": args.checkpoint,
            "data": args.data,
            "examples": len(texts),
            **evaluate_classifier(model, tokenizer, labels, texts, gold, args.device),
        }
    elif args.checkpoint:
        result = evaluate(
            args.checkpoint,
            args.data,
            args.context,
            args.stride,
            args.batch_size,
            args.device,
            progress=sys.stderr.isatty(),
            dtype=args.dtype,
            quantize=args.quantize,
            adapter=args.adapter,
        )
    else:
        raise UserError("Give a CHECKPOINT to evaluate, or --hyp and --ref files to score.")
    loss = result.get("loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        raise UserError(f"The loss of {args.checkpoint} on this data is {loss}: its weights hold NaN or infinite "
                        f"values (a diverged or damaged checkpoint); evaluate an earlier or a repaired one.")  # fmt: skip
    if args.output:
        from lmforge.io import atomic_write_json

        atomic_write_json(args.output, result)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
