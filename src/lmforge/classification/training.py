"""Training text classifiers (for example sentiment) on the shared training loop: a BiLSTM or a small
Transformer from scratch, or the body of a language model (`init.checkpoint`). A run writes a classifier
checkpoint (inference.py) with metrics.jsonl, loss.png and a resumable training state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.checkpoint import open_checkpoint
from lmforge.classification.inference import encode_batch, evaluate_classifier, pad_right, save_classifier
from lmforge.classification.model import BiLSTMEncoder, ClassifierConfig, TextClassifier, body_width
from lmforge.config import (
    CLASSIFIER_TRAIN_FIELDS,
    ClassifierRunConfig,
    Config,
    ModelConfig,
    TrainConfig,
    check_training_sections,
    validate,
)
from lmforge.data.labeled import read_labeled
from lmforge.device import resolve_device, set_threads
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.families import family_of
from lmforge.models import build_model
from lmforge.settings import check_fields
from lmforge.tokenizers import train_word_tokenizer
from lmforge.training import privacy as private
from lmforge.training import state as saved_state
from lmforge.training.loop import Progress, Schedule, Trainee, run_loop
from lmforge.training.metrics import MetricsLog, Reporter, write_loss_plot
from lmforge.training.optim import BudgetHorizon, build_optimizers, lr_at, set_lr
from lmforge.training.sources import length_grouped_batches
from lmforge.training.state import STATE_DIR


def _build(cfg: ClassifierRunConfig, train_texts: list[str], n_classes: int):
    """Tokenizer, classifier and the body's LM config (None for a BiLSTM from scratch)."""
    if cfg.init.checkpoint:
        from lmforge.checkpoint import load_checkpoint

        lm, tokenizer, lm_config = load_checkpoint(
            open_checkpoint(cfg.init.checkpoint).require("train-classifier")
        )
        body_config = lm_config.model
        if cfg.init.layers:
            lm, body_config = _first_blocks(lm, body_config, cfg.init.layers, cfg.init.checkpoint)
        mcfg = dataclasses.replace(cfg.model, body="lm", vocab_size=tokenizer.vocab_size)
        if not family_of(body_config.arch).carries_state:  # a Transformer's context bounds the text
            mcfg.max_length = min(mcfg.max_length, body_config.block_size)
        # An encoder (BERT) reads texts framed as it was trained: [CLS] ... [SEP], where its tokenizer says so.
        mcfg.special_tokens = (
            family_of(body_config.arch).embeds and tokenizer.hf.num_special_tokens_to_add(False) > 0
        )
        return tokenizer, TextClassifier(lm, body_width(lm), n_classes, mcfg), body_config
    tokenizer = train_word_tokenizer(train_texts, vocab_size=cfg.data.vocab_size)
    if cfg.model.body == "gpt":  # a Transformer decoder body, from scratch
        mcfg = dataclasses.replace(cfg.model, body="lm", vocab_size=tokenizer.vocab_size)
        body_config = ModelConfig(
            arch="gpt",
            vocab_size=tokenizer.vocab_size,
            block_size=cfg.model.max_length,
            n_layer=cfg.model.n_layer,
            n_head=cfg.model.n_head,
            n_embd=cfg.model.n_embd,
            dropout=cfg.model.dropout,
            pos_encoding="rope",
            bias=False,
        )
        validate(Config(model=body_config))
        body = build_model(body_config)
        return tokenizer, TextClassifier(body, body_width(body), n_classes, mcfg), body_config
    if cfg.model.body != "bilstm":
        raise UserError(
            f"Unknown classifier body {cfg.model.body!r}; use bilstm or gpt (or init from a checkpoint).",
            settings=("model.body", "init.checkpoint"),
        )
    mcfg = dataclasses.replace(cfg.model, body="bilstm", vocab_size=tokenizer.vocab_size)
    body = BiLSTMEncoder(mcfg)
    return tokenizer, TextClassifier(body, body.width, n_classes, mcfg), None


