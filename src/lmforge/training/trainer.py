"""Training a language model: set up, run the shared loop, finish.

    train(config)
      ├─ setup:   threads, device, output folder; data (prepared on the fly); model (new,
      │           or the fine-tuning base, with LoRA); optimizers; the batch source;
      │           the saved state when resuming
      ├─ loop:    lmforge.training.loop.run_loop (steps, evaluation, early stop, signals)
      └─ finish:  whole-split validation loss, loss.png, a sample from the best weights

It knows nothing of a particular architecture: it asks the model's family
(`lmforge.families.family_of`) for the data, the batch source and the report at the end, and
needs a model whose `forward(inputs, targets)` returns `(logits, loss)` (recurrent models also
take and return a carried state; their batch source handles that) and that has a `block_size`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.checkpoint import Checkpoint, open_checkpoint, save_checkpoint
from lmforge.config import Config, config_from_dict, validate
from lmforge.data.prepare import PreparedData
from lmforge.device import physical_cores, resolve_device, resolve_dtype, set_threads
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.families import Family, family_of
from lmforge.io import check_output, remove_stale_temporaries
from lmforge.models import build_model
from lmforge.training import privacy as private
from lmforge.training import state as saved_state
from lmforge.training.distributed import Distributed, from_environment
from lmforge.training.loop import Progress, Schedule, Trainee, run_loop
from lmforge.training.metrics import MetricsLog, Reporter, write_loss_plot
from lmforge.training.optim import BudgetHorizon, build_optimizers, lr_at, set_lr
from lmforge.training.privacy import Privacy
from lmforge.training.sources import BatchSource

STATE_DIR = saved_state.STATE_DIR
RUN_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "metrics.jsonl",
    "loss.png",
    "adapter.safetensors",
    "metrics.csv",
    "tensorboard",
    STATE_DIR,
    f"{STATE_DIR}.old",
)


@dataclass
class TrainResult:
    out: Path
    step: int
    best_val_loss: float
    final_val_loss: float
    elapsed_s: float
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    sample: str = ""
    stopped_because: str = "max_iters"
    full_val_loss: float = math.nan  # last weights on the whole validation split
    trainable_params: int = 0
    optimizer_state_bytes: int = 0  # optimizer moments (what LoRA saves most of)
    privacy: dict[str, Any] = field(default_factory=dict)  # DP-SGD: ε, δ, noise (empty: not private)
    peak_memory_bytes: int = 0  # CUDA: peak allocated; CPU: peak resident set of the process


@dataclass
class _Run:
    """Everything setup makes, for the loop and for finish."""

    config: Config
    out: Path
    device: torch.device
    dtype: torch.dtype
    dist: Distributed
    log: Callable[[str], None]
    data: PreparedData | None = None
    model: nn.Module | None = None
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    source: BatchSource | None = None
    window: int = 0
    progress: Progress = field(default_factory=Progress)
    info: dict[str, Any] = field(default_factory=dict)  # extra fields of the checkpoint's config.json
    saved_step: int = 0  # the step of the last saved training state
    privacy: Privacy | None = None  # DP-SGD settings and accountant (None: ordinary training)

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def family(self) -> Family:
        return family_of(self.config.model.arch)


def train(
    config: Config,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the model described by `config`; returns where it went and how it did.

    `on_step(step, loss)` is called after each optimizer step (tests use it to
    simulate an interruption), `on_eval(step, scores)` after each evaluation. Under torchrun, every process calls this (see distributed.py).
    """
    validate(config)
    dist = from_environment(config.train.device, config.train.strategy)
    try:
        run = _setup(config, resume, overwrite, log if dist.main else (lambda _: None), dist)
        tc = config.train
        metrics = MetricsLog(run.out / "metrics.jsonl", keep_until_step=run.progress.step if resume else None,
                             write=dist.main, loggers=tc.loggers)  # fmt: skip
        if metrics.cut:
            run.log(f"Note: the last line of {run.out / 'metrics.jsonl'} was cut short ({metrics.cut[:40]!r}...), "
                    f"by an interruption while it was written; that record is lost, the others are kept.")  # fmt: skip
        try:
            progress = run_loop(
                _trainee(run),
                _schedule(run),
                run.progress,
                metrics,
                Reporter(tc.progress and dist.main, tc.max_iters, run.progress.step),
                on_step,
                on_eval,
            )
        except TrainingInterrupted as stopped:
            metrics.close()
            if dist.main:
                write_loss_plot(metrics.history, run.out / "loss.png")
            # Several processes cannot agree on a save at a signal: the last evaluation's state stands.
            step = stopped.step if not dist.active else run.saved_step
            resumable = stopped.resumable or (run.out / STATE_DIR / "state.json").exists()
            raise TrainingInterrupted(run.out, step, resumable, stopped.mid_step) from None
        finally:
            metrics.close()
        return _finish(run, progress, metrics)
    finally:
        dist.close()


