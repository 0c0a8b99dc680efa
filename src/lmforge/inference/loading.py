"""Loading a checkpoint for inference: device, precision, int8 and 4-bit weight-only quantisation,
and matrix-vector products that use every CPU core.

int8 quantisation stores each linear layer's weight as int8 with one float scale
per output channel (symmetric, round to nearest). Which kernel multiplies is measured on
this CPU for each weight shape (kernels.py), among PyTorch's int8 weight-pack kernel
(weight-only: activations stay float), lmforge's own weight-only kernel (native/, compiled
for this CPU on first use), FBGEMM's dynamically quantised linear kernel (it also quantises
each input to int8 on the fly) and dequantising on the fly: which one is fast depends on the
CPU, not on a flag. On GPUs the weight is dequantised on the fly (saves memory, not time).
4-bit quantisation (`Int4Linear`) keeps blocks of 32 weights with a scale and minimum each
(llama.cpp's Q4_1 layout) and multiplies with lmforge's native kernel. When the requested
precision (int8, bfloat16) measures slower than float32 here, loading says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.device import DTYPES, resolve_device
from lmforge.errors import UserError
from lmforge.inference.kernels import BlockedMatvecLinear
from lmforge.inference.native import int4_linear, int8_linear

if TYPE_CHECKING:
    from lmforge.checkpoint import Checkpoint


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
        self.kernel = _choose_kernel(weight.device, self.in_features, self.out_features)
        # Whether prompts (many rows) go to the native kernel too: measured on first use (None till then).
        self.native_prompts: bool | None = None
        # The native kernel's inputs rounded to int8 per block of 64 (quantize_int8's int8_inputs,
        # where native.int8_inputs_pay()), else to int16; prompts as _prompts_natively measures.
        self.int8_inputs = False
        if self.kernel == "fbgemm":
            with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated
                warnings.simplefilter("ignore")
                quantized = torch.quantize_per_channel(
                    weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
                )
            bias = None if linear.bias is None else linear.bias.detach().float()
            self._packed = torch.ops.quantized.linear_prepack(quantized, bias)

    def _prompts_natively(self) -> bool:
        if self.native_prompts is None:  # where it measures faster than dequantising for a float product
            self.native_prompts = _native_prompts_pay(self.in_features, self.out_features, self.int8_inputs)
        return self.native_prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.kernel == "native"
            and x.device.type == "cpu"
            and (x.numel() <= 16 * self.in_features or self._prompts_natively())
            and not (x.requires_grad and torch.is_grad_enabled())  # the C kernel has no backward
        ):
            if not hasattr(self, "_scale32"):  # the C kernel takes float32 scales and bias
                self._scale32 = self.scale.float().contiguous()
                self._bias32 = None if self.bias is None else self.bias.detach().float().contiguous()
            if x.dtype != torch.float32:
                return int8_linear(
                    x.float(), self.weight_int8, self._scale32, self._bias32, self.int8_inputs
                ).to(x.dtype)
            return int8_linear(x, self.weight_int8, self._scale32, self._bias32, self.int8_inputs)
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


INT4_BLOCK = 32  # weights along a row that share a 4-bit scale and minimum (native/int8_dot.h)


def quantize_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weight` (out, in; in a multiple of 32) in 4 bits per block of 32 along each row: (packed
    uint8 (out, in / 2), scale, minimum (out, in / 32) float16), each value scale * q + minimum with q
    in 0..15: llama.cpp's Q4_1, 0.625 bytes a weight, so SmolLM2's Q4_1 weights come back as they
    were. Byte j of a block holds value j in its low four bits and value 16 + j in its high four."""
    out_features, in_features = weight.shape
    if in_features % INT4_BLOCK:
        raise ValueError(f"4-bit blocks need an input width that is a multiple of {INT4_BLOCK}, not {in_features} "
                         "(quantize_int4 keeps such layers int8)")  # fmt: skip
    blocks = weight.detach().float().reshape(out_features, in_features // INT4_BLOCK, INT4_BLOCK)
    low, high = blocks.amin(dim=2), blocks.amax(dim=2)
    # Half-precision scale and minimum (what the kernel reads); q is rounded against those values.
    minimum = low.half()
    scale = ((high - minimum.float()) / 15.0).half()
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(low))  # a constant block: every q is 0
    q = ((blocks - minimum.float()[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    half = INT4_BLOCK // 2
    packed = (q[..., :half] | (q[..., half:] << 4)).reshape(out_features, in_features // 2)
    return packed.contiguous(), scale.contiguous(), minimum.contiguous()


def dequantize_4bit(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The float32 weight (out, in) that `quantize_4bit`'s three tensors stand for."""
    out_features = packed.shape[0]
    pairs = packed.reshape(out_features, -1, INT4_BLOCK // 2)
    q = torch.cat([pairs & 0x0F, pairs >> 4], dim=2).float()
    return (q * scale.float()[..., None] + minimum.float()[..., None]).reshape(out_features, -1)


class Int4Linear(nn.Module):
    """A linear layer whose weight is 4-bit in blocks of 32, each with a float scale and minimum
    (`quantize_4bit`): 0.625 bytes a weight (half a byte, and two float16 per 32) against int8's 1.
    Multiplied by lmforge's native kernel on the CPU (int4_linear, compiled for this CPU);
    elsewhere, for gradients or without a compiler, by a float product over the dequantised weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        packed, scale, minimum = quantize_4bit(linear.weight)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("block_scale", scale)
        self.register_buffer("block_min", minimum)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = "native"  # or "dequantize": the float product always (a reference in tests)
        self.native_prompts: bool | None = None  # prompts by the native kernel: measured on first use

    def _native(self, x: torch.Tensor) -> bool:
        if self.kernel != "native" or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return False
        if _native_unavailable():
            return False
        if x.numel() <= 16 * self.in_features:
            return True
        if self.native_prompts is None:
            self.native_prompts = _native_prompts_pay_4bit(self)
        return self.native_prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):
            if not hasattr(self, "_bias32"):
                self._bias32 = None if self.bias is None else self.bias.detach().float().contiguous()
            y = int4_linear(x.float(), self.weight_int4, self.block_scale, self.block_min, self._bias32)
            return y.to(x.dtype)
        weight = dequantize_4bit(self.weight_int4, self.block_scale, self.block_min).to(x.dtype)
        return F.linear(x, weight, self.bias)


def _native_unavailable() -> bool:
    from lmforge.inference.kernels import native_available

    return not native_available()


def _native_prompts_pay_4bit(layer: Int4Linear) -> bool:
    from lmforge.inference.kernels import PROMPT_ROWS, fastest_prompt_kernel

    def candidates():
        x = torch.randn(PROMPT_ROWS, layer.in_features)
        parts = (layer.weight_int4, layer.block_scale, layer.block_min)
        return {"native": lambda: int4_linear(x, *parts, None),
                "dequantize": lambda: F.linear(x, dequantize_4bit(*parts))}  # fmt: skip

    names = ("native", "dequantize")
    return fastest_prompt_kernel("int4", layer.in_features, layer.out_features, names, candidates) == "native"


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


def _int8_inputs_pay(model: nn.Module) -> bool:
    """Whether an int8 model on this CPU rounds its inputs to int8 (VNNI, AMX: native/int8_inputs.h),
    which measures faster here for several rows, or to int16 (weight-only int8)."""
    if next(model.parameters()).device.type != "cpu":
        return False
    from lmforge.inference.native import int8_inputs_pay

    return int8_inputs_pay()


def _native_prompts_pay(in_features: int, out_features: int, int8_inputs: bool) -> bool:
    from lmforge.inference.kernels import native_prompt_pays

    return native_prompt_pays(in_features, out_features, int8_inputs)


def _choose_kernel(device: torch.device, in_features: int, out_features: int) -> str:
    if device.type != "cpu":
        return "dequantize"
    from lmforge.inference.kernels import fastest_int8_kernel

    return fastest_int8_kernel(in_features, out_features)


# A short mixed text: the next-token choices of the float model on it are what int8 must keep.
PROBE_TEXT = ("The capital of France is Paris, and the river that runs through it is the Seine.\n"
              "def add(a, b):\n    return a + b\n\nROMEO: But soft, what light through yonder window breaks?")  # fmt: skip


@torch.no_grad()
def _probe(model: nn.Module, tokenizer) -> tuple[Callable[[], torch.Tensor], torch.Tensor] | None:
    """A function giving the model's next-token choices on the probe text, and the float model's
    choices (CPU models only). An encoder–decoder reads the text as its source and as its target."""
    from lmforge.seq2seq.model import Seq2Seq

    device = next(model.parameters()).device
    longest = min(getattr(model, "block_size", 64), getattr(model, "source_block_size", 1 << 30))
    ids = tokenizer.encode(PROBE_TEXT)[:longest]
    if device.type != "cpu" or len(ids) < 8:
        return None
    idx = torch.tensor([ids], device=device)
    if isinstance(model, Seq2Seq):
        valid = torch.ones_like(idx, dtype=torch.bool)
        choices = lambda: model(idx, valid, idx)[0][0].argmax(-1)  # noqa: E731
    else:
        choices = lambda: model(idx)[0][0].argmax(-1)  # noqa: E731
    return choices, choices()


@torch.no_grad()
def _keep_int8_faithful(
    model: nn.Module, probe: tuple[Callable[[], torch.Tensor], torch.Tensor] | None
) -> str | None:
    """FBGEMM's int8 kernel quantises the activations too; models with activation outliers lose
    their predictions to it (SmolLM2: perplexity 31.8 -> 82.4). When more than 10% of the probe's
    next-token choices change, switch to weight-only int8 and say so."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear) and m.kernel == "fbgemm"]
    if probe is None or not layers:
        return None
    choices, reference = probe
    changed = (choices() != reference).float().mean().item()
    if changed <= 0.10:
        return None
    from lmforge.inference.kernels import fastest_int8_kernel

    for layer in layers:
        layer.kernel = fastest_int8_kernel(layer.in_features, layer.out_features, weight_only=True)
    after = (choices() != reference).float().mean().item()
    return (f"int8 with quantised activations (FBGEMM, the fastest int8 kernel here) changed {100 * changed:.0f}% "
            f"of this model's next-token choices on a sample text; using weight-only int8 instead "
            f"({100 * after:.0f}% changed), which keeps quality.")  # fmt: skip


def linear_shapes(model: nn.Module) -> dict[tuple[int, int], int]:
    """(in_features, out_features) of the model's linear layers -> how many there are."""
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear | Int8Linear | BlockedMatvecLinear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def slower_precision_notice(model: nn.Module, precision: str) -> str | None:
    """A sentence when `precision` (int8 or bfloat16) decodes slower than float32 on this CPU,
    counting each int8 layer at the kernel it actually uses; an encoder–decoder at the rows it decodes
    together."""
    from lmforge.inference.kernels import PROMPT_ROWS, batched_precision_report, precision_report, timings
    from lmforge.seq2seq.model import Seq2Seq

    unit = "per token"
    if precision == "int8":
        chosen = float32 = 0.0
        native_step = getattr(model, "native_decoder", None) is not None  # every product by the native kernel
        for layer in model.modules():
            if isinstance(layer, Int8Linear):
                measured = timings(layer.in_features, layer.out_features)
                chosen += measured.get("int8-native" if native_step else f"int8-{layer.kernel}", 0.0)
                float32 += min(t for name, t in measured.items() if name in ("float32", "float32-blocked"))
    elif isinstance(model, Seq2Seq):
        # transduce steps at least seq2seq.DECODE_ROWS (= PROMPT_ROWS) hypotheses together, not one
        chosen, float32 = batched_precision_report(linear_shapes(model), PROMPT_ROWS)
        unit = f"per step of {PROMPT_ROWS} hypotheses"
    else:
        native_step = getattr(model, "native_decoder", None) is not None
        chosen, float32 = precision_report(linear_shapes(model), precision, native_step)
    if chosen <= 1.05 * float32:
        return None
    option = "--quantize int8" if precision == "int8" else "--dtype bfloat16"
    return (f"{option} measures {float32 / chosen:.2f}x float32's decoding speed on this CPU "
            f"({1e3 * chosen:.2f} vs {1e3 * float32:.2f} ms of matrix products {unit}): it saves memory, "
            f"not time; leave it out for speed.")  # fmt: skip


def fuse_projections(model: nn.Module) -> nn.Module:
    """SwiGLU's gate and up projections as one product in every MLP (in place; inference only)."""
    from lmforge.models.gpt import MLP

    for module in model.modules():
        if isinstance(module, MLP):
            module.fuse_gate_up()
    return model


def quantize_int8(model: nn.Module, int8_inputs: bool = False) -> nn.Module:
    """Replace every nn.Linear in the model with Int8Linear (in place); returns the model.
    `int8_inputs`: the layers take the native kernel with inputs rounded to int8 per block of 64
    (VNNI, AMX tiles; native/int8_inputs.h; a build without them rounds to int16 as always)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            layer = Int8Linear(child)
            if int8_inputs and layer.weight_int8.device.type == "cpu":
                layer.kernel, layer.int8_inputs = "native", True
            setattr(model, name, layer)
        else:
            quantize_int8(child, int8_inputs)
    return model


def quantize_int4(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear with Int4Linear (in place); returns the model. The output head, and
    layers whose input width is not a multiple of 32, become weight-only int8 instead: next-token
    choices hang on the head's precision (SmolLM2's head, Q8_0 in its GGUF, at 4 bits changed 18% of
    them on the probe text; llama.cpp keeps heads at 6-8 bits too)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            if child.in_features % INT4_BLOCK == 0 and name != "lm_head":
                setattr(model, name, Int4Linear(child))
            else:
                layer = Int8Linear(child)
                if layer.kernel == "fbgemm":  # it rounds activations too: weight-only, like the rest
                    from lmforge.inference.kernels import fastest_int8_kernel

                    layer.kernel = fastest_int8_kernel(
                        layer.in_features, layer.out_features, weight_only=True
                    )
                setattr(model, name, layer)
        else:
            quantize_int4(child)
    return model


def load_for_inference(
    path: str | Checkpoint,
    device: str = "cpu",
    dtype: str = "float32",
    quantize: str | None = None,
    adapter: str | None = None,
    notice: Callable[[str], None] | None = None,
    compile: bool = False,
):
    """A checkpoint's model (eval mode) and tokenizer (`path`: a folder, file or hub id, or a checkpoint
    already opened), at the requested precision; `adapter`:
    a LoRA adapter for this base (from `lmforge finetune`, or a PEFT folder), merged in before anything else.
    `notice` (default: a warning) hears when the requested precision is slower than float32 here.
    `compile`: generate with a compiled one-token decode step (GPT models; see compiled.py)."""
    from lmforge.checkpoint import load_checkpoint

    if dtype not in DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    if quantize not in (None, "", "none", "int8", "int4"):
        raise UserError(f"Unknown quantisation {quantize!r}; use int8 or int4 (or none).")
    if compile and quantize in ("int8", "int4"):  # the quantised kernels are opaque to torch.compile
        raise UserError(f"--compile works with float weights; leave out --quantize {quantize} or --compile.")
    model, tokenizer, config = load_checkpoint(path, resolve_device(device))
    if adapter:
        from lmforge.adapters.lora import load_adapter
        from lmforge.adapters.peft import is_peft_adapter, load_peft_adapter

        if is_peft_adapter(adapter):  # a folder written by peft (or by finetune, beside adapter.safetensors)
            load_peft_adapter(model, config.model, adapter)
        else:
            load_adapter(model, adapter)
    model = model.to(DTYPES[dtype])
    fuse_projections(model)
    if quantize == "int8":
        # Every linear layer, the output head included; a tied embedding table stays float
        # (the head gets its own int8 copy).
        probe = _probe(model, tokenizer)
        quantize_int8(model, int8_inputs=_int8_inputs_pay(model))
        message = _keep_int8_faithful(model, probe)
        if message:
            (notice or (lambda m: warnings.warn(m, stacklevel=2)))(message)
        if not compile:  # one native call per decoded token, where it measures faster (native/decoding.py)
            from lmforge.inference.native.decoding import attach

            attach(model)
    elif quantize == "int4":
        # 4-bit weights in blocks of 32, the head int8 (a tied embedding table stays float).
        quantize_int4(model)
        from lmforge.inference.native.decoding import attach

        attach(model)
    else:
        use_blocked_matvec(model)
        if not compile:  # float32 / bfloat16 weights: the native step where it measures faster, as above
            from lmforge.inference.native.decoding import attach

            attach(model)
    precision = "int8" if quantize == "int8" else "bfloat16" if dtype == "bfloat16" else None
    if precision and next(model.buffers(), next(model.parameters())).device.type == "cpu":
        message = slower_precision_notice(model, precision)
        if message:
            (notice or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    if compile:
        from lmforge.inference.compiled import can_compile

        if not can_compile(model):
            raise UserError("--compile speeds up GPT models only; leave it out for this checkpoint.")
        model.compile_decoding = True
    return model.eval(), tokenizer
