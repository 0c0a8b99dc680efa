"""A whole decode step in one native call (decode_step.c), for GPT models on the CPU.

`why_not_native(model)` says whether the C step computes the model (a GPT on the CPU whose linear
layers are Int8Linear, Int4Linear, or float32 / bfloat16 nn.Linear; float32 or bfloat16 elsewhere);
`NativeDecoder(model)` lays out pointers to its tensors once; `decoder.step(tokens, positions, cache)`
then does what
`model(tokens[:, None], cache=cache, positions=positions[:, None])` does for one new token per row,
in one call instead of ~50 operator calls per layer. `attach(model)` (at load) gives the model
a decoder where it measures faster, and `step_logits` is what generation and serving call. The
tensors are the model's own (not copied where already float32 and contiguous); the decoder keeps a
reference to every tensor it points at, so its memory outlives any change made to the model.
Activations and the KV cache are float32 whatever the weights (a model with a native decoder makes
float32 caches: GPT.new_cache).

Measured (SmolLM2-135M int8, 2-core AVX2 EPYC; benchmarks/vs_llamacpp.py): see docs/performance.md.
"""

from __future__ import annotations

import ctypes
import time
from functools import partial

import torch
import torch.nn as nn

from lmforge.inference.native import library
from lmforge.models.gpt import GPT, KVCache

ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "relu2": 2, "swiglu": 3}


class _Linear(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("weight4", ctypes.c_void_p),
                ("block_scale", ctypes.c_void_p), ("block_min", ctypes.c_void_p), ("weight32", ctypes.c_void_p),
                ("weight_bf16", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64),
                ("int8_inputs", ctypes.c_int64)]  # fmt: skip


class _Norm(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln_1", _Norm), ("ln_2", _Norm), ("qkv", _Linear), ("attn_out", _Linear), ("up", _Linear),
                ("down", _Linear)]  # fmt: skip


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "hidden",
                                              "vocab", "rms_norm", "activation", "qk_norm", "rotary",
                                              "token_bf16")),
        ("norm_eps", ctypes.c_float), ("logit_softcap", ctypes.c_float),
        ("token_table", ctypes.c_void_p), ("position_table", ctypes.c_void_p), ("rope_inv_freq", ctypes.c_void_p),
        ("ln_f", _Norm), ("head", _Linear), ("layers", ctypes.POINTER(_Layer)),
    ]  # fmt: skip


class _Cache(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("valid", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("layer_stride", "row_stride", "valid_stride", "capacity",
                                                      "slot", "chain"))]  # fmt: skip


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def why_not_native(model: nn.Module) -> str | None:
    """None when the native step computes this model; else what stands in the way."""
    if not isinstance(model, GPT):
        return "only GPT models have a native decode step"
    if model.wte.weight.device.type != "cpu":
        return "the native decode step runs on the CPU"
    if model.config.activation not in ACTIVATIONS:
        return f"the native decode step has no {model.config.activation} activation"
    if library() is None:
        from lmforge.inference.native import why_unavailable

        return f"lmforge's native code is unavailable: {why_unavailable()}"
    linears = [model.lm_head]
    for block in model.blocks:
        mlp = block.mlp
        if mlp.activation == "swiglu" and mlp.c_gate_up is None:
            return "SwiGLU's gate and up projections are not fused (inference.fuse_projections)"
        linears += [block.attn.c_attn, block.attn.c_proj, mlp.c_gate_up or mlp.c_fc, mlp.c_proj]
    if not all(_quantized(layer) or _float_weight(layer) is not None for layer in linears):
        return "the native decode step takes linear layers with int8, 4-bit, float32 or bfloat16 weights"
    floats = [model.wte.weight, *(p for name, p in model.named_parameters() if "ln" in name)]
    if any(t.dtype not in (torch.float32, torch.bfloat16) for t in floats):
        return "the native decode step reads float32 or bfloat16 weights (not float16)"
    return None


def _quantized(layer: nn.Module) -> bool:
    # Int8Linear / Int4Linear (inference.py, which imports this module): recognised by their weights
    return getattr(layer, "weight_int8", None) is not None or getattr(layer, "weight_int4", None) is not None


