"""The trainer: batches → forward → loss → backward → optimizer step, for any registered model.

It knows nothing of a particular architecture: it needs a model whose
`forward(inputs, targets)` returns `(logits, loss)` and that has a
`block_size`. Everything else (precision, compilation, gradient accumulation,
evaluation, early stopping, checkpoints, exact resume) lives here.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.config import Config, validate
from lmforge.data.batches import IGNORE, ContiguousStreams, RandomWindows, fixed_windows, windows_to_tensors
from lmforge.data.prepare import PreparedData, resolve_data
from lmforge.device import autocast, physical_cores, resolve_device, resolve_dtype, set_threads
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.models import build_model
from lmforge.models.rnn import detach_state
from lmforge.training import checkpoint as ckpt
from lmforge.training.distributed import Distributed, from_environment
from lmforge.training.optim import build_optimizers, lr_at, set_lr

RUN_FILES = ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png",
             ckpt.STATE_DIR, f"{ckpt.STATE_DIR}.old")


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
    peak_memory_bytes: int = 0  # CUDA: peak allocated; CPU: peak resident set of the process


def _load_base(config: Config, log: Callable[[str], None]) -> tuple[nn.Module, str | None]:
    """Fine-tuning: open the starting checkpoint and make the config follow it.

    The model section becomes the checkpoint's (dropout aside), the data is encoded with
    its tokenizer, and instruction data is rendered with its chat template.
    """
    import dataclasses
    import hashlib

    from lmforge.interop.hf import chat_template, is_hf_dir
    from lmforge.io import cache_dir

    source = Path(config.finetune.init_from)
    model, tokenizer, base = ckpt.load_checkpoint(source)
    config.model = dataclasses.replace(base.model, dropout=config.model.dropout)
    if config.model.dropout != base.model.dropout:  # same weights, in a model built with the new dropout
        rebuilt = build_model(config.model)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    tokenizer_file = source / "tokenizer.json"
    if not tokenizer_file.is_file():  # vocab.json + merges.txt: keep a tokenizer.json in the cache
        text = tokenizer.hf.to_str()
        tokenizer_file = cache_dir() / "tokenizers" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        if not tokenizer_file.is_file():
            tokenizer.save(tokenizer_file)
    config.data.tokenizer = str(tokenizer_file.resolve())
    if is_hf_dir(source):
        template = chat_template(source)
    else:
        template = json.loads((source / "config.json").read_text("utf-8")).get("chat_template")
    if template and not config.data.chat_template:
        config.data.chat_template = template
    log(f"Fine-tuning {source} ({base.description or base.name}).")
    return model.float(), template


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    return sum(t.numel() * t.element_size() for opt in optimizers for state in opt.state.values()
               for t in state.values() if torch.is_tensor(t) and t.dim() > 0)


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    holds_run = (out / "config.json").exists() or (out / ckpt.STATE_DIR).exists()
    if resume:
        if not holds_run:
            raise UserError(f"--resume was given but {out} holds no run to resume.")
        return
    if holds_run and not overwrite:
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it or --overwrite "
            f"to replace it (or choose another --out)."
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
    state = out / ckpt.STATE_DIR / "state.json"
    if not state.exists():
        state = out / f"{ckpt.STATE_DIR}.old" / "state.json"
    try:
        saved = json.loads(state.read_text("utf-8"))["config"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{out} has no readable training state to resume; use --overwrite to start again.") from None
    now = config.to_dict()
    for section in ("model", "data"):
        if saved[section] != now[section]:
            diffs = [k for k in now[section] if saved[section].get(k) != now[section][k]]
            raise UserError(
                f"Cannot resume {out}: the {section} settings differ from the saved run "
                f"({', '.join(section + '.' + d for d in diffs)}); use the same settings or --overwrite."
            )


def _rng_state(sampler, device: torch.device, carry) -> dict[str, torch.Tensor]:
    """RNG states, the sampler's position, and a recurrent model's carried hidden state."""
    rng = {"torch": torch.get_rng_state()}
    rng.update({f"sampler.{k}": v for k, v in sampler.state_dict().items()})
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if carry is not None:
        for i, t in enumerate(carry if isinstance(carry, tuple) else (carry,)):
            rng[f"carry.{i}"] = t
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor], sampler, device: torch.device):
    torch.set_rng_state(rng["torch"])
    sampler.load_state_dict({k[len("sampler."):]: v for k, v in rng.items() if k.startswith("sampler.")})
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    carry = [rng[f"carry.{i}"].to(device) for i in range(len(rng)) if f"carry.{i}" in rng]
    if not carry:
        return None
    return tuple(carry) if len(carry) > 1 else carry[0]


@torch.no_grad()
def evaluate_loss(model: nn.Module, tokens, starts, length: int, batch_size: int,
                  device: torch.device, dtype: torch.dtype, mask=None) -> float:
    """Mean next-token loss over fixed windows (every scored token weighs the same)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for i in range(0, len(starts), batch_size):
        x, y = windows_to_tensors(tokens, starts[i:i + batch_size], length, device, mask)
        scored = (y != IGNORE).sum()
        if mask is not None and scored.item() == 0:
            continue
        with autocast(device, dtype):
            _, loss = model(x, y)
        total += loss.float() * scored
        count += scored
    model.train(was_training)
    return total.item() / max(count.item(), 1)


