"""LoRA: low-rank adapters on a frozen model (Hu et al., 2021).

A targeted `nn.Linear` becomes a `LoRALinear`: its weight W stays frozen and the
layer computes x Wᵀ + (alpha / r) · x Aᵀ Bᵀ, with A (r × in) random and B
(out × r) zero, so training starts exactly at the pretrained model. Only A and B
(and nothing else) are trained, so the optimizer keeps state for a few percent of
the parameters. `merged_state_dict` folds B·A into W: the result is a plain
checkpoint that every command (and the Hugging Face export) reads. The adapters
alone (adapter.safetensors, with rank, alpha and targets in its metadata) can be
put back on the same base model later: `load_adapter`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import UserError

# Hugging Face module names and what they are called in lmforge's GPT.
HF_NAMES = {
    "q_proj": "attn.c_attn",
    "k_proj": "attn.c_attn",
    "v_proj": "attn.c_attn",
    "o_proj": "attn.c_proj",
    "gate_proj": "mlp.c_gate",
    "up_proj": "mlp.c_fc",
    "down_proj": "mlp.c_proj",
}


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias names) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device="meta",
            dtype=base.weight.dtype,
        )  # no second copy of W
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def reset_parameters(self) -> None:  # the base weight is given, never re-initialised
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)


def parse_targets(spec: str) -> list[str]:
    """Module-name suffixes to adapt; Hugging Face names are translated to lmforge's."""
    if spec.strip() == "all-linear":
        return ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_gate", "mlp.c_proj"]
    names = [HF_NAMES.get(n.strip(), n.strip()) for n in spec.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str) -> int:
    """Freeze `model` and put adapters on every Linear whose name ends with a target; returns how many."""
    suffixes = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name != "lm_head"
        and any(name == s or name.endswith("." + s) for s in suffixes)
    ]
    if not chosen:
        linear = sorted(
            {name.split(".", 2)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise UserError(
            f"finetune.lora_targets {targets!r} matches no layer of this model; "
            f"its linear layers are: {', '.join(linear)}."
        )
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
    return len(chosen)


def base_fingerprint(model: nn.Module) -> str:
    """Identifies the base model an adapter belongs to: the shapes of its tensors and the first
    MiB of its embedding's bytes (two different bases almost never share both)."""
    import hashlib

    digest = hashlib.sha256()
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name in sorted(state):
        digest.update(f"{name}{tuple(state[name].shape)}".encode())
    embedding = next((v for k, v in sorted(state.items()) if k.endswith("wte.weight")), None)
    if embedding is not None:
        digest.update(embedding.detach().float().cpu().contiguous().view(-1)[: 1 << 18].numpy().tobytes())
    return digest.hexdigest()[:16]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the model's tensors) with every adapter folded into its weight and dropped."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.weight"] = module.merged_weight().detach()
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (what `save_adapter` writes)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and turn LoRALinear back into nn.Linear (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device="meta",
                dtype=module.weight.dtype,
            )
            plain.weight = nn.Parameter(module.merged_weight().detach(), requires_grad=False)
            plain.bias = module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Put the adapters saved by `lmforge finetune` (adapter.safetensors, or the folder that
    holds it) on `model`, its base, and merge them in: a plain model at full speed."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    file = Path(path) / "adapter.safetensors" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise UserError(
            f"No LoRA adapter at {path}: pass the adapter.safetensors that "
            "a LoRA fine-tuning run (finetune.lora_rank > 0) wrote, or its folder."
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e}).") from None
    if not {"rank", "alpha", "targets"} <= meta.keys() or not tensors:
        raise UserError(
            f"{file} is not an lmforge LoRA adapter (no rank/alpha/targets metadata); "
            "use the adapter.safetensors that `lmforge finetune` writes."
        )
    base = meta.get("base") or "its base model"
    if meta.get("base_fingerprint") and meta["base_fingerprint"] != base_fingerprint(model):
        raise UserError(f"The adapter {file} was trained on {base}, and this is another model; "
                        f"put it on the model it was trained on.")  # fmt: skip
    try:
        apply_lora(model, int(meta["rank"]), float(meta["alpha"]), 0.0, meta["targets"])
    except UserError:
        raise UserError(f"The adapter {file} does not fit this model: it was trained on {base}.") from None
    expected = adapter_state_dict(model)
    wrong_shape = [k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape]
    if expected.keys() != tensors.keys() or wrong_shape:
        raise UserError(f"The adapter {file} does not fit this model: it was trained on {base}.")
    model.load_state_dict(tensors, strict=False)
    return merge_lora(model)
