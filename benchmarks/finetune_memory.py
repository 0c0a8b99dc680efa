"""Fine-tuning memory and speed: full fine-tuning (the baseline) against LoRA.

A GPT-2-124M-shaped model (12 layers, 12 heads, 768 wide, vocabulary 50,257; random
weights, float32) takes a few AdamW steps on batches of 4 × 256 tokens through
lmforge's own optimizer setup, once with every weight trainable and once with LoRA
adapters (rank 8 on all attention and MLP projections). Each variant runs in its
own process so that its peak resident memory is its own. Reported: trainable
parameters, optimizer-state bytes, peak memory (CPU: peak RSS; CUDA: peak
allocated), median seconds per step. Results: benchmarks/results/finetune_memory.json.

Instruction data scores only the replies (the prompt's targets are -100). Two more LoRA
rows train on such batches, 90% of the targets unscored: the model's head on the scored
positions only (what lmforge does), and, as their baseline, on every position.

    pip install -e . && python benchmarks/finetune_memory.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# variant: (LoRA rank, 0 for full fine-tuning; fraction of unscored targets; head on scored positions only)
VARIANTS = {
    "full": (0, 0.0, True),
    "lora-r8": (8, 0.0, True),
    "lora-r64": (64, 0.0, True),
    "lora-r8-replies": (8, 0.9, True),
    "lora-r8-replies-head-everywhere": (8, 0.9, False),
}


def child(variant: str, steps: int, batch: int, seq: int) -> dict:
    import torch

    from lmforge.adapters.lora import apply_lora
    from lmforge.config import ModelConfig, OptimConfig
    from lmforge.device import set_threads
    from lmforge.models import build_model
    from lmforge.training.optim import build_optimizers
    from lmforge.training.trainer import optimizer_state_bytes, peak_memory

    set_threads(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    m = ModelConfig(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, activation="gelu_tanh"
    )
    model = build_model(m)
    rank, unscored, head_on_scored_only = VARIANTS[variant]
    model.head_on_scored_only = head_on_scored_only
    if rank:
        apply_lora(model, rank=rank, alpha=2 * rank, dropout=0.0, targets="all-linear")
    model.to(device).train()
    [opt] = build_optimizers(model, OptimConfig(lr=1e-4, weight_decay=0.0), device)
    times = []
    for _ in range(steps):
        x = torch.randint(0, m.vocab_size, (batch, seq + 1), device=device)
        targets = x[:, 1:].clone()
        targets[:, : int(unscored * seq)] = -100  # the prompt comes first, the reply after it
        start = time.perf_counter()
        _, loss = model(x[:, :-1], targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "device": str(device),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_mib": round(optimizer_state_bytes([opt]) / 2**20, 2),
        "peak_memory_mib": round(peak_memory(device) / 2**20, 1),
        "s_per_step": round(statistics.median(times[1:]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "finetune_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq)))
        return
    rows = []
    for variant in VARIANTS:
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{variant:>31}: trainable {row['trainable_params']:>12,} of {row['params']:,}  optimizer state "
            f"{row['optimizer_state_mib']:8.1f} MiB  peak memory {row['peak_memory_mib']:8.1f} MiB  "
            f"{row['s_per_step']:.2f} s/step",
            flush=True,
        )
    full = rows[0]
    for row in rows:
        row["optimizer_state_vs_full"] = round(row["optimizer_state_mib"] / full["optimizer_state_mib"], 4)
        row["peak_memory_vs_full"] = round(row["peak_memory_mib"] / full["peak_memory_mib"], 3)
        row["speed_vs_full"] = round(full["s_per_step"] / row["s_per_step"], 2)
    by_name = {row["variant"]: row for row in rows}
    scored_only, everywhere = by_name["lora-r8-replies"], by_name["lora-r8-replies-head-everywhere"]
    scored_only["speed_vs_head_everywhere"] = round(everywhere["s_per_step"] / scored_only["s_per_step"], 2)
    scored_only["peak_memory_vs_head_everywhere"] = round(
        scored_only["peak_memory_mib"] / everywhere["peak_memory_mib"], 3
    )
    print(f"head on the scored positions only: {scored_only['speed_vs_head_everywhere']}x the steps/s, "
          f"{scored_only['peak_memory_vs_head_everywhere']}x the peak memory", flush=True)  # fmt: skip
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "finetune_memory",
                "machine": machine_info(),
                "model": "GPT-2-124M shape, float32",
                "batch": args.batch,
                "seq_len": args.seq,
                "steps": args.steps,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
