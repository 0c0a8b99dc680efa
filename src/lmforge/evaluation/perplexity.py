"""Perplexity, bits per byte and bits per character of a model on a text.

Long texts are scored with a sliding window, the way Hugging Face documents
for fixed-length models: windows of `context` tokens start every `stride`
tokens, and each window scores only the tokens that the previous window did
not, so every token after the first is predicted exactly once, with at least
`context - stride` tokens of left context (except near the start).
stride == context gives non-overlapping windows (what training's validation
loss measures); a smaller stride gives each token more context.

Bits per byte / per character divide the total negative log-likelihood (in
bits) by the UTF-8 bytes / characters of the scored text, so models with
different tokenizers can be compared on the same text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.tokenizers import TextTokenizer


@dataclass
class PerplexityReport:
    tokens: int  # tokens scored (all but the first)
    bytes: int  # UTF-8 bytes of the scored tokens
    characters: int  # characters of the scored tokens
    nll_sum: float  # total negative log-likelihood, nats
    loss: float  # mean cross-entropy per token, nats
    perplexity: float
    bits_per_token: float
    bits_per_byte: float
    bits_per_char: float
    context: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window; targets are the tokens at first_scored..end-1."""
    if not 0 < stride <= context:
        raise UserError(
            f"stride must be between 1 and the context ({context}), not {stride}.", settings=("stride",)
        )
    windows, scored_until = [], 1  # token 0 has no left context: it is never scored
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context + 1, n_tokens)  # inputs begin..end-2 predict begin+1..end-1
        if end <= scored_until:
            break
        windows.append((begin, end, scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def token_nll(
    model: nn.Module,
    ids: list[int],
    context: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Negative log-likelihood of each token ids[1:], from sliding windows (float64)."""
    nll = torch.zeros(len(ids) - 1, dtype=torch.float64)
    windows = sliding_windows(len(ids), context, stride)
    tokens = torch.tensor(ids, dtype=torch.long)
    from tqdm import tqdm

    bar = tqdm(total=len(windows), disable=not progress, unit="window", leave=False)
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(end - begin - 1 for begin, end, _ in group)
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        for row, (begin, end, _) in enumerate(group):
            inputs[row, : end - begin - 1] = tokens[begin : end - 1]
        logits, _ = model(inputs.to(device))
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        for row, (begin, end, first) in enumerate(group):
            targets = tokens[first:end]
            positions = torch.arange(first - begin - 1, end - begin - 1)
            nll[first - 1 : end - 1] = -logprobs[row, positions, targets].double()
        bar.update(len(group))
    bar.close()
    return nll


def evaluate_ids(
    model: nn.Module,
    tokenizer: TextTokenizer,
    ids: list[int],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> PerplexityReport:
    """Score a token sequence: every token after the first is predicted once.

    The default window is the model's context, at most 8,192 tokens (a recurrent model's
    context is unbounded: it reads each 8,192-token window from a fresh state)."""
    if batch_size < 1 or (context is not None and context < 1) or (stride is not None and stride < 1):
        raise UserError(f"batch_size, context and stride must be at least 1 (got {batch_size}, {context}, {stride}).",
                        settings=("batch_size", "context", "stride"))  # fmt: skip
    context = context or min(model.block_size, 8192)
    if context > model.block_size:
        raise UserError(
            f"context {context} is longer than the model's context ({model.block_size}).",
            settings=("context",),
        )
    stride = stride or context
    if len(ids) < 2:
        raise UserError(f"The text has {len(ids)} token(s); at least 2 are needed to score a prediction.")
    from lmforge.device import resolve_device

    nll = token_nll(model, ids, context, stride, batch_size, resolve_device(device), progress)
    scored_text = tokenizer.decode(ids[1:], skip_special_tokens=False)
    n_bytes, n_chars = len(scored_text.encode("utf-8")), len(scored_text)
    total = float(nll.sum())
    mean = total / len(nll)
    return PerplexityReport(
        tokens=len(nll),
        bytes=n_bytes,
        characters=n_chars,
        nll_sum=total,
        loss=mean,
        perplexity=math.exp(min(mean, 700.0)),
        bits_per_token=mean / math.log(2),
        bits_per_byte=total / math.log(2) / max(1, n_bytes),
        bits_per_char=total / math.log(2) / max(1, n_chars),
        context=context,
        stride=stride,
    )


def evaluate_text(
    model: nn.Module,
    tokenizer: TextTokenizer,
    text: str,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> PerplexityReport:
    """Score `text` with the model: loss, perplexity, bits per token/byte/character."""
    from lmforge.tokenizers import encode_long

    if not text.strip():
        raise UserError("The text to evaluate is empty; give a file with text.")
    return evaluate_ids(
        model, tokenizer, encode_long(tokenizer, text), context, stride, batch_size, device, progress
    )