def _first_blocks(lm: nn.Module, config: ModelConfig, n: int, name: str) -> tuple[nn.Module, ModelConfig]:
    """The body with only its first `n` Transformer blocks (and its final norm): the lower layers
    of a language model already read sentiment well, at a fraction of the cost per example."""
    blocks = getattr(lm, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UserError(
            f"init_layers applies to Transformer bodies; {name} has no blocks.", settings=("init_layers",)
        )
    if n > len(blocks):
        raise UserError(f"init_layers is {n} but {name} has {len(blocks)} blocks; use at most {len(blocks)}.",
                        settings=("init_layers",))  # fmt: skip
    lm.blocks = blocks[:n]
    lm.config = dataclasses.replace(config, n_layer=n)
    return lm, lm.config


@torch.no_grad()
class ExampleSource:
    """Shuffled batches of labeled examples, a new order each epoch, for the shared loop.

    With `group_by_length` each epoch's shuffled order is grouped into batches of similar length
    (`length_grouped_batches`, as the encoder–decoder's pairs are) and the batches shuffled: little
    of a batch is then padding (short SST-2 phrases padded to a long sentence's
    length cost as much as long sentences). The epoch still visits every example once."""

    def __init__(
        self,
        encoded: list[list[int]],
        targets: torch.Tensor,
        batch_size: int,
        seed: int,
        device: torch.device,
        class_weights: torch.Tensor | None,
        scorer: Callable[[], dict[str, float]],
        group_by_length: bool = False,
    ):
        self.encoded, self.targets, self.batch_size, self.device = encoded, targets, batch_size, device
        self.class_weights, self.scorer, self.group_by_length = class_weights, scorer, group_by_length
        self.lengths = torch.tensor([len(ids) for ids in encoded])
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.zeros(0, dtype=torch.long)
        self.position = 0

    def _epoch_order(self) -> torch.Tensor:
        order = torch.randperm(len(self.encoded), generator=self.generator)
        if not self.group_by_length:
            return order
        batches = length_grouped_batches(order, self.lengths, self.batch_size)
        # Shuffle the full batches; a short last batch stays last so that every batch is a
        # `batch_size` slice of the order (the order and a position are all a resume needs).
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=self.generator).tolist()]
        return torch.cat(shuffled + short)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position >= len(self.order):  # a new epoch
            self.order = self._epoch_order()
            self.position = 0
        rows = self.order[self.position : self.position + self.batch_size].tolist()
        self.position += self.batch_size
        ids, lengths = pad_right([self.encoded[i] for i in rows], self.device)
        return ids, lengths, self.targets[rows].to(self.device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(*batch, self.class_weights)[1]

    def validation_score(self, model: nn.Module, dtype: torch.dtype) -> dict[str, float]:
        scores = self.scorer()
        model.train()  # scoring left it in eval mode
        return scores

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order,
            "position": torch.tensor([self.position]),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], int(state["position"][0])