def _float_weight(layer: nn.Module) -> torch.Tensor | None:
    """The float32 or bfloat16 weight (out, in) of an nn.Linear or BlockedMatvecLinear; else None."""
    from lmforge.inference.kernels import BlockedMatvecLinear

    if not isinstance(layer, nn.Linear | BlockedMatvecLinear):
        return None
    weight = layer.weight
    return weight if weight.dtype in (torch.float32, torch.bfloat16) else None


def _no_decoder() -> None:
    return None


class NativeDecoder:
    """The C decode step bound to one model's tensors."""

    def __reduce__(self):
        # A copied or pickled model comes back without a decoder (its forward pass decodes; attach()
        # gives it its own): this one points at the original's memory by address.
        return _no_decoder, ()

    def __init__(self, model: GPT):
        cfg = model.config
        # Most rows a step takes natively (None: any number); larger batches take the forward
        # pass. Measured the first time a step has more than ALWAYS_NATIVE_ROWS rows (`row_limit`).
        self.max_rows: int | None = None
        self.rows_measured = False
        self._keep: list[torch.Tensor] = []  # every tensor the C code reads, kept alive
        layers = (_Layer * cfg.n_layer)()
        for layer, block in zip(layers, model.blocks, strict=True):
            mlp = block.mlp
            layer.ln_1, layer.ln_2 = self._norm(block.ln_1), self._norm(block.ln_2)
            layer.qkv, layer.attn_out = self._linear(block.attn.c_attn), self._linear(block.attn.c_proj)
            layer.up, layer.down = self._linear(mlp.c_gate_up or mlp.c_fc), self._linear(mlp.c_proj)
        attention = model.blocks[0].attn
        first_mlp = model.blocks[0].mlp
        positions = getattr(model, "wpe", None)
        position_table = positions.weight if positions is not None else getattr(model, "pos_table", None)
        self._model = _Model(
            n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=attention.n_head, n_kv_head=attention.n_kv_head,
            head_dim=attention.head_dim, hidden=first_mlp.c_proj.in_features, vocab=cfg.vocab_size,
            rms_norm=int(cfg.norm == "rmsnorm"), activation=ACTIVATIONS[cfg.activation], qk_norm=int(cfg.qk_norm),
            rotary=int(cfg.pos_encoding == "rope"), norm_eps=cfg.norm_eps, logit_softcap=cfg.logit_softcap,
            token_bf16=int(model.wte.weight.dtype == torch.bfloat16), token_table=self._table(model.wte.weight),
            position_table=_pointer(self._float(position_table)),
            rope_inv_freq=_pointer(self._float(getattr(model, "rope_inv_freq", None))),
            ln_f=self._norm(model.ln_f), head=self._linear(model.lm_head), layers=layers,
        )  # fmt: skip
        self._layers = layers
        self.vocab = cfg.vocab_size
        # Rows of the position table (rotary positions have no table: any position is fine).
        self.positions = position_table.shape[0] if position_table is not None else 2**62
        self._function = library().decode_step

    def _float(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        tensor = tensor.detach().float().contiguous()
        self._keep.append(tensor)
        return tensor

    def _table(self, table: torch.Tensor) -> int:
        """The token table as it is when bfloat16 (the C code widens one row a token), else float32."""
        if table.dtype == torch.bfloat16:
            table = table.detach().contiguous()
            self._keep.append(table)
            return table.data_ptr()
        return self._float(table).data_ptr()

    def _norm(self, norm: nn.Module) -> _Norm:
        return _Norm(_pointer(self._float(norm.weight)), _pointer(self._float(getattr(norm, "bias", None))))

    def _linear(self, layer: nn.Module) -> _Linear:
        bias = _pointer(self._float(layer.bias))
        weight = _float_weight(layer)
        if weight is not None:  # the model's own memory where already contiguous (no copy)
            weight = weight.detach().contiguous()
            self._keep.append(weight)
            float32, bfloat16 = (weight, None) if weight.dtype == torch.float32 else (None, weight)
            return _Linear(None, None, None, None, None, _pointer(float32), _pointer(bfloat16), bias,
                           layer.in_features, layer.out_features)  # fmt: skip
        if getattr(layer, "weight_int4", None) is not None:
            parts = [
                t.contiguous() for t in (layer.weight_int4, layer.block_scale.half(), layer.block_min.half())
            ]
            self._keep += parts  # alive as long as the decoder, whatever happens to the model
            return _Linear(None, None, *(t.data_ptr() for t in parts), None, None, bias, layer.in_features,
                           layer.out_features)  # fmt: skip
        weight = layer.weight_int8.contiguous()
        self._keep.append(weight)
        return _Linear(weight.data_ptr(), self._float(layer.scale).data_ptr(), None, None, None, None, None, bias,
                       layer.in_features, layer.out_features, int(layer.int8_inputs))  # fmt: skip

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, chain: bool = False
    ) -> torch.Tensor:
        """Append one token per row (`tokens`, `positions`: (B,)) to `cache` and return the next-token
        logits (B, vocab), as the model's forward pass with that cache would. `chain`: the tokens are
        consecutive tokens of the cache's one sequence instead (speculative decoding checks a draft so:
        the logits after each of them, one weight read for all)."""
        rows = tokens.shape[0]
        if chain and cache.k.shape[1] != 1:
            raise ValueError("a chain of tokens extends a cache of one sequence")
        k, v, valid = cache.k, cache.v, cache.valid
        # The C code reads memory by address: anything out of range is refused here, not read there.
        if k.device.type != "cpu" or tokens.device.type != "cpu" or positions.device.type != "cpu":
            raise ValueError("the native decode step runs on CPU tensors")
        if rows and not (0 <= int(tokens.min()) and int(tokens.max()) < self.vocab):
            raise ValueError(f"token ids must lie in [0, {self.vocab})")
        if rows and not (0 <= int(positions.min()) and int(positions.max()) < self.positions):
            raise ValueError(f"positions must lie in [0, {self.positions})")
        if (
            k.dtype != torch.float32
            or k.stride(-1) != 1
            or k.stride(-2) != k.shape[-1]
            or valid.stride(1) != 1
        ):
            raise ValueError("the native decode step needs a float32 cache with contiguous slots")
        if k.stride(2) != k.shape[3] * k.shape[4]:
            raise ValueError("the native decode step needs a cache whose heads are contiguous")
        new = rows if chain else 1
        cache.make_room(new)
        slot = cache.length
        valid[:, slot : slot + new] = True
        cache_view = _Cache(k.data_ptr(), v.data_ptr(), valid.data_ptr(), k.stride(0), 0 if chain else k.stride(1),
                            0 if chain else valid.stride(0), cache.capacity, slot, int(chain))  # fmt: skip
        tokens = tokens.to(torch.int64).contiguous()
        positions = positions.to(torch.int64).contiguous()
        logits = torch.empty(rows, self.vocab, dtype=torch.float32)
        failed = self._function(ctypes.byref(self._model), ctypes.byref(cache_view), tokens.data_ptr(),
                                positions.data_ptr(), rows, logits.data_ptr(), torch.get_num_threads())  # fmt: skip
        if failed:
            raise MemoryError("the native decode step could not allocate its scratch memory")
        cache.length += new
        return logits


