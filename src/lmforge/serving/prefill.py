"""Prefill with a prefix cache: prompts that begin like an earlier one skip recomputing it.

Served prompts share long beginnings: every chat request to one model starts with the
same template and system message, and a conversation's next request repeats the whole
conversation so far. The keys and values of a prompt depend only on the tokens before
them (and their positions), so those of a shared beginning can be copied instead of
computed (vLLM's and SGLang's automatic prefix caching, llama.cpp's `cache_prompt`).

`PrefixCache` keeps the keys and values of recent prompts (most recently used first,
within a budget of tokens). `prefill` gives a batch of prompts one KV cache: for each
prompt the longest cached beginning is copied in, right-aligned before the slots of
the rest, and only the rest goes through the model:

    slots:  [ ... padding | cached prefix of row i ][ padding | rest of row i ]
              0 ......................... longest prefix ............. + longest rest

Padding between the two parts is masked like left padding; each token keeps its own
position (the prefix length plus its index in the rest), so attention sees exactly the
text it would have seen in one pass. At least the last token of a prompt is always
computed: its logits choose the first new token.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from lmforge.inference.generation import left_pad, positions_of
from lmforge.models.gpt import KVCache


class PrefixCache:
    """Keys and values (n_layer, kv_heads, tokens, head_dim) of recent prompts, by their token ids."""

    def __init__(self, max_tokens: int = 4096):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.tokens = 0
        self.reused = 0  # prompt tokens whose keys and values were copied, not computed

    def longest(self, prompt: list[int]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """(length, keys, values) of the longest cached beginning of `prompt`, leaving at least
        its last token to compute; (0, None, None) when nothing useful is cached."""
        best, best_key = 0, None
        for key in self.entries:
            n, limit = 0, min(len(key), len(prompt) - 1)
            while n < limit and key[n] == prompt[n]:
                n += 1
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None, None
        self.entries.move_to_end(best_key, last=False)  # most recently used first
        k, v = self.entries[best_key]
        return best, k[:, :, :best], v[:, :, :best]

    def remember(self, prompt: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a prompt's keys and values, dropping the least recently used beyond the budget."""
        key = tuple(prompt)
        if len(key) > self.max_tokens or key in self.entries:
            return
        self.entries[key] = (k, v)
        self.entries.move_to_end(key, last=False)
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            old, _ = self.entries.popitem(last=True)
            self.tokens -= len(old)


@torch.inference_mode()
def prefill(
    model: nn.Module, prompts: list[list[int]], prefixes: PrefixCache | None, reuse: list[bool] | None = None
) -> tuple[object, torch.Tensor]:
    """A cache holding every prompt (rows right-aligned) and each prompt's next-token logits (B, V).
    `reuse[i]` False: prompt i is computed whole, whatever is cached (a seeded request: a copied prefix
    can round differently from a computed one, and its text must not depend on what ran before)."""
    device = next(model.parameters()).device
    probe = model.new_cache(1, capacity=1)
    if prefixes is None or prefixes.max_tokens <= 0 or not isinstance(probe, KVCache):
        ids, valid = left_pad(prompts, device)
        cache = model.new_cache(len(prompts), capacity=ids.shape[1])
        logits, _ = model(
            ids, cache=cache, positions=positions_of(valid), attention_mask=valid, last_only=True
        )
        return cache, logits[:, -1].float()
    reuse = reuse or [True] * len(prompts)
    found = [
        prefixes.longest(p) if again else (0, None, None) for p, again in zip(prompts, reuse, strict=True)
    ]
    done = max(n for n, _, _ in found)
    ids, valid = left_pad([p[n:] for p, (n, _, _) in zip(prompts, found, strict=True)], device)
    cache = model.new_cache(len(prompts), capacity=done + ids.shape[1])
    for row, (n, k, v) in enumerate(found):
        if n:
            cache.k[:, row, :, done - n : done] = k
            cache.v[:, row, :, done - n : done] = v
            cache.valid[row, done - n : done] = True
    cache.length, cache.padded = done, done > 0
    offsets = torch.tensor([n for n, _, _ in found], device=device)[:, None]
    logits, _ = model(
        ids, cache=cache, positions=positions_of(valid) + offsets, attention_mask=valid, last_only=True
    )
    for row, prompt in enumerate(prompts):
        slots = cache.valid[row, : cache.length].nonzero().squeeze(1)
        prefixes.remember(
            prompt, cache.k[:, row].index_select(2, slots), cache.v[:, row].index_select(2, slots)
        )
    prefixes.reused += sum(n for n, _, _ in found)
    return cache, logits[:, -1].float()