def _read_splits(cfg: ClassifierRunConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    """Training and validation texts and labels (10% of the training data when no validation file)."""
    data = cfg.data
    texts, labels = read_labeled(data.path, data.text_column or None, data.label_column or None)
    label_set = sorted(set(labels))
    if len(label_set) < 2:
        raise UserError(
            f"{data.path} has a single class ({label_set[0]!r}); a classifier needs at least two."
        )
    if data.val_path:
        val_texts, val_labels = read_labeled(
            data.val_path, data.text_column or None, data.label_column or None
        )
        unknown = sorted(set(val_labels) - set(label_set))
        if unknown:
            raise UserError(
                f"{data.val_path} has label(s) {', '.join(map(repr, unknown))} that do not occur in "
                f"{data.path} (labels there: {', '.join(label_set)})."
            )
        return texts, labels, val_texts, val_labels
    held = _held_out(labels, cfg.train.seed)
    kept = [i for i in range(len(texts)) if i not in held]
    return ([texts[i] for i in kept], [labels[i] for i in kept], [texts[i] for i in sorted(held)],
            [labels[i] for i in sorted(held)])  # fmt: skip


def _held_out(labels: list[str], seed: int) -> set[int]:
    """The examples held out for validation when no validation file is given: about 10% of each label
    (stratified), never every example of a label (a label too rare to spare one stays in training)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g).tolist()
    by_label: dict[str, list[int]] = {}
    for i in order:
        by_label.setdefault(labels[i], []).append(i)
    held = {
        i for members in by_label.values() for i in members[: min(len(members) - 1, round(len(members) / 10))]
    }
    if not held:  # a tiny set: one example of the commonest label that can spare one
        members = max(by_label.values(), key=len)
        held = {members[0]} if len(members) > 1 else set()
    if not held:
        raise UserError("Too few examples to hold any out for validation (each label has one); give a "
                        "validation file (--val) or more examples.")  # fmt: skip
    return held


# What a resumed classifier run must share with the run it continues (the rest, such as epochs or the
# learning rate, may change).
SAME_ON_RESUME = ("data.path", "data.val_path", "data.text_column", "data.label_column", "data.vocab_size",
                  "init.checkpoint", "init.layers", "model")  # fmt: skip
# The same settings in the flat config that runs saved before the sections (format 1)
V1_NAMES = {"data.path": "train_path", "data.val_path": "val_path", "data.text_column": "text_column",
            "data.label_column": "label_column", "data.vocab_size": "vocab_size", "init.checkpoint": "init",
            "init.layers": "init_layers", "model": "model"}  # fmt: skip
_CLASSIFIER_FIELDS = {f.name for f in dataclasses.fields(ClassifierConfig)}


def _identity(saved: dict) -> dict:
    """SAME_ON_RESUME's values in a saved run's config, sectioned or (format 1) flat; the model's
    settings with today's defaults for those it does not name."""
    if "data" in saved:  # sections left out (init when unused) hold their defaults
        defaults = dataclasses.asdict(ClassifierRunConfig())
        values = {}
        for key in SAME_ON_RESUME:
            section, _, name = key.partition(".")
            where = saved.get(section, defaults[section])
            values[key] = where.get(name, defaults[section][name]) if name else where
    else:
        values = {key: saved.get(V1_NAMES[key]) for key in SAME_ON_RESUME}
    model = values["model"] if isinstance(values["model"], dict) else {}
    values["model"] = (
        dataclasses.asdict(ClassifierConfig(**model)) if set(model) <= _CLASSIFIER_FIELDS else model
    )
    return values


def _check_same_run(out: Path, cfg: ClassifierRunConfig) -> None:
    """A resumed run trains the same model on the same data as the run it continues: refuse other
    settings by name (rather than fail later on the saved tensors' shapes)."""
    for folder in (out / STATE_DIR, out / f"{STATE_DIR}.old"):
        try:
            saved = json.loads((folder / "state.json").read_text("utf-8"))["config"]
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    else:
        raise UserError(f"{out} has no readable training state to resume; overwrite it to start again.")
    before, now = _identity(saved), _identity(cfg.to_dict())
    differ = [key for key in SAME_ON_RESUME if before[key] != now[key]]
    if differ:
        raise UserError(f"Cannot resume {out}: {', '.join(differ)} differ from the saved run's; give the same "
                        f"data and model settings, or overwrite the run.", settings=("resume", "overwrite"))  # fmt: skip


def _check_classifier_out(out: Path, resume: bool, overwrite: bool) -> None:
    has_state = (out / STATE_DIR).is_dir() or (out / f"{STATE_DIR}.old").is_dir()
    if resume and not has_state:
        raise UserError(
            f"There is no classifier training to resume in {out}; start one without resume.",
            settings=("resume",),
        )
    if not resume and (out / "config.json").exists() and not overwrite:
        raise UserError(
            f"{out} already holds a model; overwrite it, resume it, or choose another output folder.",
            settings=("overwrite", "resume", "out"),
        )
    if not resume and overwrite:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "metrics.csv",
                     "tensorboard", STATE_DIR):  # fmt: skip
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def train_classifier(
    cfg: ClassifierRunConfig,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train a classifier on cfg.data.path, evaluate on cfg.data.val_path, keep the best checkpoint.

    Runs on the shared training loop: early stopping, a time limit, Ctrl-C with a saved state,
    and `resume` continuing exactly.
    """
    validate_classifier_config(cfg)
    set_threads(cfg.train.threads)
    out = Path(cfg.train.out)
    _check_classifier_out(out, resume, overwrite)
    trainee, schedule, label_set = _classifier_trainee(cfg, resolve_device(cfg.train.device), out, log)
    progress = Progress()
    if resume:
        _check_same_run(out, cfg)
        rng, saved = saved_state.load_train_state(out, trainee.model, trainee.optimizers)
        saved_state.set_rng_state(rng, trainee.source, trainee.device)
        progress = Progress.from_dict(saved)
        log(f"Resuming {out} at step {progress.step} (best validation accuracy {progress.best:.4f}).")
    else:
        n_params = sum(p.numel() for p in trainee.model.parameters())
        log(
            f"Training a {trainee.model.cfg.body} classifier ({n_params / 1e6:.2f}M parameters) on "
            f"{len(trainee.source.encoded):,} examples, {len(label_set)} labels {label_set}, "
            f"{schedule.max_steps} steps, device {trainee.device}"
        )
        for section, values in cfg.to_dict().items():
            log(f"  [{section}] " + " ".join(f"{k}={v}" for k, v in values.items()))
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=progress.step if resume else None,
                         loggers=cfg.train.loggers)  # fmt: skip
    reporter = Reporter(cfg.train.progress, schedule.max_steps, progress.step)
    try:
        run_loop(trainee, schedule, progress, metrics, reporter, on_step)
    except TrainingInterrupted as stopped:
        raise TrainingInterrupted(out, stopped.step, stopped.resumable, stopped.mid_step) from None
    finally:
        metrics.close()
    write_loss_plot(metrics.history, out / "loss.png")
    stopped = {"max_iters": "epochs"}.get(progress.stopped_because, progress.stopped_because)
    return {
        "out": str(out),
        "steps": progress.step,
        "best_val_accuracy": progress.best,
        "stopped_because": stopped,
        "elapsed_s": progress.elapsed(),
        "history": metrics.history,
        "labels": label_set,
        "epsilon": next((r["epsilon"] for r in reversed(metrics.history) if "epsilon" in r), None),
    }


def _classifier_trainee(
    cfg: ClassifierRunConfig, device: torch.device, out: Path, log: Callable[[str], None] = print
) -> tuple[Trainee, Schedule, list[str]]:
    """The data, model, optimizer, batch source and schedule of a classifier run, for the shared loop."""
    texts, labels, val_texts, val_labels = _read_splits(cfg)
    label_set = sorted(set(labels))
    torch.manual_seed(cfg.train.seed)
    tokenizer, model, body_config = _build(cfg, texts, len(label_set))
    if cfg.train.init_embeddings:
        from lmforge.embeddings import describe_coverage, init_embedding

        log(describe_coverage(init_embedding(model.body.wte, tokenizer, cfg.train.init_embeddings)))
    if cfg.init.freeze_embeddings:
        # A pretrained token embedding is already good, and it is the body's largest matrix (SmolLM2:
        # 28M of 50M parameters in its first 6 blocks): its gradient and optimizer update cost a third of a step.
        for module in model.body.modules():
            if isinstance(module, nn.Embedding):
                module.weight.requires_grad_(False)
    if private.enabled(cfg.privacy):
        private.prepare_model(model)  # Opacus' recurrent layers, same weights
    model.to(device)
    encoded = encode_batch(tokenizer, texts, model.cfg.max_length, model.cfg.special_tokens)
    weights = None
    if cfg.data.class_weights:  # inverse class frequency
        counts = Counter(labels)
        weights = torch.tensor([len(labels) / (len(label_set) * counts[c]) for c in label_set], device=device)
    batch_size = cfg.train.batch_size
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    total_steps = cfg.train.epochs * steps_per_epoch
    # a short run warms up over at most a tenth of its steps
    ocfg = dataclasses.replace(cfg.optim, warmup_iters=min(cfg.optim.warmup_iters, total_steps // 10))
    optimizers = build_optimizers(model, ocfg, device)
    forward, privacy = model, None
    if private.enabled(cfg.privacy):  # each labeled text is one example of the guarantee
        private.check_supported(optimizers, grad_accum=1, distributed=False, compiled=False)
        privacy = private.plan(cfg.privacy, len(encoded), batch_size, total_steps)
        log(privacy.describe(total_steps))
        forward, dp_optimizer = private.make_private(model, optimizers[0], privacy)
        ocfg.grad_clip = 0.0  # the DP optimizer clips each example's gradient instead
    index = {label: i for i, label in enumerate(label_set)}
    targets = torch.tensor([index[label] for label in labels])
    scorer = partial(_scores, model, tokenizer, label_set, val_texts, val_labels, device)
    # DP-SGD's guarantee assumes batches drawn at random, so its batches are never grouped by length.
    grouped = cfg.train.group_by_length and not private.enabled(cfg.privacy)
    source = ExampleSource(encoded, targets, batch_size, cfg.train.seed, device, weights, scorer, grouped)
    every = cfg.train.eval_interval or steps_per_epoch
    schedule = Schedule(max_steps=total_steps, eval_interval=every, log_interval=every, grad_clip=ocfg.grad_clip,
                        patience=cfg.train.patience, max_time_s=cfg.train.max_time_s, monitor="val_accuracy",
                        higher_is_better=True)  # fmt: skip

    # Under a time budget the schedule ends when the budget does (its steps estimated from the
    # speed so far), so that the learning rate has decayed by the time training stops.
    horizon = BudgetHorizon(cfg.train.max_time_s, total_steps)

    def set_step_lr(step: int) -> float:
        lr = lr_at(step, ocfg, horizon(step))
        set_lr(optimizers, lr, ocfg)
        return lr

    def save_best(p: Progress) -> None:
        scores = {"val_accuracy": p.scores["val_accuracy"], "val_macro_f1": p.scores["val_macro_f1"]}
        info = {"step": p.step, **scores, "train_path": cfg.data.path}
        if privacy:
            info["privacy"] = privacy.info(p.step)
        save_classifier(out, model, tokenizer, label_set, body_config, info)

    def save_state(p: Progress) -> None:
        rng = saved_state.rng_state(source, device)
        saved_state.save_train_state(out, model, optimizers, rng, {**p.to_dict(), "config": cfg.to_dict()})

    trainee = Trainee(model=model, forward=forward, optimizers=[dp_optimizer] if privacy else optimizers,
                      source=source, set_lr=set_step_lr, save_best=save_best, save_state=save_state, device=device,
                      report=(lambda p: {"epsilon": privacy.epsilon(p.step)}) if privacy else None)  # fmt: skip
    return trainee, schedule, label_set


def _scores(model, tokenizer, label_set, texts, gold, device) -> dict[str, float]:
    scores = evaluate_classifier(model, tokenizer, label_set, texts, gold, device)
    return {"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}


def validate_classifier_config(cfg: ClassifierRunConfig) -> None:
    """Settings a classifier run cannot work with, named, before any work starts: every declared range
    (the same checks as a language model's run for the optim, train and privacy sections), a train
    setting of language-model runs alone, and the rules that tie a classifier's settings together."""
    check_fields(cfg)
    check_training_sections(cfg.optim, cfg.train)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name not in CLASSIFIER_TRAIN_FIELDS and getattr(cfg.train, f.name) != getattr(defaults, f.name):
            raise UserError(f"train.{f.name} does not apply to a classifier run (it trains for train.epochs); "
                            f"leave it out.", settings=(f"train.{f.name}",))  # fmt: skip
    checks = [
        (cfg.model.body in ("bilstm", "gpt"), "model.body must be bilstm or gpt (or give init.checkpoint)",
         "model.body"),
        (cfg.model.pooling in ("mean", "max", "last", "first"), "model.pooling must be mean, max, last or first",
         "model.pooling"),
        (not (cfg.init.checkpoint and cfg.train.init_embeddings),
         "give either init.checkpoint (a language model's body) or train.init_embeddings (word vectors), not both",
         "init.checkpoint"),
        (not cfg.init.freeze_embeddings or bool(cfg.init.checkpoint or cfg.train.init_embeddings),
         "init.freeze_embeddings keeps pretrained embeddings fixed: give init.checkpoint (a language model) or "
         "train.init_embeddings (word vectors), or leave it off", "init.freeze_embeddings"),
    ]  # fmt: skip
    for ok, message, setting in checks:
        if not ok:
            raise UserError(f"Classifier setting {message}.", settings=(setting,))
