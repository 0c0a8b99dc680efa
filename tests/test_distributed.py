"""Data-parallel training under torchrun (two CPU processes, Gloo backend)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # LMFORGE_DATA_DIR: the test slice (conftest)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "lmforge",
        *args,
    ]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


COMMON = (
    "train",
    "--preset",
    "tiny",
    "--quiet",
    "--train.eval_interval",
    "10",
    "--train.sample_tokens",
    "0",
    "--optim.schedule",
    "constant",
    "--optim.warmup_iters",
    "0",
    "--device",
    "cpu",
    # float32: the tolerances below are for sums taken in another order; `auto` would be bf16
    # autocast on CPUs with AVX-512 BF16, where DDP and FSDP differed by 5.6e-4.
    "--train.dtype",
    "float32",
)


def test_two_processes_train_resume_exactly_and_write_once(tmp_path):
    whole = torchrun(*COMMON, "--out", str(tmp_path / "whole"), "--max-iters", "20", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert whole.stdout.count("Done: 20 steps") == 1  # rank 0 reports, once
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["val_loss"] < records[0]["val_loss"]
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["world_size"] == 2

    half = torchrun(*COMMON, "--out", str(tmp_path / "split"), "--max-iters", "10", cwd=tmp_path)
    assert half.returncode == 0, half.stderr[-2000:]
    rest = torchrun(*COMMON, "--out", str(tmp_path / "split"), "--max-iters", "20", "--resume", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]
    a = load_file(str(tmp_path / "whole" / "train_state" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "train_state" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # One process cannot continue a two-process run exactly: refused, with the reason.
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            *COMMON,
            "--out",
            str(tmp_path / "split"),
            "--max-iters",
            "30",
            "--resume",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert single.returncode == 2
    assert "trained with 2 process(es)" in single.stderr

    # --strategy fsdp: each process holds half of every parameter and optimizer moment; the
    # losses and weights are those of DDP (the same windows, gradients averaged the same way,
    # only summed in another order), the checkpoint is whole, and resuming is exact.
    sharded = torchrun(*COMMON, "--strategy", "fsdp", "--out", str(tmp_path / "fsdp"), "--max-iters", "20",
                       cwd=tmp_path)  # fmt: skip
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    total = sum(t.numel() for t in load_file(str(tmp_path / "whole" / "model.safetensors")).values())
    split = re.search(
        r"FSDP: parameters split over 2 processes \(([\d,]+) of ([\d,]+) values", sharded.stdout
    )
    here, of = (int(g.replace(",", "")) for g in split.groups())
    assert of == total and total / 2 <= here <= total / 2 + 100  # half each (rows split evenly, padded)
    fsdp_records = [
        json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()
    ]
    for r, s in zip(records, fsdp_records, strict=True):
        assert abs(r["train_loss"] - s["train_loss"]) < 1e-4 and abs(r["val_loss"] - s["val_loss"]) < 1e-4
    c = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    ddp_weights = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert sorted(c) == sorted(ddp_weights)
    assert all(torch.allclose(c[k], ddp_weights[k], atol=1e-3) for k in c)
    first = torchrun(*COMMON, "--strategy", "fsdp", "--out", str(tmp_path / "fsdp-split"), "--max-iters", "10",
                     cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    second = torchrun(*COMMON, "--strategy", "fsdp", "--out", str(tmp_path / "fsdp-split"), "--max-iters", "20",
                      "--resume", cwd=tmp_path)  # fmt: skip
    assert second.returncode == 0, second.stderr[-2000:]
    d = load_file(str(tmp_path / "fsdp-split" / "train_state" / "model.safetensors"))
    e = load_file(str(tmp_path / "fsdp" / "train_state" / "model.safetensors"))
    assert all(torch.equal(d[k], e[k]) for k in e)
