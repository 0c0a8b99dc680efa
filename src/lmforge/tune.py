"""Hyper-parameter search with Optuna.

    space.toml ─▶ settings sampled by TPE ─▶ preset + overrides + sample ─▶ train()
                                               each evaluation ─▶ trial.report(val_loss)
                                               worse than the median trial so far ─▶ pruned
    OUT/study.db     the study (SQLite): run the same command again to continue it, or run it
                     in several terminals / with --workers N to share it between processes
    OUT/best.toml    the best trial's full config, a preset: lmforge train --preset OUT/best.toml
    OUT/search.png   every trial's validation loss and the best so far
    OUT/trials/NNN   each trial's run folder (checkpoint, metrics.jsonl)

A search space names config fields (as `--section.field` spells them) and how to sample them:

    [optim.lr]                         [model.n_layer]          [model.activation]
    low = 1e-4                         low = 2                  choices = ["gelu", "relu2"]
    high = 1e-2                        high = 6
    log = true                         step = 2

Early stopping (train.patience, train.target_loss) still ends a trial; its best validation
loss is the trial's value, and pruning compares trials at the same evaluation steps.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from lmforge.config import Config, apply_overrides, field_types, validate
from lmforge.errors import TrainingInterrupted, UserError, require

SPEC_KEYS = {"low", "high", "log", "step", "choices"}


@dataclass
class Param:
    key: str  # "optim.lr"
    kind: type
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind is int:  # (whole numbers within the bounds: _param checked that there are some)
            return trial.suggest_int(self.key, math.ceil(self.low), math.floor(self.high),
                                     step=int(self.step or 1), log=self.log)  # fmt: skip
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def read_space(path: str | Path) -> list[Param]:
    """The search space of a TOML file: one table per config field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The search space {path} does not exist; write one (see `lmforge tune --help`).")
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"The search space {path} is not valid TOML: {e}.") from None
    specs: dict[str, dict] = {}

    def collect(table: dict, prefix: str) -> None:
        for name, value in table.items():
            key = prefix + name
            if isinstance(value, dict) and value and set(value) <= SPEC_KEYS:
                specs[key] = value
            elif isinstance(value, dict):
                collect(value, key + ".")
            else:
                raise UserError(f"{path}: {key} must be a table with low/high[/log/step] or choices.")

    collect(data, "")
    if not specs:
        raise UserError(f"{path} names no setting to search; add tables such as [optim.lr] low/high.")
    types = field_types()
    params = []
    for key, spec in specs.items():
        if key not in types:
            raise UserError(
                f"{path}: unknown setting {key!r}; use the config's keys (lmforge presets --show NAME)."
            )
        params.append(_param(path, key, types[key], spec))
    return params


def _param(path: Path, key: str, kind: type, spec: dict) -> Param:
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{path}: {key}.choices must be a non-empty list.")
        return Param(key, kind, choices=choices)
    if kind not in (int, float):
        raise UserError(f"{path}: {key} is a {kind.__name__} setting; give it choices = [...].")
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        raise UserError(f"{path}: {key} needs numbers low < high (or choices).")
    if spec.get("log") and low <= 0:
        raise UserError(f"{path}: {key} is searched on a log scale, so low must be above 0.")
    if kind is int and math.ceil(low) > math.floor(high):
        raise UserError(
            f"{path}: {key} is a whole number, and none lies between {low} and {high}; widen the bounds."
        )
    if kind is int and spec.get("step") is not None and spec["step"] != int(spec["step"]):
        raise UserError(f"{path}: {key} is a whole number, so its step must be one too, not {spec['step']}.")
    return Param(key, kind, low, high, bool(spec.get("log", False)), spec.get("step"))


@dataclass
class TuneSettings:
    out: str = "out/tune"
    trials: int = 20  # trials in the study, over every run and worker
    workers: int = 1  # processes sharing the study on this machine
    seed: int = 1337
    timeout_s: float = 0.0  # stop starting trials after this long (0 = no limit)
    pruning: bool = True
    startup_trials: int = 5  # trials that are never pruned (the median needs some history)


def _storage(out: Path):
    import warnings

    import optuna

    # Heartbeats let a later run see that a trial's process died (Ctrl-C, kill) and retry it once.
    # (Optuna marks heartbeats experimental and renamed the retry callback in 4.9: accept both.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            retry = {
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                )
            }
        else:
            retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
        return optuna.storages.RDBStorage(
            f"sqlite:///{out.resolve() / 'study.db'}", heartbeat_interval=15, grace_period=45, **retry
        )


