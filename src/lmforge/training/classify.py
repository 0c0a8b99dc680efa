"""Training and using text classifiers (for example sentiment), with the checkpoint format
of the language models: config.json (with "task": "classification" and the label set),
model.safetensors, tokenizer.json, metrics.jsonl and loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.config import Config, ModelConfig, OptimConfig, config_from_dict, validate
from lmforge.data.labeled import read_labeled
from lmforge.device import resolve_device, set_threads
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.evaluation.metrics import classification_metrics
from lmforge.io import atomic_write_json
from lmforge.models import build_model
from lmforge.models.classifier import BiLSTMEncoder, ClassifierConfig, TextClassifier, body_width
from lmforge.tokenizers import TextTokenizer, load_tokenizer, train_word_tokenizer
from lmforge.training import checkpoint as ckpt
from lmforge.training.optim import build_optimizers, lr_at, set_lr

TASK = "classification"


@dataclass
class ClassifierTrainConfig:
    train_path: str = ""
    val_path: str = ""
    text_column: str = ""
    label_column: str = ""
    out: str = "out/classifier"
    init: str = ""  # a language-model checkpoint whose tokenizer and body to reuse
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    vocab_size: int = 20000  # word vocabulary when training from scratch
    gpt_heads: int = 4  # attention heads of a from-scratch gpt body
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_iters: int = 100
    eval_every: int = 0  # steps between evaluations (0 = once per epoch)
    patience: int = 0  # stop after this many evaluations without improvement (0 = off)
    class_weights: bool = False  # weight the loss by inverse class frequency
    max_minutes: float = 0.0  # stop after this much training time (0 = no limit)
    seed: int = 1337
    device: str = "auto"
    progress: bool = True


def encode_batch(tokenizer: TextTokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    fallback = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    return [ids[:max_length] or [fallback] for ids in tokenizer.encode_batch(texts)]


def pad_right(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
    return ids.to(device), lengths


def _build(cfg: ClassifierTrainConfig, train_texts: list[str], n_classes: int):
    """Tokenizer, classifier and the body's LM config (None for a BiLSTM from scratch)."""
    if cfg.init:
        from lmforge.training.checkpoint import load_checkpoint

        lm, tokenizer, lm_config = load_checkpoint(cfg.init)
        mcfg = dataclasses.replace(cfg.model, body="lm", vocab_size=tokenizer.vocab_size)
        if lm_config.model.arch == "gpt":
            mcfg.max_length = min(mcfg.max_length, lm_config.model.block_size)
        return tokenizer, TextClassifier(lm, body_width(lm), n_classes, mcfg), lm_config.model
    tokenizer = train_word_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    if cfg.model.body == "gpt":  # a Transformer decoder body, from scratch
        mcfg = dataclasses.replace(cfg.model, body="lm", vocab_size=tokenizer.vocab_size)
        body_config = ModelConfig(arch="gpt", vocab_size=tokenizer.vocab_size, block_size=cfg.model.max_length,
                                  n_layer=cfg.model.n_layer, n_head=cfg.gpt_heads, n_embd=cfg.model.n_embd,
                                  dropout=cfg.model.dropout, pos_encoding="rope", bias=False)
        validate(Config(model=body_config))
        body = build_model(body_config)
        return tokenizer, TextClassifier(body, body_width(body), n_classes, mcfg), body_config
    if cfg.model.body != "bilstm":
        raise UserError(f"Unknown classifier body {cfg.model.body!r}; use bilstm or gpt (or --init a checkpoint).")
    mcfg = dataclasses.replace(cfg.model, body="bilstm", vocab_size=tokenizer.vocab_size)
    body = BiLSTMEncoder(mcfg)
    return tokenizer, TextClassifier(body, body.width, n_classes, mcfg), None


