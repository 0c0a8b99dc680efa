"""Optimizers and learning-rate schedules.

- AdamW with weight decay on matrices only (not on biases and norm gains),
  fused into one kernel where the device has one.
- Muon (momentum + Newton-Schulz orthogonalisation) for the hidden weight
  matrices, with AdamW for embeddings, head, biases and gains.
- Schedules: linear warm-up, then cosine decay, warm-up-stable-decay, or constant.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmforge.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_iters: int) -> float:
    """Learning rate for the update made at `step` (0-based)."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = int(max_iters * (1.0 - cfg.wsd_decay_frac))
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(1, max_iters - decay_start)
        return cfg.lr + min(1.0, progress) * (cfg.min_lr - cfg.lr)
    decay_iters = cfg.decay_iters or max_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise a matrix (push its singular values towards 1).

    A quintic iteration whose coefficients are chosen to converge fast from
    singular values in (0, 1]; it does not need to converge exactly.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D hidden weight matrices."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(g, group["ns_steps"]).to(p.dtype)
                # Scale so the update's RMS does not depend on the matrix's aspect ratio.
                scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = cfg.fused and device.type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def build_optimizers(model: nn.Module, cfg: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers for a model; each param group carries `base_lr` for the schedule."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        embedding_ids.add(id(head.weight))
    matrices = [p for _, p in params if p.dim() >= 2]
    others = [p for _, p in params if p.dim() < 2]
    if cfg.optimizer == "muon":
        hidden = [p for p in matrices if id(p) not in embedding_ids]
        rest = [p for p in matrices if id(p) in embedding_ids]
        adam = _adamw(
            [{"params": rest, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
             {"params": others, "weight_decay": 0.0, "base_lr": cfg.lr}],
            cfg, device,
        )
        muon = Muon([{"params": hidden, "base_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                    momentum=cfg.muon_momentum)
        return [adam, muon]
    return [_adamw(
        [{"params": matrices, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
         {"params": others, "weight_decay": 0.0, "base_lr": cfg.lr}],
        cfg, device,
    )]


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float, cfg: OptimConfig) -> None:
    """Apply the schedule: every group's rate is its base rate times lr / cfg.lr."""
    factor = lr / cfg.lr
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
