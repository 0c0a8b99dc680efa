"""Training and using text classifiers (for example sentiment), with the checkpoint format
of the language models: config.json (with "task": "classification" and the label set),
model.safetensors, tokenizer.json, metrics.jsonl and loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.checkpoint import open_checkpoint, write_checkpoint
from lmforge.config import Config, ModelConfig, OptimConfig, PrivacyConfig, config_from_dict, validate
from lmforge.data.labeled import read_labeled
from lmforge.device import resolve_device, set_threads
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.evaluation.metrics import classification_metrics
from lmforge.families import family_of
from lmforge.models import build_model
from lmforge.models.classifier import BiLSTMEncoder, ClassifierConfig, TextClassifier, body_width
from lmforge.settings import check_fields
from lmforge.tokenizers import TextTokenizer, train_word_tokenizer
from lmforge.training import privacy as private
from lmforge.training import state as saved_state
from lmforge.training.loop import Progress, Schedule, Trainee, run_loop
from lmforge.training.metrics import MetricsLog, Reporter, parse_loggers, write_loss_plot
from lmforge.training.optim import BudgetHorizon, build_optimizers, lr_at, set_lr
from lmforge.training.sources import length_grouped_batches
from lmforge.training.state import STATE_DIR
from lmforge.weights import load_state, load_weights, unique_state_dict

TASK = "classification"


@dataclass
class ClassifierTrainConfig:
    train_path: str = ""
    val_path: str = ""
    text_column: str = ""
    label_column: str = ""
    out: str = "out/classifier"
    init: str = ""  # a language-model checkpoint whose tokenizer and body to reuse
    init_layers: int = 0  # keep only the first N blocks of the --init body (0 = all): faster per example
    init_embeddings: str = ""  # word2vec/GloVe vectors for the word embedding of a from-scratch body
    freeze_embeddings: bool = (
        False  # keep the pretrained body's embeddings (token, positions) fixed: faster steps
    )
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # DP-SGD (off by default)
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
    group_by_length: bool = True  # batches of similar-length texts: less padding, faster steps
    max_minutes: float = 0.0  # stop after this much training time (0 = no limit)
    seed: int = 1337
    device: str = "auto"
    progress: bool = True
    loggers: str = ""  # beside metrics.jsonl: csv, tensorboard (comma-separated)


def encode_batch(tokenizer: TextTokenizer, texts: list[str], max_length: int, special_tokens: bool = False
                 ) -> list[list[int]]:  # fmt: skip
    """Each text's first `max_length` tokens (with `special_tokens`: framed by the tokenizer's own,
    [CLS] ... [SEP] or <s> ... </s>, the text cut so that the frame fits)."""
    if special_tokens:
        return tokenizer.encode_framed(texts, max_length)
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
        from lmforge.checkpoint import load_checkpoint

        lm, tokenizer, lm_config = load_checkpoint(open_checkpoint(cfg.init).require("train-classifier"))
        body_config = lm_config.model
        if cfg.init_layers:
            lm, body_config = _first_blocks(lm, body_config, cfg.init_layers, cfg.init)
        mcfg = dataclasses.replace(cfg.model, body="lm", vocab_size=tokenizer.vocab_size)
        if not family_of(body_config.arch).carries_state:  # a Transformer's context bounds the text
            mcfg.max_length = min(mcfg.max_length, body_config.block_size)
        # An encoder (BERT) reads texts framed as it was trained: [CLS] ... [SEP], where its tokenizer says so.
        mcfg.special_tokens = (
            family_of(body_config.arch).embeds and tokenizer.hf.num_special_tokens_to_add(False) > 0
        )
        return tokenizer, TextClassifier(lm, body_width(lm), n_classes, mcfg), body_config
    tokenizer = train_word_tokenizer(train_texts, vocab_size=cfg.vocab_size)
    if cfg.model.body == "gpt":  # a Transformer decoder body, from scratch
        mcfg = dataclasses.replace(cfg.model, body="lm", vocab_size=tokenizer.vocab_size)
        body_config = ModelConfig(
            arch="gpt",
            vocab_size=tokenizer.vocab_size,
            block_size=cfg.model.max_length,
            n_layer=cfg.model.n_layer,
            n_head=cfg.gpt_heads,
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
            settings=("body", "init"),
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
def predict(
    model: TextClassifier,
    tokenizer: TextTokenizer,
    texts: list[str],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class probabilities (N, classes) for the texts."""
    model.eval()
    device = resolve_device(device)
    encoded = encode_batch(tokenizer, texts, model.cfg.max_length, model.cfg.special_tokens)
    out = []
    for i in range(0, len(encoded), batch_size):
        ids, lengths = pad_right(encoded[i : i + batch_size], device)
        logits, _ = model(ids, lengths)
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out)


