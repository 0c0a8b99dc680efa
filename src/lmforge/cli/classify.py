"""`lmforge train-classifier`, `classify` and `explain`: text classifiers, and why a model decided."""

from __future__ import annotations

import argparse
import json

from lmforge.cli.common import add_run_flags, add_shared, read_lines_of
from lmforge.errors import UserError
from lmforge.io import check_output

# The everyday flags of `train-classifier` and the setting each one gives; every setting of a classifier
# run also has its own flag (--optim.beta2, --train.threads, ...), as `lmforge train` has.
CLASSIFIER_FLAGS = {
    "--data": ("data.path", "training examples"),
    "--val": ("data.val_path", "validation examples (default: 10%% of --data held out)"),
    "--text-column": ("data.text_column", "default: sentence/text/review/..."),
    "--label-column": ("data.label_column", "default: label/sentiment/class/..."),
    "--vocab-size": ("data.vocab_size", "word vocabulary (from scratch; default 20000)"),
    "--init": ("init.checkpoint", "language-model checkpoint: reuse its tokenizer and body"),
    "--init-layers": ("init.layers", "keep only the first N blocks of the --init body (0 = all): faster"),
    "--init-embeddings": (
        "train.init_embeddings",
        "word2vec/GloVe vectors (e.g. from `lmforge embeddings "
        "train`) for the word embedding; their width must equal --n-embd",
    ),
    "--body": ("model.body", "from scratch: bilstm (default) or gpt (a Transformer decoder)"),
    "--n-head": ("model.n_head", "attention heads of a gpt body (default 4)"),
    "--n-embd": ("model.n_embd", "default 128"),
    "--hidden-size": ("model.hidden_size", "default 128"),
    "--n-layer": ("model.n_layer", "default 1"),
    "--dropout": ("model.dropout", "default 0.3"),
    "--pooling": ("model.pooling", "mean, max (default) or last"),
    "--max-length": ("model.max_length", "tokens of a text kept (default 128)"),
    "--out": ("train.out", "default out/classifier"),
    "--epochs": ("train.epochs", "default 3"),
    "--batch-size": ("train.batch_size", "default 32"),
    "--lr": ("optim.lr", "default 2e-3 (optim.min_lr: a tenth of it)"),
    "--patience": ("train.patience", "evaluations without improvement before stopping (0 = off)"),
    "--eval-every": ("train.eval_interval", "steps between evaluations (0 = each epoch)"),
    "--seed": ("train.seed", "default 1337"),
    "--loggers": ("train.loggers", "beside metrics.jsonl, comma-separated: csv, tensorboard"),
    "--device": ("train.device", "auto (default), cpu, cuda, cuda:N, mps"),
}


def add_train_classifier_parser(sub) -> None:
    from lmforge.config import classifier_field_types

    p = sub.add_parser(
        "train-classifier",
        help="train a text classifier (e.g. sentiment) on labeled data",
        description="Train a classifier on TSV/CSV (with a header) or JSONL: a bidirectional "
        "LSTM from scratch, or the body of a language-model checkpoint (--init).",
    )
    for flag, (key, help_text) in CLASSIFIER_FLAGS.items():
        p.add_argument(flag, dest=key, default=None, metavar="VALUE", help=f"{help_text} (= --{key})",
                       required=flag == "--data")  # fmt: skip
    p.add_argument("--freeze-embeddings", dest="init.freeze_embeddings", action="store_const", const=True,
                   help="keep the pretrained embeddings (--init or --init-embeddings) fixed: faster steps")  # fmt: skip
    p.add_argument("--class-weights", dest="data.class_weights", action="store_const", const=True,
                   help="weight classes by inverse frequency")  # fmt: skip
    p.add_argument("--group-by-length", dest="train.group_by_length", action=argparse.BooleanOptionalAction,
                   help="batches of similar-length texts (less padding; default); off: batches drawn purely at random")  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this many minutes (the learning rate then decays over them)")  # fmt: skip
    add_run_flags(p, "training")
    group = p.add_argument_group("every setting of a classifier run (section.field VALUE)")
    short = {key for key, _ in CLASSIFIER_FLAGS.values()} | {"init.freeze_embeddings", "data.class_weights",
                                                            "train.group_by_length"}  # fmt: skip
    for key, kind in classifier_field_types().items():
        if key not in short and key not in ("train.progress", "model.vocab_size"):
            names = dict.fromkeys([f"--{key}", f"--{key.replace('_', '-')}"])
            group.add_argument(*names, dest=key, metavar=kind.__name__.upper(), default=None)