def _study(out: Path, settings: TuneSettings, worker: int):
    import optuna

    # lmforge prints one line per trial itself (and Optuna would warn about each surplus trial)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials, n_warmup_steps=0)
        if settings.pruning
        else optuna.pruners.NopPruner()
    )
    try:
        return optuna.create_study(
            study_name="lmforge",
            storage=_storage(out),
            load_if_exists=True,
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=settings.seed + worker),
            pruner=pruner,
        )
    except Exception as e:  # sqlalchemy's errors: not a database, a damaged one, another program's tables
        if not (out / "study.db").exists():
            raise
        raise UserError(f"{out / 'study.db'} is not a readable study ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"move it away to start a new study, or choose another --out.") from None  # fmt: skip


class _Surplus(Exception):
    """A trial started by one worker while the others had already started the last ones needed."""


def _is_surplus(trial, wanted: int) -> bool:
    """Whether `wanted` trials numbered before this one are finished or running. Trial numbers are handed
    out by the shared storage, so the earliest trials win and workers never run more than --trials."""
    import optuna

    states = (*_counted(), optuna.trial.TrialState.RUNNING)
    earlier = trial.study.get_trials(deepcopy=False, states=states)
    return sum(t.number < trial.number for t in earlier) >= wanted


def _objective(base: Config, params: list[Param], settings: TuneSettings, log: Callable[[str], None]):
    import optuna

    from lmforge.training.trainer import train

    out = Path(settings.out)

    def objective(trial: optuna.Trial) -> float:
        if _is_surplus(trial, settings.trials):
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise _Surplus
        sample = {p.key: p.suggest(trial) for p in params}
        config = apply_overrides(base, sample)
        config.train.out = str(out / "trials" / f"{trial.number:03d}")
        config.train.progress, config.train.sample_tokens = False, 0
        try:
            validate(config)
        except UserError as e:  # a combination the model cannot take (e.g. n_embd not divisible by n_head)
            trial.set_user_attr("invalid", str(e))
            raise optuna.TrialPruned(str(e)) from None

        def report(step: int, scores: dict[str, float]) -> None:
            trial.report(scores["val_loss"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {scores['val_loss']:.4f} at step {step}")

        shown = ", ".join(f"{k}={_short(v)}" for k, v in sample.items())
        log(f"trial {trial.number}: {shown}")
        try:
            result = train(config, overwrite=True, log=lambda _: None, on_eval=report)
        except optuna.TrialPruned as pruned:
            log(f"trial {trial.number}: pruned ({pruned})")
            raise
        except UserError as e:  # these settings cannot train (diverged, a window longer than the text, ...)
            trial.set_user_attr("invalid", str(e))
            log(f"trial {trial.number}: given up ({e})")
            raise optuna.TrialPruned(str(e)) from None
        trial.set_user_attr("step", result.step)
        trial.set_user_attr("elapsed_s", round(result.elapsed_s, 2))
        trial.set_user_attr("stopped_because", result.stopped_because)
        log(f"trial {trial.number}: best validation loss {result.best_val_loss:.4f} in {result.step} steps "
            f"({result.elapsed_s:.0f}s)")  # fmt: skip
        return result.best_val_loss

    return objective


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _counted() -> tuple:
    """The trial states that count towards --trials: a trial that failed (Ctrl-C, a crash) does not,
    so running the command again makes up for it."""
    import optuna

    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _finished(study) -> int:
    return len(study.get_trials(deepcopy=False, states=_counted()))


def run_worker(base: Config, params: list[Param], settings: TuneSettings, worker: int = 0,
               log: Callable[[str], None] = print) -> None:  # fmt: skip
    """Run trials of the shared study until it holds `settings.trials` finished ones."""
    import optuna

    out = Path(settings.out)
    study = _study(out, settings, worker)
    remaining = settings.trials - _finished(study)
    if remaining <= 0:
        return
    study.optimize(
        _objective(base, params, settings, log),
        n_trials=remaining,
        timeout=settings.timeout_s or None,
        # (running trials count too, so that workers together never start more than --trials)
        callbacks=[
            optuna.study.MaxTrialsCallback(
                settings.trials, states=(*_counted(), optuna.trial.TrialState.RUNNING)
            )
        ],
        catch=(_Surplus,),  # marked failed, so it neither counts nor shows in trials.json
    )


def _worker_main(base: Config, params: list[Param], settings: TuneSettings, worker: int) -> None:
    from lmforge.device import set_threads

    set_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    prefix = f"[worker {worker}] "
    run_worker(base, params, settings, worker, log=lambda m: print(prefix + m, flush=True))


def tune(base: Config, space: str | Path, settings: TuneSettings, log: Callable[[str], None] = print) -> dict:
    """Search `space` around the `base` config; returns the best trial and writes best.toml, search.png."""
    import multiprocessing

    require("optuna", "tune", "Hyper-parameter search")
    params = read_space(space)
    for key in ("trials", "workers"):
        if getattr(settings, key) < 1:
            raise UserError(f"--{key} must be at least 1.")
    validate(base)
    from lmforge.data.prepare import resolve_data

    # The data once, before any trial: its problems are the user's to fix, not a trial's to be pruned
    # for, and every trial (and worker) then finds it prepared in the cache.
    resolve_data(base.data, log=lambda _: None)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    study = _study(out, settings, 0)
    done = _finished(study)
    if done:
        log(f"Continuing the study in {out / 'study.db'}: {done} of {settings.trials} trials done.")
    else:
        log(f"Searching {', '.join(p.key for p in params)} in {settings.trials} trials "
            f"({settings.workers} worker(s)); the study is kept in {out / 'study.db'}.")  # fmt: skip
    extra = []
    try:
        if settings.workers > 1:  # more processes on the same study (each also could be started by hand)
            context = multiprocessing.get_context("spawn")
            extra = [context.Process(target=_worker_main, args=(base, params, settings, w))
                     for w in range(1, settings.workers)]  # fmt: skip
            for process in extra:
                process.start()
            _worker_main(base, params, settings, 0)
        else:
            run_worker(base, params, settings, 0, log)
    except (KeyboardInterrupt, TrainingInterrupted):
        log(f"Search interrupted after {_finished(study)} finished trial(s); run the same command again to "
            f"continue the study in {out / 'study.db'} (the interrupted trial is made up for).")  # fmt: skip
        raise KeyboardInterrupt from None
    finally:
        for process in extra:
            process.join()
    return summarize(base, study, out, log)


def summarize(base: Config, study, out: Path, log: Callable[[str], None] = print) -> dict:
    """best.toml, search.png and trials.json from the study's finished trials."""
    import optuna

    from lmforge.io import atomic_write_json, atomic_write_text

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             **t.user_attrs} for t in trials]  # fmt: skip
    atomic_write_json(out / "trials.json", rows)
    write_search_plot(trials, out / "search.png")
    if not complete:
        refused = Counter(t.user_attrs["invalid"] for t in trials if t.user_attrs.get("invalid"))
        if refused and sum(refused.values()) == len(trials):  # every trial failed for a reason lmforge knows
            reason, count = refused.most_common(1)[0]
            raise UserError(f"No trial of the study in {out} could train: {count} of {len(trials)} stopped on: "
                            f"{reason.rstrip('.')}. Fix that in the base settings or the search space.")  # fmt: skip
        raise UserError(f"No trial of the study in {out} completed (all pruned or failed); widen the search "
                        f"space or raise --trials.")  # fmt: skip
    best = study.best_trial
    config = apply_overrides(base, best.params)
    config.name = f"{base.name}-tuned"
    config.description = (f"Found by lmforge tune from {base.name}: validation loss {best.value:.4f} "
                          f"(trial {best.number} of {len(trials)})")  # fmt: skip
    config.train.out = ""
    atomic_write_text(out / "best.toml", config_to_toml(config))
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    log(f"Best: trial {best.number}, validation loss {best.value:.4f} with "
        f"{', '.join(f'{k}={_short(v)}' for k, v in best.params.items())} ({len(complete)} completed, "
        f"{pruned} pruned). Wrote {out / 'best.toml'}: lmforge train --preset {out / 'best.toml'}")  # fmt: skip
    return {"best_value": best.value, "best_params": best.params, "best_trial": best.number,
            "completed": len(complete), "pruned": pruned, "trials": len(trials),
            "preset": str(out / "best.toml")}  # fmt: skip


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def config_to_toml(config: Config) -> str:
    """A preset file that load_preset reads back into the same config."""
    data = config.to_dict()
    lines = [
        f"name = {_toml_value(data.pop('name'))}",
        f"description = {_toml_value(data.pop('description'))}",
    ]
    for section, values in data.items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_search_plot(trials, path: Path) -> None:
    """Each trial's value (pruned ones at their last report) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.io import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4))
    done = [(t.number, t.value) for t in trials if t.value is not None]
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in trials
              if t.value is None and t.intermediate_values]  # fmt: skip
    if done:
        ax.scatter(*zip(*done, strict=True), label="completed", color="tab:blue")
        best, line = math.inf, []
        for number, value in sorted(done):
            best = min(best, value)
            line.append((number, best))
        ax.step(*zip(*line, strict=True), where="post", color="tab:green", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned, strict=True), marker="x", color="tab:red", label="pruned (last report)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss")
    ax.set_title("lmforge tune")
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
