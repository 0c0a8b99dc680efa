"""LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), in and out.

`lmforge finetune --lora-rank R` of a Llama-family model, or of an encoder–decoder of a layout
transformers runs (T5, BART, Marian, mBART), writes its adapters this way beside lmforge's own
`adapter.safetensors`, so that `peft.PeftModel.from_pretrained(base, RUN_DIR)` puts them on the
transformers model; and `--adapter` accepts a folder written by `peft` itself. PEFT names each
Hugging Face projection separately where lmforge fuses some (the query, key and value projections
into one `attn.c_attn`, an encoder–decoder's key and value into one `kv`):
- out: the fused adapter (A shared, B stacked) is exactly three adapters with the same A
  and B cut by rows;
- in: each adapter's update scale·B·A is added to its rows of the fused weight (adapters
  are merged on load, as lmforge's own are).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.io import atomic_write_json
from lmforge.weights import read_tensors, save_tensors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# lmforge module under blocks.N → Hugging Face module under model.layers.N (q/k/v: see _fused_rows)
MODULES = {"attn.c_proj": "self_attn.o_proj", "mlp.c_gate": "mlp.gate_proj", "mlp.c_fc": "mlp.up_proj",
           "mlp.c_proj": "mlp.down_proj"}  # fmt: skip


def is_peft_adapter(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() or (path.name == CONFIG and path.is_file())


def llama_shaped(m: ModelConfig) -> bool:
    from lmforge.interop.hf import hf_config_from_model

    try:
        return hf_config_from_model(m)["model_type"] in ("llama", "qwen2")
    except UserError:
        return False


def _fused_rows(m: ModelConfig) -> dict[str, slice]:
    head = m.n_embd // m.n_head
    q, kv = m.n_head * head, (m.n_kv_head or m.n_head) * head
    return {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}


def hf_modules(m: ModelConfig) -> dict[str, list[tuple[str, slice | None]]] | None:
    """Each lmforge linear layer → the Hugging Face modules it stands for and their rows of it (None:
    all of it), for the models whose adapters PEFT can put on the transformers model; else None."""
    from lmforge.families import family_of

    if family_of(m.arch).transduces:
        from lmforge.interop.hf import encoder_decoder_linear_modules

        return encoder_decoder_linear_modules(m)
    if not llama_shaped(m):
        return None
    out: dict[str, list[tuple[str, slice | None]]] = {}
    for i in range(m.n_layer):
        out[f"blocks.{i}.attn.c_attn"] = [
            (f"model.layers.{i}.self_attn.{p}", rows) for p, rows in _fused_rows(m).items()
        ]
        out |= {
            f"blocks.{i}.{ours}": [(f"model.layers.{i}.{theirs}", None)] for ours, theirs in MODULES.items()
        }
    return out


def exchangeable(model: nn.Module, m: ModelConfig) -> bool:
    """Whether every LoRA adapter of `model` has a PEFT name on the transformers model."""
    from lmforge.adapters.lora import LoRALinear

    names = hf_modules(m) or {}
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    return bool(adapted) and all(name in names for name in adapted)


def save_peft_adapter(model: nn.Module, m: ModelConfig, out: Path, base: str, rank: int, alpha: float,
                      dropout: float) -> None:  # fmt: skip
    """Write the model's LoRA adapters as PEFT files in `out` (when `exchangeable`)."""
    from lmforge.adapters.lora import LoRALinear
    from lmforge.families import family_of

    names = hf_modules(m)
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        a, b = module.lora_A.detach().float().cpu(), module.lora_B.detach().float().cpu()
        for hf_name, rows in names[name]:  # a fused layer: the same A, B cut by rows
            tensors[f"{PREFIX}{hf_name}.lora_A.weight"] = a.clone()
            tensors[f"{PREFIX}{hf_name}.lora_B.weight"] = (b if rows is None else b[rows]).contiguous()
            targets.add(hf_name.rsplit(".", 1)[-1])
    save_tensors(out / WEIGHTS, tensors)
    task = "SEQ_2_SEQ_LM" if family_of(m.arch).transduces else "CAUSAL_LM"
    adapted = {
        k.removeprefix(PREFIX).removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")
    }
    others = {hf for parts in names.values() for hf, _ in parts if hf.rsplit(".", 1)[-1] in targets} - adapted
    # PEFT adapts every module of a listed name; where that is more than was adapted here (the
    # self-attention's q_proj but not the cross-attention's), the exact modules, as PEFT's regex.
    chosen = sorted(targets) if not others else "(" + "|".join(re.escape(n) for n in sorted(adapted)) + ")"
    atomic_write_json(out / CONFIG, {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base, "r": rank,
        "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": chosen, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
    })  # fmt: skip


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / CONFIG).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / CONFIG} is not readable JSON ({e}).") from None
    unsupported = [key for key in ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern")
                   if cfg.get(key)]  # fmt: skip
    if cfg.get("peft_type") != "LORA" or unsupported:
        what = f"options {', '.join(unsupported)}" if unsupported else f"type {cfg.get('peft_type')!r}"
        raise UserError(f"{folder} is a PEFT adapter with {what}; lmforge merges plain LoRA adapters only.")
    return cfg


def load_peft_adapter(model: nn.Module, m: ModelConfig, path: str | Path) -> nn.Module:
    """Merge the PEFT LoRA adapter in `path` (its folder, or its adapter_config.json) into `model`."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    cfg = _read_config(folder)
    base = cfg.get("base_model_name_or_path") or "another base model"
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    tensors = read_tensors(folder / WEIGHTS)
    params = dict(model.named_parameters())
    mismatch = UserError(f"The adapter {folder} does not fit this model: it was made for {base}.")
    modules = sorted({k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    if not modules or len(tensors) != 2 * len(modules):
        raise UserError(f"{folder / WEIGHTS} holds no LoRA A/B pairs (or also other tensors); "
                        f"lmforge merges plain LoRA adapters only.")  # fmt: skip
    targets = {
        hf: (f"{ours}.weight", rows) for ours, parts in (hf_modules(m) or {}).items() for hf, rows in parts
    }
    with torch.no_grad():
        for module in modules:
            target, rows = targets.get(module.removeprefix(PREFIX), (module, None))
            if target not in params:
                raise mismatch
            a, b = tensors[f"{module}.lora_A.weight"].float(), tensors[f"{module}.lora_B.weight"].float()
            weight = params[target]
            region = weight[rows] if rows is not None else weight
            if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(region.shape):
                raise mismatch
            region += (scale * (b @ a)).to(weight.dtype)
    return model
