"""Loading a checkpoint for inference: device, precision, int8 weight-only quantisation,
and matrix-vector products that use every CPU core.

int8 quantisation stores each linear layer's weight as int8 with one float scale
per output channel (symmetric, round to nearest). Which kernel multiplies depends
on the hardware, because the fast int8 paths are hardware-specific:
- CPUs with AVX-512: PyTorch's int8 weight-pack kernel (weight-only: activations stay float);
- other x86 CPUs (AVX2): FBGEMM's dynamically quantised linear kernel, which also
  quantises each input to int8 on the fly (the only fast int8 path PyTorch has there);
- elsewhere (GPUs): the weight is dequantised on the fly (saves memory, not time).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.device import DTYPES, resolve_device
from lmforge.errors import UserError


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight_int8", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = _choose_kernel(weight.device)
        if self.kernel == "fbgemm":
            with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated
                warnings.simplefilter("ignore")
                quantized = torch.quantize_per_channel(
                    weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
                )
            bias = None if linear.bias is None else linear.bias.detach().float()
            self._packed = torch.ops.quantized.linear_prepack(quantized, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            shape = x.shape
            y = torch.ops.quantized.linear_dynamic(x.float().reshape(-1, shape[-1]), self._packed, True)
            return y.reshape(*shape[:-1], -1).to(x.dtype)
        if self.kernel == "pack" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, shape[-1]), self.weight_int8, self.scale.to(x.dtype)
            ).reshape(*shape[:-1], -1)
            return y + self.bias if self.bias is not None else y
        weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, weight, self.bias)


class BlockedMatvecLinear(nn.Module):
    """nn.Linear whose products with a few rows use every CPU core.

    Decoding one token at a time makes each linear layer a matrix-vector product, bound
    by reading the weight from memory. PyTorch's CPU kernel for it runs on one core, which
    reads about half of what the memory can deliver (measured here: 14 GB/s of 28 GB/s).
    Viewing the weight as a batch of row blocks turns the product into a batched one that
    PyTorch spreads over the cores (26 GB/s here). Same parameters, same state-dict keys;
    larger inputs (prefill, training) take the ordinary path.
    """

    MAX_ROWS = 8  # beyond this the ordinary matrix-matrix kernel is already multi-threaded
    BLOCKS = 4  # measured best here among 2-16 (two cores); more blocks only add bookkeeping

    def __init__(self, linear: nn.Linear, blocks: int = BLOCKS):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # shared, so tied weights stay tied
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocks = blocks
        # Rows that split evenly into blocks; the remainder (if any) is a small ordinary product.
        self.blocked_rows = self.out_features - self.out_features % blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.MAX_ROWS or x.dtype != self.weight.dtype or not self.weight.is_contiguous():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        blocked = self.weight[: self.blocked_rows].view(self.blocks, -1, self.in_features)
        columns = flat.t().expand(self.blocks, -1, -1)  # the same input for every block, not copied
        if self.bias is None:
            y = torch.bmm(blocked, columns)
        else:  # bias added inside the product: one pass over the output
            y = torch.baddbmm(self.bias[: self.blocked_rows].view(self.blocks, -1, 1), blocked, columns)
        y = y.view(self.blocked_rows, rows).t() if rows > 1 else y.view(1, self.blocked_rows)
        if self.blocked_rows < self.out_features:
            rest = self.weight[self.blocked_rows :]
            bias = None if self.bias is None else self.bias[self.blocked_rows :]
            y = torch.cat([y, F.linear(flat, rest, bias)], dim=1)
        return y.reshape(*x.shape[:-1], self.out_features)


def use_blocked_matvec(model: nn.Module, min_weight: int = 1 << 18) -> nn.Module:
    """Replace every float32 CPU nn.Linear of at least `min_weight` weights with
    BlockedMatvecLinear (in place); returns the model. Smaller weights (1 MB by default)
    stay in the CPU's cache, where the one-core kernel is already fast and splitting only
    adds work (measured: a 128-wide model decodes 3-20% slower when converted)."""
    for name, child in list(model.named_children()):
        if (
            isinstance(child, nn.Linear)
            and child.weight.device.type == "cpu"
            and child.weight.dtype == torch.float32
            and child.weight.numel() >= min_weight
            and child.out_features >= BlockedMatvecLinear.BLOCKS
        ):
            setattr(model, name, BlockedMatvecLinear(child))
        else:
            use_blocked_matvec(child, min_weight)
    return model


def _choose_kernel(device: torch.device) -> str:
    if device.type != "cpu":
        return "dequantize"
    from lmforge.device import cpu_has_bf16

    if cpu_has_bf16():  # AVX-512 BF16 implies the AVX-512 paths of the int8 weight-pack kernel
        return "pack"
    if "fbgemm" in torch.backends.quantized.supported_engines:
        return "fbgemm"
    return "dequantize"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in the model with Int8Linear (in place); returns the model."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model


def load_for_inference(
    path: str,
    device: str = "cpu",
    dtype: str = "float32",
    quantize: str | None = None,
    adapter: str | None = None,
):
    """A checkpoint's model (eval mode) and tokenizer, at the requested precision; `adapter`:
    a LoRA adapter for this base (from `lmforge finetune`, or a PEFT folder), merged in before anything else."""
    from lmforge.checkpoint import load_checkpoint

    if dtype not in DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    if quantize not in (None, "", "none", "int8"):
        raise UserError(f"Unknown quantisation {quantize!r}; use int8 (or none).")
    model, tokenizer, config = load_checkpoint(path, resolve_device(device))
    if adapter:
        from lmforge.interop.peft import is_peft_adapter, load_peft_adapter
        from lmforge.training.lora import load_adapter

        if is_peft_adapter(adapter):  # a folder written by peft (or by finetune, beside adapter.safetensors)
            load_peft_adapter(model, config.model, adapter)
        else:
            load_adapter(model, adapter)
    model = model.to(DTYPES[dtype])
    if quantize == "int8":
        # Every linear layer, the output head included; a tied embedding table stays float
        # (the head gets its own int8 copy).
        quantize_int8(model)
    else:
        use_blocked_matvec(model)
    return model.eval(), tokenizer
