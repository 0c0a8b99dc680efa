"""Batches of training windows drawn from a token array.

Training samples random windows (as nanoGPT does) from a seeded generator whose
state is saved with the checkpoint, so a resumed run draws exactly the batches
the uninterrupted run would have drawn. Validation uses fixed, evenly spaced
windows, so successive evaluations are comparable and free of sampling noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def windows_to_tensors(
    tokens: np.ndarray, starts: np.ndarray, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows of `length` tokens starting at `starts`."""
    index = starts[:, None] + np.arange(length + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    if device.type == "cuda":
        chunk = chunk.pin_memory().to(device, non_blocking=True)
    else:
        chunk = chunk.to(device)
    return chunk[:, :-1], chunk[:, 1:]


class RandomWindows:
    """Random (input, target) windows; reproducible from its seed and saved state."""

    def __init__(self, tokens: np.ndarray, length: int, batch_size: int, seed: int, device: torch.device):
        self.tokens = tokens
        self.length = length
        self.batch_size = batch_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.length
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        return windows_to_tensors(self.tokens, starts, self.length, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def fixed_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
    """`count` window starts spread evenly over the array (fewer if the array is short)."""
    high = len(tokens) - length - 1
    count = max(1, min(count, high + 1))
    return np.unique(np.linspace(0, high, count).astype(np.int64))