def step_logits(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Append one token per row (`tokens`, `positions`: (B,)) to `cache`; the next-token logits (B, vocab).
    By the model's native decoder when it has one (see `attach`), else by its forward pass."""
    decoder = getattr(model, "native_decoder", None)
    if decoder is not None and isinstance(cache, KVCache):
        rows = tokens.shape[0]
        if rows > ALWAYS_NATIVE_ROWS and not decoder.rows_measured:
            decoder.max_rows, decoder.rows_measured = row_limit(model, decoder), True
        if decoder.max_rows is None or rows <= decoder.max_rows:
            if cache.k.dtype == torch.float32:
                return decoder.step(tokens, positions, cache)
        else:  # too many rows for the C step: the forward pass, on a cache of the weights' own dtype
            weight_dtype = model.wte.weight.dtype
            if cache.k.dtype != weight_dtype:  # (converted once: later steps find it converted)
                cache.k, cache.v = cache.k.to(weight_dtype), cache.v.to(weight_dtype)
    return model(tokens[:, None], cache=cache, positions=positions[:, None])[0][:, -1]


def chain_logits(model: nn.Module, tokens: list[int], position: int, cache) -> torch.Tensor:
    """Append consecutive tokens of the cache's one sequence (the first at `position`) to `cache`; the
    next-token logits after each of them (len(tokens), vocab): by the native decoder in one call when
    the model has one, else by its forward pass."""
    decoder = getattr(model, "native_decoder", None)
    device = cache.k.device if isinstance(cache, KVCache) else None
    ids = torch.tensor(tokens, device=device)
    positions = torch.arange(position, position + len(tokens), device=device)
    if decoder is not None and isinstance(cache, KVCache) and cache.k.dtype == torch.float32:
        return decoder.step(ids, positions, cache, chain=True)
    mask = torch.ones(1, len(tokens), dtype=torch.bool, device=device)
    return model(ids[None], cache=cache, positions=positions[None], attention_mask=mask)[0][0]


@torch.inference_mode()
def _seconds_per_step(
    step, model: GPT, prompt: int, repeats: int = 3, dtype: torch.dtype | None = None, rows: int = 1
) -> float:
    """Median time of a decode step of `rows` rows by `step` after a `prompt`-token prompt (a cache of `dtype`)."""
    cache = model.new_cache(rows, capacity=prompt + repeats + 1, dtype=dtype)
    model(torch.zeros(rows, prompt, dtype=torch.long), cache=cache)
    samples = []
    for _ in range(repeats + 1):  # the first one warms up
        start = time.perf_counter()
        step(torch.zeros(rows, dtype=torch.long), torch.full((rows,), cache.length), cache)
        samples.append(time.perf_counter() - start)
    return sorted(samples[1:])[repeats // 2]


def _forward_step(
    model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    return model(tokens[:, None], cache=cache, positions=positions[:, None])[0]


# The C step wins where a step is dispatch and reading weights; with many rows a step is
# arithmetic, where PyTorch's matrix products can win (SmolLM2 in bfloat16 on a Zen 4: 94 against
# 65 ms a step at 32 rows, 162 against 111 at 64; in float32 the C step stayed faster up to 64).
ALWAYS_NATIVE_ROWS = 8  # up to here the C step is taken without asking (what attach measured, at 1 row)
MEASURED_ROWS = (16, 32)  # then the batch sizes at which it is compared with the forward pass


def row_limit(model: nn.Module, decoder: NativeDecoder) -> int | None:
    """Half the first of MEASURED_ROWS at which the C step measures slower than the forward pass
    (None: faster at all of them). Measured once per machine and model shape (a few seconds for a
    135M model) and kept in the kernel-timings cache (timing_cache.py)."""
    from lmforge.inference.timing_cache import remembered

    cfg, prompt = model.config, min(16, model.block_size - 2)
    kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "in_features")})
    shape = (
        f"{cfg.n_layer}x{cfg.n_embd}x{cfg.n_head}x{cfg.vocab_size} {model.wte.weight.dtype} {'+'.join(kinds)}"
    )
    weights = model.wte.weight.dtype
    for rows in MEASURED_ROWS:
        native_step = partial(_seconds_per_step, decoder.step, model, prompt, 1, torch.float32, rows)
        forward_step = partial(
            _seconds_per_step, partial(_forward_step, model), model, prompt, 1, weights, rows
        )
        native = remembered(f"native-step {shape} rows={rows}", native_step)
        eager = remembered(f"forward-step {shape} rows={rows}", forward_step)
        if native >= eager:
            return rows // 2
    return None


def attach(model: nn.Module) -> str | None:
    """Give `model` a native decoder (`model.native_decoder`, used by `step_logits`) when the C step
    computes it and measures faster than the forward pass here; else say why not."""
    reason = why_not_native(model)
    if reason is not None:
        return reason
    repeats = 3
    prompt = min(16, model.block_size - repeats - 1)
    if prompt < 1:
        return "the context is too short to measure the native decode step"
    decoder = NativeDecoder(model)

    def forward_step(tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return model(tokens[:, None], cache=cache, positions=positions[:, None])[0]

    native = _seconds_per_step(decoder.step, model, prompt, repeats, torch.float32)
    weights = model.wte.weight.dtype  # the forward pass keeps its cache in the weights' dtype
    eager = _seconds_per_step(forward_step, model, prompt, repeats, weights)
    if native >= eager:
        return f"the native decode step measured slower than PyTorch here ({1e3 * native:.1f} vs {1e3 * eager:.1f} ms)"
    model.native_decoder = decoder
    return None