@torch.no_grad()
def evaluate_stream_loss(model: nn.Module, tokens, length: int, batch_size: int,
                         device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss of a recurrent model over the whole split, carrying its state window to window."""
    was_training = model.training
    model.eval()
    streams = ContiguousStreams(tokens, length, min(batch_size, max(1, (len(tokens) - 1) // length)), device)
    total, state = torch.zeros((), device=device), None
    windows = streams.windows_per_pass()
    for _ in range(windows):
        x, y = streams.next_batch()
        with autocast(device, dtype):
            _, loss, state = model(x, y, state=state, return_state=True)
        total += loss.float()
    model.train(was_training)
    return total.item() / windows


def write_loss_plot(history: list[dict[str, Any]], path: Path) -> None:
    """A PNG of training and validation loss against step (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.io import atomic_write

    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", alpha=0.8)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


class _Metrics:
    """metrics.jsonl: one JSON object per logged step, appended and flushed as training goes."""

    def __init__(self, path: Path, keep_until_step: int | None, write: bool = True):
        self.path = path
        self.history: list[dict[str, Any]] = []
        self.file = None
        if not write:  # another process writes the file (distributed training)
            return
        if keep_until_step is not None and path.exists():
            # On resume, drop lines logged after the saved state (they will be logged again).
            for line in path.read_text("utf-8").splitlines():
                record = json.loads(line)
                if record["step"] <= keep_until_step:
                    self.history.append(record)
        from lmforge.io import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))
        self.file = open(path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def train(
    config: Config,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the model described by `config`; returns where it went and how it did.

    `on_step(step, loss)` is called after each optimizer step (tests use it to
    simulate an interruption). Under torchrun, every process calls this (see distributed.py).
    """
    validate(config)
    dist = from_environment(config.train.device)
    try:
        return _train(config, resume, overwrite, log if dist.main else (lambda _: None), on_step, dist)
    finally:
        dist.close()


def _train(config: Config, resume: bool, overwrite: bool, log: Callable[[str], None],
           on_step: Callable[[int, float], None] | None, dist: Distributed) -> TrainResult:
    started = time.perf_counter()
    threads = config.train.threads
    if dist.active and threads == 0:  # the processes of one machine share its cores
        threads = max(1, physical_cores() // dist.local_world_size)
    set_threads(threads)
    device = resolve_device(config.train.device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    dtype = resolve_dtype(config.train.dtype, device)
    out = Path(config.train.out or f"out/{config.name}")
    if dist.main:
        _check_out_dir(out, resume, overwrite)
    dist.barrier()
    ft = config.finetune
    base_model, base_template = _load_base(config, log) if ft.init_from else (None, None)

    if not dist.main:
        dist.barrier()  # rank 0 prepares the data into the cache first; the others then read it
    data = resolve_data(config.data, log=log)
    if dist.main:
        dist.barrier()
    tokenizer = data.tokenizer
    m = config.model
    if m.vocab_size == 0:
        m.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > m.vocab_size:
        raise UserError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {m.vocab_size}; "
            f"set --model.vocab_size {tokenizer.vocab_size} (or 0 to follow the tokenizer)."
        )
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    train_mask, val_mask = data.mask("train"), data.mask("val")  # instruction data: loss on replies only
    window = min(ft.seq_len, m.block_size) if ft.init_from else m.block_size
    _check_lengths(data, len(train_tokens), len(val_tokens), window)
    if resume:
        _check_resume_config(out, config)

    torch.manual_seed(config.train.seed)
    model = base_model if base_model is not None else build_model(m)
    if ft.lora_rank:
        from lmforge.training.lora import apply_lora

        adapted = apply_lora(model, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
        log(f"LoRA rank {ft.lora_rank} (alpha {ft.lora_alpha:g}) on {adapted} layers.")
    model = model.to(device)
    model.train()
    optimizers = build_optimizers(model, config.optim, device, ft.layer_lr_decay)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    if trainable < total_params:
        log(f"Trainable parameters: {trainable:,} of {total_params:,} ({100 * trainable / total_params:.2f}%).")
    tc = config.train
    stateful = getattr(model, "stateful", False)  # recurrent: truncated BPTT over contiguous streams
    if stateful and train_mask is not None:
        raise UserError("Instruction (prompt/response) data needs a Transformer; recurrent models train on "
                        "plain text only.")
    if stateful and (len(train_tokens) - 1) // tc.batch_size < window:
        raise UserError(
            f"The training split has {len(train_tokens)} tokens: too few for {tc.batch_size} streams of at "
            f"least one window ({window} tokens); use a longer text or a smaller batch or block size."
        )
    if stateful:
        if dist.active:  # each rank reads its own slice of the text as its streams
            share = len(train_tokens) // dist.world_size
            train_tokens = train_tokens[dist.rank * share:(dist.rank + 1) * share]
        sampler = ContiguousStreams(train_tokens, window, tc.batch_size, device)
    else:
        sampler = RandomWindows(train_tokens, window, tc.batch_size, tc.seed + dist.rank, device, train_mask)
    carry = None  # a recurrent model's hidden state, carried from window to window
    val_starts = fixed_windows(val_tokens, window, tc.eval_batches * tc.batch_size)

    step, best_val, bad_evals, elapsed_before = 0, math.inf, 0, 0.0
    if resume:
        rng, progress = ckpt.load_train_state(out, model, optimizers)
        saved_world = progress.get("world_size", 1)
        if saved_world != dist.world_size:
            raise UserError(f"{out} was trained with {saved_world} process(es); resume it with the same number "
                            f"(now {dist.world_size}) so that it continues exactly.")
        if dist.active:
            prefix = f"rank{dist.rank}."
            rng = {k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)}
        carry = _set_rng_state(rng, sampler, device)
        step, best_val = progress["step"], progress["best_val_loss"]
        bad_evals, elapsed_before = progress["bad_evals"], progress["elapsed_s"]
        log(f"Resuming {out} at step {step} (best validation loss {best_val:.4f}).")
    else:
        log(f"Training {config.name}: {_describe(model, m, data, device, dtype)}")
        print_config(config, log)
    out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / "metrics.jsonl", keep_until_step=step if resume else None, write=dist.main)

    wrapped = dist.wrap(model, device)  # DistributedDataParallel under torchrun, else the model itself
    compiled = torch.compile(wrapped) if tc.compile else wrapped
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    tokens_per_step = tc.batch_size * tc.grad_accum * window * dist.world_size
    info = {"tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "data": str(data.dir)}
    if ft.init_from:
        from lmforge.data.instructions import DEFAULT_CHAT_TEMPLATE

        info["finetuned_from"] = ft.init_from
        # Chat and serving format prompts the way the replies were trained.
        info["chat_template"] = (config.data.chat_template or DEFAULT_CHAT_TEMPLATE) if train_mask is not None \
            else base_template

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    saved_step = [step]

    def save_state() -> None:
        progress = {"step": step, "best_val_loss": best_val, "bad_evals": bad_evals,
                    "elapsed_s": elapsed(), "config": config.to_dict(), "world_size": dist.world_size}
        rng = _rng_state(sampler, device, carry)
        if dist.active:  # every rank's sampler and RNG state, saved by rank 0
            everyone = dist.gather({k: v.cpu() for k, v in rng.items()})
            rng = {f"rank{r}.{k}": v for r, state in enumerate(everyone) for k, v in state.items()}
        if dist.main:
            ckpt.save_train_state(out, model, optimizers, rng, progress)
        saved_step[0] = step
        dist.barrier()

    def run_eval() -> float:
        nonlocal best_val, bad_evals
        # Every rank scores the same windows with the same weights, so all decide alike.
        scorer = model if dist.active else compiled
        if stateful:
            val = evaluate_stream_loss(scorer, val_tokens, window, tc.batch_size, device, dtype)
        else:
            val = evaluate_loss(scorer, val_tokens, val_starts, window, tc.batch_size, device, dtype, val_mask)
        if val < best_val:
            best_val, bad_evals = val, 0
            if dist.main:
                ckpt.save_checkpoint(out, model, config, tokenizer,
                                     {**info, "step": step, "val_loss": val, "world_size": dist.world_size})
        else:
            bad_evals += 1
        return val

    progress_bar = _progress(tc.progress and dist.main, tc.max_iters, step)
    stopped_because = "max_iters"
    last_val = math.nan
    window_loss = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    model.train()
    try:
        if tc.eval_at_start and step == 0:
            last_val = run_eval()
            metrics.log({"step": 0, "val_loss": last_val, "elapsed_s": round(elapsed(), 3)})
        while step < tc.max_iters:
            lr = lr_at(step, config.optim, tc.max_iters)
            set_lr(optimizers, lr, config.optim)
            for micro in range(tc.grad_accum):
                x, y = sampler.next_batch()
                with dist.no_sync(wrapped, accumulating=micro < tc.grad_accum - 1):
                    with autocast(device, dtype):
                        if stateful:
                            if sampler.wrapped:
                                carry = None  # the streams start over: so does the hidden state
                            _, loss, carry = compiled(x, y, state=carry, return_state=True)
                            carry = detach_state(carry)
                        else:
                            _, loss = compiled(x, y)
                    loss = loss / tc.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                window_loss += loss.detach()
            if scaler:
                for opt in optimizers:
                    scaler.unscale_(opt)
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            for opt in optimizers:
                scaler.step(opt) if scaler else opt.step()
            if scaler:
                scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1

            out_of_time = bool(tc.max_time_s) and dist.any(elapsed() >= tc.max_time_s, device)
            is_eval = step % tc.eval_interval == 0 or step == tc.max_iters or out_of_time
            if step % tc.log_interval == 0 or is_eval:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "train_loss": round(dist.mean(window_loss).item() / window_steps, 5),  # one sync per log
                    "lr": lr,
                    "tokens_per_s": round(window_steps * tokens_per_step / (now - window_start), 1),
                    "elapsed_s": None,
                }
                if is_eval:
                    last_val = run_eval()
                    record["val_loss"] = round(last_val, 5)
                    record["val_ppl"] = round(math.exp(min(last_val, 50.0)), 4)
                record["elapsed_s"] = round(elapsed(), 3)
                metrics.log(record)
                progress_bar.set_postfix_str(_postfix(record, last_val))
                if is_eval and dist.main:
                    progress_bar.write(_eval_line(record))
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
                if is_eval:
                    if tc.target_loss and last_val <= tc.target_loss:
                        stopped_because = f"reached target loss {tc.target_loss}"
                        break
                    if tc.patience and bad_evals >= tc.patience:
                        stopped_because = f"no improvement in {tc.patience} evaluations"
                        break
                    if out_of_time:
                        stopped_because = f"time limit of {tc.max_time_s:g}s"
                        break
                    save_state()
            progress_bar.update(1)
            if on_step:
                on_step(step, loss.item() * tc.grad_accum)
    except KeyboardInterrupt:
        progress_bar.close()
        logged = metrics.history[-1]["step"] if metrics.history else 0
        if window_steps and step % tc.log_interval == 0 and logged != step:
            # Interrupted between the step and its log line: log what the step measured.
            metrics.log({"step": step, "train_loss": round(window_loss.item() / window_steps, 5),
                         "lr": lr_at(step - 1, config.optim, tc.max_iters), "elapsed_s": round(elapsed(), 3)})
        if not dist.active:  # (several processes cannot agree on a save here: the last evaluation's stands)
            save_state()
        metrics.close()
        if dist.main:
            write_loss_plot(metrics.history, out / "loss.png")
        raise TrainingInterrupted(out, step if not dist.active else saved_step[0]) from None
    progress_bar.close()
    save_state()
    full_val = math.nan
    if tc.final_full_eval and metrics.history and len(val_tokens) <= 5_000_000 and val_mask is None and dist.main:
        # The whole validation split, scored exactly as `lmforge eval DIR` scores it.
        from lmforge.evaluation.perplexity import evaluate_ids

        full_val = evaluate_ids(model.eval(), tokenizer, val_tokens.tolist(),
                                context=None if stateful else window, batch_size=32, device=device).loss
        model.train()
        metrics.history[-1]["val_loss_full"] = round(full_val, 5)
        metrics.close()
        from lmforge.io import atomic_write_text

        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics.history))
        log(f"Validation loss on the whole validation split (last weights): {full_val:.4f}")
    metrics.close()
    if dist.main:
        write_loss_plot(metrics.history, out / "loss.png")
    if stopped_because != "max_iters":
        log(f"Stopped at step {step}: {stopped_because}.")

    sample = ""
    if tc.sample_tokens > 0 and dist.main:
        from lmforge.generation import sample_text

        best, _, _ = ckpt.load_checkpoint(out, device)
        sample = sample_text(best, tokenizer, "", tc.sample_tokens, seed=tc.seed)
    total_steps_time = [r["tokens_per_s"] for r in metrics.history if "tokens_per_s" in r]
    result = TrainResult(
        out=out, step=step, best_val_loss=best_val, final_val_loss=last_val, elapsed_s=elapsed(),
        tokens_per_s=sum(total_steps_time) / max(1, len(total_steps_time)),
        history=metrics.history, sample=sample, stopped_because=stopped_because, full_val_loss=full_val,
        trainable_params=trainable, optimizer_state_bytes=optimizer_state_bytes(optimizers),
        peak_memory_bytes=_peak_memory(device),
    )
    dist.barrier()  # nobody leaves (and ends the process group) while rank 0 still writes
    return result


def _check_lengths(data: PreparedData, n_train: int, n_val: int, block_size: int) -> None:
    need = block_size + 2
    for split, n in (("training", n_train), ("validation", n_val)):
        if n < need:
            raise UserError(
                f"The {split} split of {data.meta['sources'][0]['path'] if data.meta['sources'] else data.dir} "
                f"has {n} tokens, fewer than one training window ({need} tokens for context "
                f"{block_size}); use a longer text or a smaller --model.block_size."
            )


def _describe(model: nn.Module, m, data: PreparedData, device, dtype) -> str:
    n = sum(p.numel() for p in model.parameters())
    return (f"{m.arch} {n / 1e6:.2f}M parameters, vocab {m.vocab_size} ({data.tokenizer.kind}), "
            f"{data.meta['train_tokens']:,} training tokens, device {device}, {str(dtype).removeprefix('torch.')}")


def print_config(config: Config, log: Callable[[str], None]) -> None:
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            log(f"  [{section}] " + " ".join(f"{k}={v}" for k, v in values.items()))


def _postfix(record: dict[str, Any], val: float) -> str:
    text = f"loss {record['train_loss']:.3f}"
    if not math.isnan(val):
        text += f" val {val:.3f}"
    return text + f" {record['tokens_per_s'] / 1000:.1f}k tok/s"


def _eval_line(record: dict[str, Any]) -> str:
    return (f"step {record['step']:>6} | train {record['train_loss']:.4f} | val {record['val_loss']:.4f} "
            f"| ppl {record['val_ppl']:.2f} | {record['elapsed_s']:.1f}s")


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, unit="step", leave=False)
