"""LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), in and out.

`lmforge finetune --lora-rank R` of a Llama-family model writes its adapters this way
beside lmforge's own `adapter.safetensors`, so that `peft.PeftModel.from_pretrained(base,
RUN_DIR)` puts them on the transformers model; and `--adapter` accepts a folder written by
`peft` itself. PEFT names each Hugging Face projection separately where lmforge fuses the
query, key and value projections into one `attn.c_attn`:
- out: the fused adapter (A shared, B stacked) is exactly three adapters with the same A
  and B cut by rows;
- in: each adapter's update scale·B·A is added to its rows of the fused weight (adapters
  are merged on load, as lmforge's own are).
"""

from __future__ import annotations

import json
import math
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


def save_peft_adapter(model: nn.Module, m: ModelConfig, out: Path, base: str, rank: int, alpha: float,
                      dropout: float) -> None:  # fmt: skip
    """Write the model's LoRA adapters as PEFT files in `out`."""
    from lmforge.adapters.lora import LoRALinear

    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        _, layer, local = name.split(".", 2)  # blocks.N.<local>
        where = f"{PREFIX}model.layers.{layer}."
        a, b = module.lora_A.detach().float().cpu(), module.lora_B.detach().float().cpu()
        parts = ({f"self_attn.{p}": b[rows] for p, rows in _fused_rows(m).items()} if local == "attn.c_attn"
                 else {MODULES[local]: b})  # fmt: skip
        for hf_name, b_part in parts.items():
            tensors[f"{where}{hf_name}.lora_A.weight"] = a.clone()
            tensors[f"{where}{hf_name}.lora_B.weight"] = b_part.contiguous()
            targets.add(hf_name.rsplit(".", 1)[-1])
    save_tensors(out / WEIGHTS, tensors)
    atomic_write_json(out / CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
        "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
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
    with torch.no_grad():
        for module in modules:
            target, rows = _lmforge_target(module.removeprefix(PREFIX), m)
            if target not in params:
                raise mismatch
            a, b = tensors[f"{module}.lora_A.weight"].float(), tensors[f"{module}.lora_B.weight"].float()
            weight = params[target]
            region = weight[rows] if rows is not None else weight
            if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(region.shape):
                raise mismatch
            region += (scale * (b @ a)).to(weight.dtype)
    return model


def _lmforge_target(module: str, m: ModelConfig) -> tuple[str, slice | None]:
    """`model.layers.3.self_attn.k_proj` → (`blocks.3.attn.c_attn.weight`, the key rows)."""
    parts = module.split(".")
    if len(parts) != 5 or parts[:2] != ["model", "layers"]:
        return module, None  # not a projection inside a layer (lm_head, embed_tokens): no such target
    layer, local = parts[2], ".".join(parts[3:])
    if parts[-1] in ("q_proj", "k_proj", "v_proj"):
        return f"blocks.{layer}.attn.c_attn.weight", _fused_rows(m)[parts[-1]]
    ours = {hf: lm for lm, hf in MODULES.items()}.get(local)
    return (f"blocks.{layer}.{ours}.weight" if ours else module), None
