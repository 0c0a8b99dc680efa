"""The fast path (bf16 autocast, torch.compile) must compute the same losses as fp32 eager.

Tolerances: bf16 keeps 8 bits of mantissa, so a loss of ~4 nats agrees to about 1e-2;
torch.compile in fp32 reorders floating-point sums only, so it agrees to 1e-4.
"""

import pytest
import torch

from lmforge.config import ModelConfig, OptimConfig
from lmforge.device import autocast
from lmforge.models import build_model
from lmforge.training.optim import build_optimizers


def losses(dtype: torch.dtype, compile_model: bool, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        block_size=16,
        n_layer=2,
        n_head=2,
        n_embd=32,
        pos_encoding="rope",
        qk_norm=True,
        activation="relu2",
        tie_embeddings=False,
        bias=False,
    )
    model = build_model(cfg)
    optimizers = build_optimizers(model, OptimConfig(lr=3e-3, fused=True), torch.device("cpu"))
    run = torch.compile(model) if compile_model else model
    data = torch.randint(0, 50, (steps, 4, 17), generator=torch.Generator().manual_seed(1))
    out = []
    for batch in data:
        with autocast(torch.device("cpu"), dtype):
            _, loss = run(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        out.append(loss.item())
    return out


def test_bf16_autocast_matches_fp32_within_bf16_precision():
    reference = losses(torch.float32, False)
    assert losses(torch.bfloat16, False) == pytest.approx(reference, abs=2e-2)


def test_compiled_model_matches_eager_fp32():
    assert losses(torch.float32, True) == pytest.approx(losses(torch.float32, False), abs=1e-4)