# ---- setup ----------------------------------------------------------------------------------


def _setup(
    config: Config, resume: bool, overwrite: bool, log: Callable[[str], None], dist: Distributed
) -> _Run:
    threads = config.train.threads
    if dist.active and threads == 0:  # the processes of one machine share its cores
        threads = max(1, physical_cores() // dist.local_world_size)
    set_threads(threads)
    device = resolve_device(config.train.device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    run = _Run(
        config,
        Path(config.train.out or f"out/{config.name}"),
        device,
        resolve_dtype(config.train.dtype, device),
        dist,
        log,
    )
    if dist.main:
        _check_out_dir(run.out, resume, overwrite)
        remove_stale_temporaries(run.out)  # what a kill during a save left behind (this run owns the folder)
    dist.barrier()
    base = _load_base(config, log) if config.finetune.init_from else None
    _prepare_data(run)
    if base:
        from lmforge.data.instructions import DEFAULT_CHAT_TEMPLATE

        run.info["finetuned_from"] = config.finetune.init_from
        # Chat and serving format prompts the way the replies were trained.
        instructions = run.data.mask("train") is not None
        run.info["chat_template"] = (
            (config.data.chat_template or DEFAULT_CHAT_TEMPLATE) if instructions else base[1].chat_template
        )
        # Generation ends where the base's ends (SmolLM2's <|im_end|>), as it recommends.
        defaults = base[1].generation
        run.info |= {"eos_token_ids": list(defaults.eos_token_ids), "bos_token_id": defaults.bos_token_id,
                     "sampling_defaults": defaults.sampling}  # fmt: skip
    if resume:
        _check_resume_config(run.out, config)
    torch.manual_seed(config.train.seed)
    _build_model(run, base)
    run.source = run.family.batch_source(run)
    if private.enabled(config.privacy):
        run.privacy = _plan_privacy(run)
    if resume:
        _restore(run)
    else:
        log(f"Training {config.name}: {_describe(run)}")
        print_config(config, log)
    run.out.mkdir(parents=True, exist_ok=True)
    return run


def _prepare_data(run: _Run) -> None:
    """Tokenized splits (rank 0 prepares them into the cache first), checked against the model."""
    config, dist = run.config, run.dist
    if not dist.main:
        dist.barrier()
    run.data = run.family.prepare_data(run)
    if dist.main:
        dist.barrier()
    m, tokenizer = config.model, run.data.tokenizer
    if m.vocab_size == 0:
        m.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > m.vocab_size:
        raise UserError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {m.vocab_size}; "
            f"set model.vocab_size to {tokenizer.vocab_size} (or 0 to follow the tokenizer).",
            settings=("model.vocab_size",),
        )
    ft = config.finetune
    run.window = min(ft.seq_len, m.block_size) if ft.init_from else m.block_size
    if run.family.data_kind != "text":
        return
    _check_lengths(run.data, len(run.data.tokens("train")), len(run.data.tokens("val")), run.window)


def _build_model(run: _Run, base: tuple[nn.Module, Checkpoint] | None) -> None:
    config, ft = run.config, run.config.finetune
    model = base[0] if base else build_model(config.model)
    if config.train.init_embeddings:
        from lmforge.embeddings import describe_coverage, init_embedding

        if base:
            raise UserError("train.init_embeddings starts a new model's embedding; a fine-tuned model keeps "
                            "its own.", settings=("train.init_embeddings",))  # fmt: skip
        run.log(describe_coverage(init_embedding(model.wte, run.tokenizer, config.train.init_embeddings)))
    if ft.lora_rank:
        from lmforge.adapters.lora import apply_lora

        adapted = apply_lora(model, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
        run.log(f"LoRA rank {ft.lora_rank} (alpha {ft.lora_alpha:g}) on {adapted} layers.")
    if private.enabled(config.privacy):
        private.prepare_model(model)  # Opacus' recurrent layers, same weights
    run.model = model.to(run.device)
    run.model.train()
    if run.dist.sharded:
        if ft.lora_rank or private.enabled(config.privacy):
            raise UserError("train.strategy fsdp does not combine with LoRA or private training; use ddp.",
                            settings=("train.strategy",))  # fmt: skip
        run.dist.shard(run.model)  # before the optimizer: it must hold the sharded parameters
        here = sum(p.to_local().numel() for p in run.model.parameters())
        run.log(f"FSDP: parameters split over {run.dist.world_size} processes "
                f"({here:,} of {sum(p.numel() for p in run.model.parameters()):,} values in each).")  # fmt: skip
    run.optimizers = build_optimizers(run.model, config.optim, run.device, ft.layer_lr_decay, run.dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable < total:
        run.log(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%).")


def _plan_privacy(run: _Run) -> Privacy:
    """DP-SGD: each training window is one example of the guarantee."""
    tc = run.config.train
    if not run.family.private:
        raise UserError(f"Differentially private training of {run.family.summary} is not supported; "
                        "leave the privacy settings out.", settings=("privacy.target_epsilon",))  # fmt: skip
    private.check_supported(run.optimizers, tc.grad_accum, run.dist.active, tc.compile)
    examples = len(run.data.tokens("train")) // run.window
    plan = private.plan(run.config.privacy, examples, tc.batch_size, tc.max_iters)
    run.log(plan.describe(tc.max_iters) + f" (an example is a window of {run.window} tokens; "
            f"{examples:,} of them)")  # fmt: skip
    return plan


def _load_base(config: Config, log: Callable[[str], None]) -> tuple[nn.Module, Checkpoint]:
    """Fine-tuning: open the starting checkpoint and make the config follow it.

    The model section becomes the checkpoint's (dropout aside), the data is encoded with
    its tokenizer, and instruction data is rendered with its chat template.
    """
    import hashlib

    from lmforge.io import cache_dir
    from lmforge.tokenizers import SOURCE_TOKENIZER

    # A folder, a .gguf file or a hub id, of a family that can be fine-tuned.
    base = open_checkpoint(config.finetune.init_from).require(
        "finetune", instead="`lmforge train` from scratch"
    )
    source = base.path
    model, tokenizer = base.load()
    config.model = dataclasses.replace(base.config.model, dropout=config.model.dropout)
    if (
        config.model.dropout != base.config.model.dropout
    ):  # same weights, in a model built with the new dropout
        rebuilt = build_model(config.model)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    tokenizer_file = source / "tokenizer.json"
    if (
        not tokenizer_file.is_file()
    ):  # vocab.json + merges.txt, SentencePiece files: a tokenizer.json in the cache
        text = tokenizer.hf.to_str() + (tokenizer.source.hf.to_str() if tokenizer.source else "")
        folder = cache_dir() / "tokenizers" / hashlib.sha256(text.encode()).hexdigest()[:16]
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():  # (the sources' own tokenizer first: a tokenizer.json completes it)
            folder.mkdir(parents=True, exist_ok=True)
            if tokenizer.source is not None:
                tokenizer.source.save(folder / SOURCE_TOKENIZER)
            tokenizer.save(tokenizer_file)
    config.data.tokenizer = str(tokenizer_file.resolve())
    if base.chat_template and not config.data.chat_template:
        config.data.chat_template = base.chat_template
    log(f"Fine-tuning {source} ({base.config.description or base.config.name}).")
    return model.float(), base


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    check_output(out, "folder", "train.out")
    holds_run = (out / "config.json").exists() or (out / STATE_DIR).exists()
    if resume:
        if not holds_run:
            raise UserError(
                f"There is no run to resume in {out}; start one without resume.", settings=("resume",)
            )
        return
    if holds_run and not overwrite:
        raise UserError(
            f"{out} already holds a training run; resume it, overwrite it, or choose another output folder "
            f"(train.out).",
            settings=("resume", "overwrite", "train.out"),
        )
    if holds_run:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _check_resume_config(out: Path, config: Config) -> None:
    """A resumed run must train the same model on the same data as the run it continues."""
    state = out / STATE_DIR / "state.json"
    if not state.exists():
        state = out / f"{STATE_DIR}.old" / "state.json"
    try:
        saved = json.loads(state.read_text("utf-8"))["config"]
    except (OSError, ValueError, KeyError):
        raise UserError(
            f"{out} has no readable training state to resume; overwrite it to start again."
        ) from None
    now = config.to_dict()
    saved = config_from_dict(saved).to_dict()  # (a version-1 state holds every field: compare what applies)
    for section in ("model", "data"):
        if saved[section] != now[section]:
            diffs = [k for k in now[section] if saved[section].get(k) != now[section][k]]
            raise UserError(
                f"Cannot resume {out}: the {section} settings differ from the saved run "
                f"({', '.join(section + '.' + d for d in diffs)}); use the same settings or overwrite the run."
            )


def _check_lengths(data: PreparedData, n_train: int, n_val: int, block_size: int) -> None:
    need = block_size + 2
    for split, n in (("training", n_train), ("validation", n_val)):
        if n < need:
            raise UserError(
                f"The {split} split of {data.meta['sources'][0]['path'] if data.meta['sources'] else data.dir} "
                f"has {n} tokens, fewer than one training window ({need} tokens for context "
                f"{block_size}); use a longer text or a smaller model.block_size.",
                settings=("model.block_size",),
            )


# ---- the loop's parts ------------------------------------------------------------------------


def _schedule(run: _Run) -> Schedule:
    tc, o = run.config.train, run.config.optim
    return Schedule(
        max_steps=tc.max_iters,
        eval_interval=tc.eval_interval,
        log_interval=tc.log_interval,
        grad_accum=tc.grad_accum,
        grad_clip=0.0 if run.privacy else o.grad_clip,  # DP-SGD clips each example's gradient instead
        patience=tc.patience,
        target=tc.target_loss,
        max_time_s=tc.max_time_s,
        eval_at_start=tc.eval_at_start,
        tokens_per_step=tc.batch_size * tc.grad_accum * run.window * run.dist.world_size,
    )


def _trainee(run: _Run) -> Trainee:
    config, dist = run.config, run.dist
    wrapped = dist.wrap(
        run.model, run.device
    )  # DistributedDataParallel under torchrun, else the model itself
    compiled = torch.compile(wrapped) if config.train.compile else wrapped
    optimizers = run.optimizers
    if run.privacy:  # per-example gradients, clipped and noised by the optimizer
        compiled, dp_optimizer = private.make_private(run.model, run.optimizers[0], run.privacy)
        optimizers = [dp_optimizer]

    # Under a time budget (train.max_time_s) the schedule ends when the budget does, so that the
    # learning rate has decayed by the time training stops, on a fast machine or a slow one. Under
    # torchrun every rank must use the same rate, so there the schedule stays max_iters long.
    budget = 0.0 if dist.active else config.train.max_time_s
    horizon = BudgetHorizon(budget, config.train.max_iters)

    def set_step_lr(step: int) -> float:
        lr = lr_at(step, config.optim, horizon(step, run.progress.elapsed()))
        set_lr(run.optimizers, lr, config.optim)
        return lr

    def save_best(progress: Progress) -> None:
        info = {
            **run.info,
            "step": progress.step,
            "val_loss": progress.best,
            "world_size": dist.world_size,
            "tokenizer": run.tokenizer.kind,
            "vocab_size": run.tokenizer.vocab_size,
            "data": str(run.data.dir),
        }
        if run.privacy:
            info["privacy"] = run.privacy.info(progress.step)
        whole = dist.full_state(run.model)  # fsdp: gathered from every rank (all call this)
        if dist.main:
            save_checkpoint(run.out, run.model, config, run.tokenizer, info, whole[0] if whole else None)

    return Trainee(
        model=run.model,
        forward=compiled,
        optimizers=optimizers,
        source=run.source,
        set_lr=set_step_lr,
        save_best=save_best,
        save_state=lambda p: _save_state(run, p),
        device=run.device,
        dtype=run.dtype,
        dist=dist,
        ddp=wrapped,
        # Every rank scores the same windows with the same weights, so all decide alike.
        evaluator=run.model if dist.active or run.privacy else compiled,
        report=(lambda p: {"epsilon": run.privacy.epsilon(p.step)}) if run.privacy else None,
    )


def _save_state(run: _Run, progress: Progress) -> None:
    rng = saved_state.rng_state(run.source, run.device)
    if run.dist.active:  # every rank's source and RNG state, saved by rank 0
        everyone = run.dist.gather({k: v.cpu() for k, v in rng.items()})
        rng = {f"rank{r}.{k}": v for r, state in enumerate(everyone) for k, v in state.items()}
    whole = run.dist.full_state(run.model, run.optimizers)  # fsdp: gathered from every rank
    if run.dist.main:
        state = {**progress.to_dict(), "config": run.config.to_dict(), "world_size": run.dist.world_size}
        saved_state.save_train_state(run.out, run.model, run.optimizers, rng, state, whole)
    run.saved_step = progress.step
    run.dist.barrier()


def _restore(run: _Run) -> None:
    load_whole = run.dist.load_full_state if run.dist.sharded else None
    rng, saved = saved_state.load_train_state(run.out, run.model, run.optimizers, load_whole)
    dist = run.dist
    saved_world = saved.get("world_size", 1)
    if saved_world != dist.world_size:
        raise UserError(
            f"{run.out} was trained with {saved_world} process(es); resume it with the same number "
            f"(now {dist.world_size}) so that it continues exactly."
        )
    if dist.active:
        prefix = f"rank{dist.rank}."
        rng = {k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}
    saved_state.set_rng_state(rng, run.source, run.device)
    run.progress = Progress.from_dict(saved)
    run.saved_step = run.progress.step
    run.log(f"Resuming {run.out} at step {run.progress.step} (best validation loss {run.progress.best:.4f}).")


# ---- finish ---------------------------------------------------------------------------------


def _finish(run: _Run, progress: Progress, metrics: MetricsLog) -> TrainResult:
    dist, tc = run.dist, run.config.train
    full_val = math.nan
    language_model = run.family.language_model  # (perplexity and samples apply)
    val_tokens = run.data.tokens("val") if language_model else []
    if (
        language_model
        and tc.final_full_eval
        and metrics.history
        and len(val_tokens) <= 5_000_000
        and run.data.mask("val") is None
        and (dist.main or dist.sharded)  # (a sharded model runs only with every rank)
    ):
        # The whole validation split, scored exactly as `lmforge eval DIR` scores it.
        from lmforge.evaluation.perplexity import evaluate_ids

        full_val = evaluate_ids(
            run.model.eval(),
            run.tokenizer,
            val_tokens.tolist(),
            context=None if run.family.carries_state else run.window,
            batch_size=32,
            device=run.device,
        ).loss
        run.model.train()
        metrics.update_last({"val_loss_full": round(full_val, 5)})
        run.log(f"Validation loss on the whole validation split (last weights): {full_val:.4f}")
    if dist.main:
        write_loss_plot(metrics.history, run.out / "loss.png")
    if progress.stopped_because != "max_iters":
        run.log(f"Stopped at step {progress.step}: {progress.stopped_because}.")
    sample = ""
    if run.family.after_training and dist.main:
        sample = run.family.after_training(run, metrics)
    elif tc.sample_tokens > 0 and dist.main and language_model:
        from lmforge.checkpoint import load_checkpoint
        from lmforge.inference.generation import sample_text

        best, _, _ = load_checkpoint(run.out, run.device)
        sample = sample_text(best, run.tokenizer, "", tc.sample_tokens, seed=tc.seed)
    speeds = [r["tokens_per_s"] for r in metrics.history if "tokens_per_s" in r]
    result = TrainResult(
        out=run.out,
        step=progress.step,
        best_val_loss=progress.best,
        final_val_loss=progress.scores.get("val_loss", math.nan),
        elapsed_s=progress.elapsed(),
        tokens_per_s=sum(speeds) / max(1, len(speeds)),
        history=metrics.history,
        sample=sample,
        stopped_because=progress.stopped_because,
        full_val_loss=full_val,
        trainable_params=sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        optimizer_state_bytes=optimizer_state_bytes(run.optimizers),
        peak_memory_bytes=peak_memory(run.device),
        privacy=run.privacy.info(progress.step) if run.privacy else {},
    )
    dist.barrier()  # nobody leaves (and ends the process group) while rank 0 still writes
    return result


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    return sum(
        t.numel() * t.element_size()
        for opt in optimizers
        for state in opt.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


def _describe(run: _Run) -> str:
    m, data = run.config.model, run.data
    n = sum(p.numel() for p in run.model.parameters())
    return (
        f"{m.arch} {n / 1e6:.2f}M parameters, vocab {m.vocab_size} ({data.tokenizer.kind}), "
        f"{data.meta['train_tokens']:,} training tokens, device {run.device}, "
        f"{str(run.dtype).removeprefix('torch.')}"
    )


def print_config(config: Config, log: Callable[[str], None]) -> None:
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            log(f"  [{section}] " + " ".join(f"{k}={v}" for k, v in values.items()))
