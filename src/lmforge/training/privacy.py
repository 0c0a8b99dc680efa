"""Differentially private training (DP-SGD) through Opacus.

    each step:  per-example gradients (Opacus' GradSampleModule)
             →  each example's gradient clipped to max_grad_norm
             →  Gaussian noise of std noise_multiplier × max_grad_norm added to their sum
             →  the usual optimizer step                               (Opacus' DPOptimizer)
    ε after k steps: Opacus' RDP accountant, for sampling rate q = batch / examples and δ

The privacy unit is one training example: a labeled text for a classifier, a window of
`block_size` tokens for a language model (which sees random windows of its text). Batches
are drawn uniformly at random with a fixed size; the accountant assumes Poisson sampling of
the same expected size, the usual approximation of DP-SGD implementations.

Give either a target ε (the noise multiplier that reaches it after the planned number of
steps is solved for) or the noise multiplier itself (ε is then reported as training goes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lmforge.config import PrivacyConfig
from lmforge.errors import UserError, require


def enabled(cfg: PrivacyConfig) -> bool:
    return cfg.target_epsilon > 0 or cfg.noise_multiplier > 0


@dataclass
class Privacy:
    """The DP-SGD settings of one run and its accountant."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    batch_size: int
    target_epsilon: float = 0.0

    def epsilon(self, steps: int) -> float:
        """ε spent after `steps` steps, by Opacus' RDP accountant."""
        from opacus.accountants import RDPAccountant

        if steps <= 0:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, still valid
            warnings.simplefilter("ignore", UserWarning)
            return float(accountant.get_epsilon(self.delta))

    def info(self, steps: int) -> dict[str, Any]:
        """What the checkpoint and the metrics record say about the guarantee."""
        return {"epsilon": round(self.epsilon(steps), 4), "delta": self.delta, "steps": steps,
                "noise_multiplier": round(self.noise_multiplier, 6), "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "accountant": "rdp (opacus)"}  # fmt: skip

    def describe(self, steps: int) -> str:
        return (
            f"DP-SGD: noise multiplier {self.noise_multiplier:.3f}, per-example gradients clipped to "
            f"{self.max_grad_norm:g}, sampling rate {self.sample_rate:.2e}; ε = {self.epsilon(steps):.2f} "
            f"at δ = {self.delta:g} after {steps} steps."
        )


def plan(cfg: PrivacyConfig, examples: int, batch_size: int, steps: int) -> Privacy:
    """The noise multiplier for the run: given, or solved for the target ε after `steps` steps."""
    require("opacus", "privacy", "Differentially private training")
    if examples < 2 * batch_size:
        raise UserError(
            f"Differential privacy needs many more examples than a batch: {examples} examples for batches "
            f"of {batch_size}; use more data or a smaller batch size.",
            settings=("batch_size", "train.batch_size"),
        )
    sample_rate = batch_size / examples
    delta = cfg.delta or min(1e-5, 1.0 / (10 * examples))
    noise = cfg.noise_multiplier
    if cfg.target_epsilon > 0:
        from opacus.accountants.utils import get_noise_multiplier

        if cfg.noise_multiplier > 0:
            raise UserError(
                "Give privacy.target_epsilon or privacy.noise_multiplier, not both: the target fixes the noise.",
                settings=("privacy.target_epsilon", "privacy.noise_multiplier"),
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                noise = get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps, accountant="rdp")  # fmt: skip
        except ValueError as e:
            raise UserError(
                f"No noise level reaches ε = {cfg.target_epsilon:g} at δ = {delta:g} in {steps} steps ({e}); "
                f"raise privacy.target_epsilon or train fewer steps.",
                settings=("privacy.target_epsilon",),
            ) from None
    return Privacy(noise, cfg.max_grad_norm, sample_rate, delta, batch_size, cfg.target_epsilon)


def check_supported(optimizers: list[torch.optim.Optimizer], grad_accum: int, distributed: bool,
                    compiled: bool) -> None:  # fmt: skip
    """Settings DP-SGD does not work with here, named before training starts."""
    problems = [
        (len(optimizers) == 1, "a single optimizer (optim.optimizer adamw, not muon)", "optim.optimizer"),
        (grad_accum == 1, "train.grad_accum 1 (Opacus clips whole batches)", "train.grad_accum"),
        (not distributed, "one process (not torchrun)", None),
        (not compiled, "train.compile false", "train.compile"),
    ]
    for ok, need, setting in problems:
        if not ok:
            raise UserError(f"Differentially private training needs {need}.",
                            settings=(setting,) if setting else ())  # fmt: skip


# Opacus computes per-example gradients of recurrent layers only in its own DPLSTM/DPGRU/DPRNN,
# which take the same weights under the same names.
def _dp_layer(module: nn.Module) -> nn.Module | None:
    from opacus.layers import DPGRU, DPLSTM, DPRNN

    kinds = {nn.LSTM: DPLSTM, nn.GRU: DPGRU, nn.RNN: DPRNN}
    kind = kinds.get(type(module))
    if kind is None:
        return None
    extra = {"nonlinearity": module.nonlinearity} if isinstance(module, nn.RNN) else {}
    replacement = kind(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
                       batch_first=module.batch_first, dropout=module.dropout,
                       bidirectional=module.bidirectional, **extra)  # fmt: skip
    replacement.load_state_dict(module.state_dict())
    return replacement.to(next(module.parameters()).device)


def prepare_model(model: nn.Module) -> nn.Module:
    """Swap recurrent layers for Opacus' equivalents (in place); the model's state_dict keeps its
    usual names, so checkpoints load into the ordinary model."""
    swapped: dict[str, set[str]] = {}
    for name, module in list(model.named_modules()):
        replacement = _dp_layer(module)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
            swapped[name + "."] = set(module.state_dict())
    if swapped:

        def plain_names(module: nn.Module, state: dict, prefix: str, meta: dict) -> None:
            for layer, names in swapped.items():
                start = prefix + layer
                for key in [k for k in state if k.startswith(start) and k[len(start) :] not in names]:
                    del state[key]  # the DP layer's internal aliases of the same tensors

        model._register_state_dict_hook(plain_names)
    return model


def _layer_norm_without_bias_grad_sample() -> None:
    """Opacus' LayerNorm grad sampler assumes a bias; lmforge's bias-free presets have none. The same
    per-example gradient of the gain, skipping the missing bias."""
    import torch.nn.functional as F
    from opacus.grad_sample import GradSampleModule
    from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

    original = GradSampleModule.GRAD_SAMPLERS[nn.LayerNorm]
    if getattr(original, "handles_no_bias", False):
        return

    def layer_norm_grad_sample(layer: nn.LayerNorm, activations: list[torch.Tensor], backprops: torch.Tensor):
        if layer.bias is not None:
            return original(layer, activations, backprops)
        if layer.weight is None or not layer.weight.requires_grad:
            return {}
        normalized = F.layer_norm(activations[0], layer.normalized_shape, eps=layer.eps)
        return {layer.weight: sum_over_all_but_batch_and_last_n(normalized * backprops, layer.weight.dim())}

    layer_norm_grad_sample.handles_no_bias = True
    GradSampleModule.GRAD_SAMPLERS[nn.LayerNorm] = layer_norm_grad_sample


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, privacy: Privacy):
    """The model wrapped to record per-example gradients, and the optimizer that clips and noises them."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # Opacus' hooks fire on modules whose inputs need no gradient (the embedding's): expected, not a problem.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    _layer_norm_without_bias_grad_sample()
    if hasattr(model, "head_on_scored_only"):  # a GPT: keep its head's batch axis for per-example gradients
        model.head_on_scored_only = False
    private = GradSampleModule(model)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=privacy.noise_multiplier,
                               max_grad_norm=privacy.max_grad_norm, expected_batch_size=privacy.batch_size,
                               loss_reduction="mean")  # fmt: skip
    return private, dp_optimizer
