"""Compiled one-token decoding for GPT models: `torch.compile` over a static-shape KV cache.

Decoding a small model one token at a time pays for dispatch as well as arithmetic: SmolLM2 has
30 layers of a dozen small operations each. Compiled, a decode step is a few fused kernels
around the matrix products. Compiling needs shapes that do not change from step to step, so
the step writes the new keys and values into a fixed slot of a cache of fixed capacity
(`index_copy_` at a slot given as a tensor) and attends over the whole capacity, masking the
slots not yet filled (the cache's `valid` rows are the mask). The step uses the model's own
modules (`GPT.embed`, `CausalSelfAttention.queries_keys_values`, the blocks' norms and MLPs).

Measured (SmolLM2, AVX2 CPU): at batch 1 float32 42 -> 34 ms per step (compiled_decode.py) and
17 -> 30 tokens/s (vs_llamacpp.py); bfloat16 30 ms either way; at batch 8 the compiled step was
0.46x eager, so `decode_steps` uses it for single sequences only. Compiling takes 10-100 s
(Inductor writes C++ and builds it; its on-disk cache makes later processes faster), so it pays
for long generations, not for one short answer: it is opt-in (`--compile`,
`load_for_inference(compile=True)`). A compiled step is specialised to one (model, capacity)
pair; capacities are rounded up to a multiple of `CAPACITY_STEP` so that prompts of similar
lengths share one compilation. When torch.compile's limit of specialisations is reached, the
model goes on eagerly (same tokens, said once) instead of failing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models.gpt import GPT, KVCache

CAPACITY_STEP = 256


def can_compile(model: nn.Module) -> bool:
    """Whether `model` is a GPT whose decode step this module compiles."""
    return isinstance(model, GPT)


def static_capacity(model: GPT, needed: int) -> int | None:
    """The cache capacity for a compiled run of `needed` slots, or None when they do not fit the
    context (a run that slides past the context window takes the eager path)."""
    capacity = min(-(-needed // CAPACITY_STEP) * CAPACITY_STEP, model.block_size)
    return capacity if needed <= capacity else None


def one_token(
    model: GPT, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, cache_k: torch.Tensor,
    cache_v: torch.Tensor, valid: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Next-token logits (B, vocab) after `tokens` (B,) at `positions` (B,), whose keys and values
    go into `slot` (a 1-element tensor) of every row of the cache."""
    x, rope = model.embed(tokens[:, None], positions[:, None])
    valid.index_fill_(1, slot, True)
    mask = valid[:, None, None, :]  # each row sees its own filled slots, the new one included
    for layer, block in enumerate(model.blocks):
        attention = block.attn
        q, k, v = attention.queries_keys_values(block.ln_1(x), rope)
        cache_k[layer].index_copy_(2, slot, k.to(cache_k.dtype))
        cache_v[layer].index_copy_(2, slot, v.to(cache_v.dtype))
        y = F.scaled_dot_product_attention(
            q,
            cache_k[layer].to(q.dtype),
            cache_v[layer].to(q.dtype),
            attn_mask=mask,
            enable_gqa=attention.n_kv_head != attention.n_head,
        )
        x = x + attention.c_proj(y.transpose(1, 2).reshape(x.shape))
        x = x + block.mlp(block.ln_2(x))
    logits = model.lm_head(model.ln_f(x))[:, 0]
    if model.config.logit_softcap > 0:
        cap = model.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
    return logits


_compiled_one_token: Callable[..., torch.Tensor] | None = None
compiled_steps = 0  # how many steps ran compiled (the tests check that the path was taken)


def decode_one(model: GPT, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Append one token per row to `cache` (every row at the same slot, the next free one) and
    return the next-token logits (B, vocab), by the compiled step."""
    global _compiled_one_token, compiled_steps
    if cache.length >= cache.capacity:
        raise ValueError(f"the cache of {cache.capacity} slots is full")
    if _compiled_one_token is None:
        _compiled_one_token = torch.compile(one_token, fullgraph=True, dynamic=False)
    slot = torch.tensor([cache.length], device=tokens.device)
    # Fresh contiguous copies: a compiled step is specialised to its inputs' strides too, and a
    # column of a growing (B, T) tensor has a new stride every step.
    tokens, positions = (t.clone(memory_format=torch.contiguous_format) for t in (tokens, positions))
    try:
        logits = _compiled_one_token(model, tokens, positions, slot, cache.k, cache.v, cache.valid)
    except torch._dynamo.exc.FailOnRecompileLimitHit:  # raised before the step runs: nothing written
        warnings.warn(
            "torch.compile has specialised the decode step too often; decoding eagerly.", stacklevel=2
        )
        model.compile_decoding = False
        return model(tokens[:, None], cache=cache, positions=positions[:, None])[0][:, -1]
    cache.length += 1
    compiled_steps += 1
    return logits
