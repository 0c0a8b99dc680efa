"""Batches of training windows drawn from a token array.

Training samples random windows (as nanoGPT does) from a seeded generator whose
state is saved with the checkpoint, so a resumed run draws exactly the batches
the uninterrupted run would have drawn. Validation uses fixed, evenly spaced
windows, so successive evaluations are comparable and free of sampling noise.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100  # target value that cross-entropy skips (F.cross_entropy's default ignore_index)


def windows_to_tensors(
    tokens: np.ndarray, starts: np.ndarray, length: int, device: torch.device, mask: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for windows of `length` tokens starting at `starts`.

    With a `mask` (instruction data), targets outside the replies become IGNORE.
    """
    index = starts[:, None] + np.arange(length + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    if mask is not None:
        x, y = chunk[:, :-1], chunk[:, 1:].clone()
        y[torch.from_numpy(np.asarray(mask[index[:, 1:]]) == 0)] = IGNORE
        return x.to(device), y.to(device)
    if device.type == "cuda":
        chunk = chunk.pin_memory().to(device, non_blocking=True)
    else:
        chunk = chunk.to(device)
    return chunk[:, :-1], chunk[:, 1:]


class RandomWindows:
    """Random (input, target) windows; reproducible from its seed and saved state."""

    def __init__(
        self,
        tokens: np.ndarray,
        length: int,
        batch_size: int,
        seed: int,
        device: torch.device,
        mask: np.ndarray | None = None,
    ):
        self.tokens = tokens
        self.mask = mask
        self.length = length
        self.batch_size = batch_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.length
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        if self.mask is not None:
            # A window with no reply token teaches nothing (and its loss is 0/0): draw it again.
            for _ in range(100):
                empty = ~np.array([self.mask[s + 1 : s + self.length + 1].any() for s in starts])
                if not empty.any():
                    break
                starts[empty] = torch.randint(high, (int(empty.sum()),), generator=self.generator).numpy()
        return windows_to_tensors(self.tokens, starts, self.length, self.device, self.mask)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class ContiguousStreams:
    """Consecutive windows of `batch_size` contiguous streams, for recurrent models.

    The token array is cut into `batch_size` equal streams; row b of each batch is
    the next window of stream b, so a hidden state carried from one batch to the
    next continues the same text. `wrapped` is True on the batch that starts the
    streams over (the carried state must then be reset).
    """

    def __init__(self, tokens: np.ndarray, length: int, batch_size: int, device: torch.device):
        self.tokens = tokens
        self.length = length
        self.batch_size = batch_size
        self.device = device
        self.stream_len = (len(tokens) - 1) // batch_size
        if self.stream_len < length:
            raise ValueError("streams shorter than one window")
        self.starts = np.arange(batch_size, dtype=np.int64) * self.stream_len
        self.position = 0
        self.wrapped = False

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.wrapped = self.position + self.length > self.stream_len
        if self.wrapped:
            self.position = 0
        x, y = windows_to_tensors(self.tokens, self.starts + self.position, self.length, self.device)
        self.position += self.length
        return x, y

    def windows_per_pass(self) -> int:
        return self.stream_len // self.length

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"position": torch.tensor([self.position])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.position = int(state["position"][0])


def fixed_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
    """`count` window starts spread evenly over the array (fewer if the array is short)."""
    high = len(tokens) - length - 1
    count = max(1, min(count, high + 1))
    return np.unique(np.linspace(0, high, count).astype(np.int64))
