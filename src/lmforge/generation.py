"""Text generation from a trained model.

`sample_text` is the simple sampler that training uses for its closing sample:
it re-runs the model over the last `block_size` tokens at each step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.tokenizers import TextTokenizer


@torch.inference_mode()
def sample_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Sample token ids after `prompt_ids` (temperature 0 = greedy)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(ids[:, -model.block_size:])
        logits = logits[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return new


def sample_text(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 0,
    seed: int | None = None,
) -> str:
    """The prompt followed by sampled text. An empty prompt starts from the end-of-text token
    (or from a newline when the tokenizer has none)."""
    prompt_ids = tokenizer.encode(prompt) if prompt else _start_ids(tokenizer)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    new = sample_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, generator)
    return prompt + tokenizer.decode(new)


def _start_ids(tokenizer: TextTokenizer) -> list[int]:
    if tokenizer.kind == "char":
        newline = tokenizer.encode("\n")
        if newline and newline[0] != tokenizer.hf.token_to_id("<unk>"):
            return newline  # char models trained on one document rarely saw <|endoftext|>
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    return tokenizer.encode("\n") or [0]