@torch.no_grad()
def predict(model: TextClassifier, tokenizer: TextTokenizer, texts: list[str], batch_size: int = 64,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Class probabilities (N, classes) for the texts."""
    model.eval()
    device = torch.device(device)
    encoded = encode_batch(tokenizer, texts, model.cfg.max_length)
    out = []
    for i in range(0, len(encoded), batch_size):
        ids, lengths = pad_right(encoded[i:i + batch_size], device)
        logits, _ = model(ids, lengths)
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out)


def evaluate_classifier(model, tokenizer, labels: list[str], texts: list[str], gold: list[str],
                        device="cpu") -> dict:
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise UserError(f"The evaluation data has label(s) {', '.join(map(repr, unknown))} that the classifier "
                        f"was not trained on (its labels: {', '.join(labels)}).")
    probs = predict(model, tokenizer, texts, device=device)
    predictions = [labels[i] for i in probs.argmax(-1).tolist()]
    return classification_metrics(predictions, gold)


def train_classifier(cfg: ClassifierTrainConfig, overwrite: bool = False,
                     log: Callable[[str], None] = print) -> dict:
    """Train a classifier on cfg.train_path, evaluate on cfg.val_path, keep the best checkpoint."""
    started = time.perf_counter()
    set_threads(0)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if (out / "config.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a model; pass --overwrite to replace it or choose another --out.")
    texts, labels = read_labeled(cfg.train_path, cfg.text_column or None, cfg.label_column or None)
    label_set = sorted(set(labels))
    if len(label_set) < 2:
        raise UserError(f"{cfg.train_path} has a single class ({label_set[0]!r}); a classifier needs at least two.")
    if cfg.val_path:
        val_texts, val_labels = read_labeled(cfg.val_path, cfg.text_column or None, cfg.label_column or None)
        unknown = sorted(set(val_labels) - set(label_set))
        if unknown:
            raise UserError(f"{cfg.val_path} has label(s) {', '.join(map(repr, unknown))} that do not occur in "
                            f"{cfg.train_path} (labels there: {', '.join(label_set)}).")
    else:  # hold out 10% of the training examples
        cut = max(1, len(texts) // 10)
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(texts), generator=g).tolist()
        val_texts, val_labels = [texts[i] for i in order[:cut]], [labels[i] for i in order[:cut]]
        texts, labels = [texts[i] for i in order[cut:]], [labels[i] for i in order[cut:]]

    torch.manual_seed(cfg.seed)
    tokenizer, model, body_config = _build(cfg, texts, len(label_set))
    model.to(device)
    index = {label: i for i, label in enumerate(label_set)}
    encoded = encode_batch(tokenizer, texts, model.cfg.max_length)
    targets = torch.tensor([index[label] for label in labels])
    counts = Counter(labels)
    weights = None
    if cfg.class_weights:
        weights = torch.tensor([len(labels) / (len(label_set) * counts[c]) for c in label_set], device=device)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    ocfg = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, weight_decay=cfg.weight_decay,
                       warmup_iters=min(cfg.warmup_iters, total_steps // 10), grad_clip=1.0)
    optimizers = build_optimizers(model, ocfg, device)
    eval_every = cfg.eval_every or steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    log(f"Training a {model.cfg.body} classifier ({n_params / 1e6:.2f}M parameters) on {len(encoded):,} examples, "
        f"{len(label_set)} labels {label_set}, {total_steps} steps, device {device}")

    out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    metrics_file = open(out / "metrics.jsonl", "w", encoding="utf-8")
    best, bad_evals, step, stopped = -1.0, 0, 0, "epochs"
    generator = torch.Generator().manual_seed(cfg.seed)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, disable=not cfg.progress, unit="step", leave=False)
    running, running_n = 0.0, 0
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(encoded), generator=generator).tolist()
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start:start + cfg.batch_size]
                model.train()
                ids, lengths = pad_right([encoded[i] for i in batch], device)
                set_lr(optimizers, lr_at(step, ocfg, total_steps), ocfg)
                _, loss = model(ids, lengths, targets[batch].to(device), weights)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.grad_clip)
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step += 1
                running += loss.item()
                running_n += 1
                bar.update(1)
                timed_out = cfg.max_minutes and time.perf_counter() - started > cfg.max_minutes * 60
                if step % eval_every == 0 or step == total_steps or timed_out:
                    scores = evaluate_classifier(model, tokenizer, label_set, val_texts, val_labels, device)
                    record = {"step": step, "train_loss": round(running / running_n, 5),
                              "val_accuracy": round(scores["accuracy"], 5), "val_macro_f1": round(scores["macro_f1"], 5),
                              "elapsed_s": round(time.perf_counter() - started, 2)}
                    running, running_n = 0.0, 0
                    history.append(record)
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    bar.write(f"step {step:>6} | train {record['train_loss']:.4f} | val accuracy "
                              f"{scores['accuracy']:.4f} | macro-F1 {scores['macro_f1']:.4f} | {record['elapsed_s']:.0f}s")
                    if scores["accuracy"] > best:
                        best, bad_evals = scores["accuracy"], 0
                        save_classifier(out, model, tokenizer, label_set, body_config,
                                        {"step": step, "val_accuracy": scores["accuracy"],
                                         "val_macro_f1": scores["macro_f1"], "train_path": cfg.train_path})
                    else:
                        bad_evals += 1
                    if cfg.patience and bad_evals >= cfg.patience:
                        stopped = "patience"
                        raise StopIteration
                    if timed_out:
                        stopped = "time limit"
                        raise StopIteration
    except StopIteration:
        pass
    except KeyboardInterrupt:
        bar.close()
        metrics_file.close()
        raise TrainingInterrupted(out, step) from None
    bar.close()
    metrics_file.close()
    from lmforge.training.trainer import write_loss_plot

    write_loss_plot(history, out / "loss.png")
    return {"out": str(out), "steps": step, "best_val_accuracy": best, "stopped_because": stopped,
            "elapsed_s": time.perf_counter() - started, "history": history, "labels": label_set}


def save_classifier(out: Path, model: TextClassifier, tokenizer: TextTokenizer, labels: list[str],
                    body_config: ModelConfig | None, info: dict) -> None:
    ckpt.save_weights(out / "model.safetensors", model, {"format": "pt"})
    tokenizer.save(out / "tokenizer.json")
    atomic_write_json(out / "config.json", {
        "format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "task": TASK,
        "classifier": dataclasses.asdict(model.cfg), "labels": labels,
        "body": dataclasses.asdict(body_config) if body_config is not None else None, **info,
    })


def is_classifier(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text("utf-8")).get("task") == TASK
    except (OSError, ValueError, AttributeError):
        return False


def load_classifier(path: str | Path, device: str = "cpu") -> tuple[TextClassifier, TextTokenizer, list[str]]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not an lmforge checkpoint (no config.json).")
    data = json.loads((path / "config.json").read_text("utf-8"))
    if data.get("format") != ckpt.FORMAT or data.get("task") != TASK:
        raise UserError(f"{path} is not an lmforge classifier checkpoint.")
    mcfg = ClassifierConfig(**data["classifier"])
    labels = data["labels"]
    if data.get("body"):
        body = build_model(config_from_dict({"model": data["body"]}).model)
    else:
        body = BiLSTMEncoder(mcfg)
    model = TextClassifier(body, body_width(body), len(labels), mcfg)
    for name in ("model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise UserError(f"Checkpoint {path} is incomplete: {name} is missing.")
    ckpt.load_weights(path / "model.safetensors", model)
    return model.to(resolve_device(device)).eval(), load_tokenizer(path / "tokenizer.json"), labels
