"""Training speed on tiny Shakespeare: lmforge's fast preset against nanoGPT's CPU recipe.

Runs, in one benchmark run, each of:
  baseline   preset nanogpt-cpu-baseline: nanoGPT's recipe, float32, eager, unfused AdamW
  same-arch  the same model and hyper-parameters on lmforge's fast path as it stands on this
             machine (fused AdamW; bf16 autocast where the CPU has native bf16): throughput on an
             identical architecture. torch.compile is not in it: measured here, it does not pay.
  fast       preset shakespeare-char (the default): tuned for time to validation loss 1.886
  fast-no-qk-norm  the default preset without QK-norm (what llama.cpp's `jais2` graph computes)
  fast+compile  the same with torch.compile; the first repeat compiles with a cold cache
             (cleared at the start), later repeats find it warm: the table shows the median
each `--repeats` times, every run in a fresh child process (so peak memory is per run), and
prints a table: wall time to validation loss 1.886 (compilation and evaluations included),
final validation loss, tokens/s, model FLOP utilisation against the matmul peaks measured
here, and peak memory. Results go to benchmarks/results/train_speed.json.

    python benchmarks/train_speed.py                 # 3 repeats (several minutes)
    python benchmarks/train_speed.py --repeats 1 --runs baseline fast
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

TARGET = 1.886
RESULTS = Path(__file__).parent / "results"

RUNS = {
    "baseline": ("nanogpt-cpu-baseline", {}),
    "same-arch": ("nanogpt-cpu-baseline", {"optim.fused": True, "train.dtype": "auto"}),
    "fast": ("shakespeare-char", {}),
    "fast+compile": ("shakespeare-char", {"train.compile": True}),
    # the default without QK-norm: the layout llama.cpp runs as `jais2` (GGUF export, docs/interop)
    "fast-no-qk-norm": ("shakespeare-char", {"model.qk_norm": False}),
}


def matmul_peak(dtype_name: str, size: int = 1024, seconds: float = 2.0) -> float:
    """Measured GFLOP/s of a square matmul in the given dtype (0 if unsupported)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def one_run(preset: str, overrides: dict, out: str) -> dict:
    """Train once (in a child process) and summarise the run."""
    import lmforge
    from lmforge.config import apply_overrides
    from lmforge.models import build_model

    config = apply_overrides(
        lmforge.load_preset(preset),
        {
            **overrides,
            "train.out": out,
            "train.progress": False,
            "train.sample_tokens": 0,
        },
    )
    result = lmforge.train(config, log=lambda _: None)
    history = result.history
    reached = next((r for r in history if r.get("val_loss", 9) <= TARGET), None)
    steady = [r["tokens_per_s"] for r in history if "tokens_per_s" in r][1:]  # skip the compile window
    model = build_model(config.model)
    return {
        "time_to_target_s": reached["elapsed_s"] if reached else None,
        "step_at_target": reached["step"] if reached else None,
        "final_val_loss": result.final_val_loss,
        "best_val_loss": result.best_val_loss,
        "total_s": result.elapsed_s,
        "steps": result.step,
        "tokens_per_s": statistics.median(steady) if steady else result.tokens_per_s,
        "flops_per_token": model.flops_per_token(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--output", default=str(RESULTS / "train_speed.json"))
    args = parser.parse_args()

    from lmforge.device import cpu_has_bf16, set_threads

    set_threads(0)
    peak_fp32 = matmul_peak("float32")
    peak_bf16 = matmul_peak("bfloat16") if cpu_has_bf16() else None
    print(
        f"matmul peak here: fp32 {peak_fp32:.0f} GFLOP/s, bf16 "
        + (f"{peak_bf16:.0f} GFLOP/s" if peak_bf16 else "not native on this CPU")
    )

    if "fast+compile" in args.runs:  # start from a cold compile cache, as a new user does
        import shutil

        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        shutil.rmtree(default_cache_dir(), ignore_errors=True)
    ctx = mp.get_context("spawn")
    rows: dict[str, list[dict]] = {name: [] for name in args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in args.runs:
                preset, overrides = RUNS[name]
                with ctx.Pool(1) as pool:
                    run = pool.apply(one_run, (preset, overrides, f"{tmp}/{name}-{repeat}"))
                run["mfu_fp32"] = run["tokens_per_s"] * run["flops_per_token"] / (peak_fp32 * 1e9)
                if peak_bf16:
                    run["mfu_bf16"] = run["tokens_per_s"] * run["flops_per_token"] / (peak_bf16 * 1e9)
                rows[name].append(run)
                t = run["time_to_target_s"]
                print(
                    f"  {name} #{repeat + 1}: to {TARGET}: {f'{t:.1f}s' if t else 'not reached'}, "
                    f"final val {run['final_val_loss']:.4f}, {run['tokens_per_s']:.0f} tok/s",
                    flush=True,
                )

    def med(name: str, key: str):
        values = [r[key] for r in rows[name] if r[key] is not None]
        return statistics.median(values) if values else None

    base_time = med("baseline", "time_to_target_s") if "baseline" in rows else None
    base_tps = med("baseline", "tokens_per_s") if "baseline" in rows else None
    summary = {}
    print(
        f"\n| run | preset | time to {TARGET} (s) | vs baseline | final val loss | tokens/s | vs baseline "
        f"| MFU fp32 | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.runs:
        t, tps = med(name, "time_to_target_s"), med(name, "tokens_per_s")
        summary[name] = {
            "preset": RUNS[name][0],
            "overrides": RUNS[name][1],
            "time_to_target_s": t,
            "final_val_loss": med(name, "final_val_loss"),
            "tokens_per_s": tps,
            "mfu_fp32": med(name, "mfu_fp32"),
            "mfu_bf16": med(name, "mfu_bf16") if peak_bf16 else None,
            "peak_rss_mb": med(name, "peak_rss_mb"),
            "time_ratio": t / base_time if t and base_time else None,
            "throughput_ratio": tps / base_tps if base_tps else None,
        }
        s = summary[name]
        time_text = "not reached" if t is None else f"{t:.1f}"
        time_ratio = "" if s["time_ratio"] is None else f"{s['time_ratio']:.0%}"
        tps_ratio = "" if s["throughput_ratio"] is None else f"{s['throughput_ratio']:.2f}x"
        print(
            f"| {name} | {s['preset']} | {time_text} | {time_ratio} | {s['final_val_loss']:.4f} | "
            f"{tps:.0f} | {tps_ratio} | {s['mfu_fp32']:.1%} | {s['peak_rss_mb']:.0f} |"
        )

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "benchmark": "train_speed",
                "target_val_loss": TARGET,
                "repeats": args.repeats,
                "machine": {
                    **machine_info(),
                    "peak_fp32_gflops": peak_fp32,
                    "peak_bf16_gflops": peak_bf16,
                },
                "summary": summary,
                "runs": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {output}")


if __name__ == "__main__":
    sys.exit(main())