def add_classify_parser(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a classifier checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--text", action="append", default=None, help="a text (repeatable)")
    p.add_argument("--file", help="one text per line ('-' = standard input)")
    add_shared(p, "--device")
    p.add_argument("--json", action="store_true")


def add_explain_parser(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="why a model decided: attention maps, attributions, per-token loss",
        description="Explain a classifier's label or a language model's next token for a text: attention "
        "maps per layer and head, integrated-gradients attributions per token (captum), and for language "
        "models the loss of each token. Writes PNG figures, explain.html (self-contained) and explain.json.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--text", required=True)
    p.add_argument(
        "--target", default=None, help="the label / next token to explain (default: the predicted one)"
    )
    p.add_argument(
        "--out", default="out/explain", help="folder for the figures, explain.html and explain.json"
    )
    p.add_argument(
        "--steps", type=int, default=64, help="integration steps (more: a smaller convergence delta)"
    )
    add_shared(p, "--device")


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from lmforge.classification.training import train_classifier
    from lmforge.config import classifier_field_types, classifier_run

    settings = {k: v for k, v in vars(args).items() if k in classifier_field_types() and v is not None}
    if args.max_minutes is not None:
        settings["train.max_time_s"] = args.max_minutes * 60
    if args.quiet:
        settings["train.progress"] = False
    cfg = classifier_run(settings)
    check_output(cfg.train.out, "folder", "out")
    result = train_classifier(cfg, overwrite=args.overwrite, resume=args.resume)
    print(
        f"Done: {result['steps']} steps in {result['elapsed_s']:.0f}s, best validation accuracy "
        f"{result['best_val_accuracy']:.4f}"
        + (f", privacy spent ε = {result['epsilon']:.2f}" if result["epsilon"] is not None else "")
        + f". Checkpoint: {result['out']}"
    )
    return 0


def cmd_classify(args: argparse.Namespace) -> int:

    from lmforge.classification.inference import load_classifier, predict

    texts = list(args.text or [])
    if args.file:
        texts += read_lines_of(args.file, "texts")
    if not texts:
        raise UserError("Give texts to classify with --text or --file.")
    model, tokenizer, labels = load_classifier(args.checkpoint, args.device)
    probs = predict(model, tokenizer, texts, device=args.device)
    for text, p in zip(texts, probs.tolist(), strict=True):
        best = max(range(len(labels)), key=lambda i: p[i])
        if args.json:
            print(
                json.dumps(
                    {
                        "text": text,
                        "label": labels[best],
                        "probabilities": {lb: round(x, 5) for lb, x in zip(labels, p, strict=True)},
                    }
                )
            )
        else:
            shown = "  ".join(f"{lb}: {x:.3f}" for lb, x in zip(labels, p, strict=True))
            print(f"{labels[best]}\t({shown})\t{text}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from lmforge.explain import explain, load_for_explaining, write_report

    check_output(args.out, "folder", "out")
    model, tokenizer, labels = load_for_explaining(args.checkpoint, args.device)
    e = explain(model, tokenizer, args.text, labels, args.target, args.steps)
    written = write_report(e, args.out)  # (checked before the model loaded)
    ranked = sorted(zip(e.tokens, e.attributions, strict=True), key=lambda pair: -abs(pair[1]))[:5]
    print(f"{e.kind}: {e.decision!r} (p = {e.probability:.3f})")
    print("most influential tokens: " + ", ".join(f"{t!r} {a:+.3f}" for t, a in ranked))
    print(
        f"attributions add up to {sum(e.attributions):.4f}; logit change from the baseline {e.output_difference:.4f}"
    )
    print(f"Wrote {', '.join(str(p) for p in written.values())}")
    return 0
