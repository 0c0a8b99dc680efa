"""`lmforge train-classifier`, `classify` and `explain`: text classifiers, and why a model decided."""

from __future__ import annotations

import argparse
import json

from lmforge.cli.common import add_privacy_flags, add_run_flags, add_shared, read_lines_of
from lmforge.errors import UserError
from lmforge.io import check_output


def add_train_classifier_parser(sub) -> None:
    p = sub.add_parser(
        "train-classifier",
        help="train a text classifier (e.g. sentiment) on labeled data",
        description="Train a classifier on TSV/CSV (with a header) or JSONL: a bidirectional "
        "LSTM from scratch, or the body of a language-model checkpoint (--init).",
    )
    p.add_argument("--data", required=True, help="training examples")
    p.add_argument("--val", default="", help="validation examples (default: 10%% of --data held out)")
    p.add_argument("--text-column", default="", help="default: sentence/text/review/...")
    p.add_argument("--label-column", default="", help="default: label/sentiment/class/...")
    p.add_argument("--init", default="", help="language-model checkpoint: reuse its tokenizer and body")
    p.add_argument(
        "--init-layers",
        type=int,
        default=0,
        metavar="N",
        help="keep only the first N blocks of the --init body (0 = all): faster per example",
    )
    p.add_argument("--init-embeddings", default="", metavar="VECTORS",
                   help="word2vec/GloVe vectors (e.g. from `lmforge embeddings train`) for the word embedding; "
                   "their width must equal --n-embd")  # fmt: skip
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="keep the pretrained embeddings (--init or --init-embeddings) fixed: faster steps")  # fmt: skip
    p.add_argument(
        "--body",
        choices=["bilstm", "gpt"],
        default="bilstm",
        help="from scratch: bidirectional LSTM, or a Transformer decoder (gpt)",
    )
    p.add_argument("--n-head", type=int, default=4, help="attention heads of a gpt body")
    p.add_argument("--out", default="out/classifier")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab-size", type=int, default=20000, help="word vocabulary (from scratch)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--pooling", choices=["mean", "max", "last"], default="max")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--class-weights", action="store_true", help="weight classes by inverse frequency")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batches of similar-length texts (less padding); off: batches drawn purely at random")  # fmt: skip
    p.add_argument("--patience", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0 = each epoch)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this many minutes (the learning rate then decays over them)",
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--loggers", default="", help="beside metrics.jsonl, comma-separated: csv, tensorboard")
    add_privacy_flags(p)
    add_shared(p, "--device")
    add_run_flags(p, "training")


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
    from lmforge.config import PrivacyConfig
    from lmforge.models.classifier import ClassifierConfig
    from lmforge.training.classify import ClassifierTrainConfig, train_classifier

    check_output(args.out, "folder", "out")
    cfg = ClassifierTrainConfig(
        train_path=args.data,
        val_path=args.val,
        text_column=args.text_column,
        label_column=args.label_column,
        out=args.out,
        init=args.init,
        init_layers=args.init_layers,
        init_embeddings=args.init_embeddings,
        freeze_embeddings=args.freeze_embeddings,
        group_by_length=args.group_by_length,
        vocab_size=args.vocab_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        class_weights=args.class_weights,
        patience=args.patience,
        eval_every=args.eval_every,
        max_minutes=args.max_minutes,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        loggers=args.loggers,
        gpt_heads=args.n_head,
        privacy=PrivacyConfig(
            **{k.split(".")[1]: v for k, v in vars(args).items() if k.startswith("privacy.")}
        ),
        model=ClassifierConfig(
            body=args.body,
            n_embd=args.n_embd,
            hidden_size=args.hidden_size,
            n_layer=args.n_layer,
            dropout=args.dropout,
            pooling=args.pooling,
            max_length=args.max_length,
        ),
    )
    result = train_classifier(cfg, overwrite=args.overwrite, resume=args.resume)
    print(
        f"Done: {result['steps']} steps in {result['elapsed_s']:.0f}s, best validation accuracy "
        f"{result['best_val_accuracy']:.4f}"
        + (f", privacy spent ε = {result['epsilon']:.2f}" if result["epsilon"] is not None else "")
        + f". Checkpoint: {result['out']}"
    )
    return 0


def cmd_classify(args: argparse.Namespace) -> int:

    from lmforge.training.classify import load_classifier, predict

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