def evaluate_classifier(
    model, tokenizer, labels: list[str], texts: list[str], gold: list[str], device="cpu"
) -> dict:
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise UserError(
            f"The evaluation data has label(s) {', '.join(map(repr, unknown))} that the classifier "
            f"was not trained on (its labels: {', '.join(labels)})."
        )
    probs = predict(model, tokenizer, texts, device=device)
    predictions = [labels[i] for i in probs.argmax(-1).tolist()]
    return classification_metrics(predictions, gold)


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


def _read_splits(cfg: ClassifierTrainConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    """Training and validation texts and labels (10% of the training data when no validation file)."""
    texts, labels = read_labeled(cfg.train_path, cfg.text_column or None, cfg.label_column or None)
    label_set = sorted(set(labels))
    if len(label_set) < 2:
        raise UserError(
            f"{cfg.train_path} has a single class ({label_set[0]!r}); a classifier needs at least two."
        )
    if cfg.val_path:
        val_texts, val_labels = read_labeled(cfg.val_path, cfg.text_column or None, cfg.label_column or None)
        unknown = sorted(set(val_labels) - set(label_set))
        if unknown:
            raise UserError(
                f"{cfg.val_path} has label(s) {', '.join(map(repr, unknown))} that do not occur in "
                f"{cfg.train_path} (labels there: {', '.join(label_set)})."
            )
        return texts, labels, val_texts, val_labels
    held = _held_out(labels, cfg.seed)
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
SAME_ON_RESUME = ("train_path", "val_path", "text_column", "label_column", "vocab_size", "init", "init_layers",
                  "model")  # fmt: skip


def _check_same_run(out: Path, cfg: ClassifierTrainConfig) -> None:
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
    now = dataclasses.asdict(cfg)
    differ = [key for key in SAME_ON_RESUME if saved.get(key) != now.get(key)]
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
    cfg: ClassifierTrainConfig,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train a classifier on cfg.train_path, evaluate on cfg.val_path, keep the best checkpoint.

    Runs on the shared training loop: early stopping, a time limit, Ctrl-C with a saved state,
    and `resume` continuing exactly.
    """
    validate_classifier_config(cfg)
    set_threads(0)
    out = Path(cfg.out)
    _check_classifier_out(out, resume, overwrite)
    trainee, schedule, label_set = _classifier_trainee(cfg, resolve_device(cfg.device), out, log)
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
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=progress.step if resume else None,
                         loggers=cfg.loggers)  # fmt: skip
    reporter = Reporter(cfg.progress, schedule.max_steps, progress.step)
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
    cfg: ClassifierTrainConfig, device: torch.device, out: Path, log: Callable[[str], None] = print
) -> tuple[Trainee, Schedule, list[str]]:
    """The data, model, optimizer, batch source and schedule of a classifier run, for the shared loop."""
    texts, labels, val_texts, val_labels = _read_splits(cfg)
    label_set = sorted(set(labels))
    torch.manual_seed(cfg.seed)
    tokenizer, model, body_config = _build(cfg, texts, len(label_set))
    if cfg.init_embeddings:
        from lmforge.embeddings import describe_coverage, init_embedding

        if cfg.init:
            raise UserError("Give either init (a language model's body) or init_embeddings (word vectors), "
                            "not both.", settings=("init", "init_embeddings"))  # fmt: skip
        log(describe_coverage(init_embedding(model.body.wte, tokenizer, cfg.init_embeddings)))
    if cfg.freeze_embeddings:
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
    if cfg.class_weights:  # inverse class frequency
        counts = Counter(labels)
        weights = torch.tensor([len(labels) / (len(label_set) * counts[c]) for c in label_set], device=device)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    ocfg = OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, weight_decay=cfg.weight_decay,
                       warmup_iters=min(cfg.warmup_iters, total_steps // 10), grad_clip=1.0)  # fmt: skip
    optimizers = build_optimizers(model, ocfg, device)
    forward, privacy = model, None
    if private.enabled(cfg.privacy):  # each labeled text is one example of the guarantee
        private.check_supported(optimizers, grad_accum=1, distributed=False, compiled=False)
        privacy = private.plan(cfg.privacy, len(encoded), cfg.batch_size, total_steps)
        log(privacy.describe(total_steps))
        forward, dp_optimizer = private.make_private(model, optimizers[0], privacy)
        ocfg.grad_clip = 0.0  # the DP optimizer clips each example's gradient instead
    index = {label: i for i, label in enumerate(label_set)}
    targets = torch.tensor([index[label] for label in labels])
    scorer = partial(_scores, model, tokenizer, label_set, val_texts, val_labels, device)
    # DP-SGD's guarantee assumes batches drawn at random, so its batches are never grouped by length.
    grouped = cfg.group_by_length and not private.enabled(cfg.privacy)
    source = ExampleSource(encoded, targets, cfg.batch_size, cfg.seed, device, weights, scorer, grouped)
    every = cfg.eval_every or steps_per_epoch
    schedule = Schedule(max_steps=total_steps, eval_interval=every, log_interval=every, grad_clip=ocfg.grad_clip,
                        patience=cfg.patience, max_time_s=cfg.max_minutes * 60, monitor="val_accuracy",
                        higher_is_better=True)  # fmt: skip

    # Under a time budget the schedule ends when the budget does (its steps estimated from the
    # speed so far), so that the learning rate has decayed by the time training stops.
    horizon = BudgetHorizon(cfg.max_minutes * 60, total_steps)

    def set_step_lr(step: int) -> float:
        lr = lr_at(step, ocfg, horizon(step))
        set_lr(optimizers, lr, ocfg)
        return lr

    def save_best(p: Progress) -> None:
        scores = {"val_accuracy": p.scores["val_accuracy"], "val_macro_f1": p.scores["val_macro_f1"]}
        info = {"step": p.step, **scores, "train_path": cfg.train_path}
        if privacy:
            info["privacy"] = privacy.info(p.step)
        save_classifier(out, model, tokenizer, label_set, body_config, info)

    def save_state(p: Progress) -> None:
        rng = saved_state.rng_state(source, device)
        saved_state.save_train_state(
            out, model, optimizers, rng, {**p.to_dict(), "config": dataclasses.asdict(cfg)}
        )

    trainee = Trainee(model=model, forward=forward, optimizers=[dp_optimizer] if privacy else optimizers,
                      source=source, set_lr=set_step_lr, save_best=save_best, save_state=save_state, device=device,
                      report=(lambda p: {"epsilon": privacy.epsilon(p.step)}) if privacy else None)  # fmt: skip
    return trainee, schedule, label_set


def _scores(model, tokenizer, label_set, texts, gold, device) -> dict[str, float]:
    scores = evaluate_classifier(model, tokenizer, label_set, texts, gold, device)
    return {"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}


def validate_classifier_config(cfg: ClassifierTrainConfig) -> None:
    """Settings a classifier run cannot work with, named, before any work starts."""
    checks = [
        (cfg.epochs >= 1, "epochs must be at least 1"),
        (cfg.batch_size >= 1, "batch_size must be at least 1"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, "lr must be a positive number"),
        (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay must be at least 0"),
        (cfg.warmup_iters >= 0 and cfg.eval_every >= 0, "warmup_iters and eval_every must be at least 0"),
        (cfg.patience >= 0, "patience must be at least 0 (0 = off)"),
        (
            math.isfinite(cfg.max_minutes) and cfg.max_minutes >= 0,
            "max_minutes must be at least 0 (0 = no limit)",
        ),
        (cfg.vocab_size >= 2, "vocab_size must be at least 2"),
        (cfg.init_layers >= 0, "init_layers must be at least 0 (0 = all)"),
        (
            not cfg.freeze_embeddings or bool(cfg.init or cfg.init_embeddings),
            "freeze_embeddings keeps pretrained embeddings fixed: give init (a language model) or "
            "init_embeddings (word vectors), or leave it off",
        ),
        (cfg.model.max_length >= 1, "model.max_length must be at least 1"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (
            cfg.model.n_embd >= 1 and cfg.model.n_layer >= 1 and cfg.model.hidden_size >= 1,
            "model.n_embd, model.n_layer and model.hidden_size must be at least 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"Classifier setting {message}.")
    check_fields(cfg.privacy, "privacy.")
    parse_loggers(cfg.loggers)


def save_classifier(
    out: Path,
    model: TextClassifier,
    tokenizer: TextTokenizer,
    labels: list[str],
    body_config: ModelConfig | None,
    info: dict,
) -> None:
    write_checkpoint(
        out,
        unique_state_dict(model),
        tokenizer,
        {
            "task": TASK,
            "classifier": dataclasses.asdict(model.cfg),
            "labels": labels,
            "body": dataclasses.asdict(body_config) if body_config is not None else None,
            **info,
        },
    )


def is_classifier(path: str | Path) -> bool:
    try:
        return open_checkpoint(path).is_classifier
    except UserError:
        return False


def _classifier_metadata(data: dict, source: Path) -> tuple[ClassifierConfig, list[str]]:
    """The classifier's settings and labels from its config.json, or one sentence saying what is
    missing or wrong there (a damaged or hand-edited file)."""
    labels, settings = data.get("labels"), data.get("classifier")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise UserError(
            f"{source} has no list of labels (at least two texts); the classifier checkpoint is damaged."
        )
    if not isinstance(settings, dict):
        raise UserError(f"{source} has no 'classifier' settings; the classifier checkpoint is damaged.")
    known = {f.name for f in dataclasses.fields(ClassifierConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"{source}: unknown classifier setting(s) {', '.join(unknown)}; the checkpoint was written "
                        f"by another version or edited by hand.")  # fmt: skip
    mcfg = ClassifierConfig(**settings)
    try:
        check_fields(mcfg, "classifier.")
    except UserError as e:
        raise UserError(f"{source}: {e} The classifier checkpoint is damaged.") from None
    return mcfg, labels


def load_classifier(path: str | Path, device: str = "cpu") -> tuple[TextClassifier, TextTokenizer, list[str]]:
    checkpoint = open_checkpoint(path)
    if not checkpoint.is_classifier:
        raise UserError(
            f"{path} is a language model, not a classifier; train one with `lmforge train-classifier`."
        )
    data = checkpoint.metadata
    mcfg, labels = _classifier_metadata(data, checkpoint.path / "config.json")
    if data.get("body"):
        body = build_model(config_from_dict({"model": data["body"]}).model)
    else:
        body = BiLSTMEncoder(mcfg)
    model = TextClassifier(body, body_width(body), len(labels), mcfg)
    if data.get("hf_classifier"):  # a Hugging Face sequence classifier (BERT, DistilBERT, RoBERTa)
        from lmforge.interop.bert import classifier_tensors
        from lmforge.interop.hf import read_hf_weights

        try:
            tensors = classifier_tensors(read_hf_weights(checkpoint.path), data, body.config)
        except KeyError as e:
            raise UserError(f"{checkpoint.path}: weight {e.args[0]} is missing; the files do not match "
                            f"config.json.") from None  # fmt: skip
        unused = ("body.head_", "body.lm_head.")  # the body's masked-LM head: no part of a classifier
        tensors |= {k: v for k, v in model.state_dict().items() if k.startswith(unused)}
        load_state(tensors, model, str(checkpoint.path))
    else:
        load_weights(checkpoint.path / "model.safetensors", model)
    return model.to(resolve_device(device)).eval(), checkpoint.tokenizer(), labels
