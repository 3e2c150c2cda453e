"""Training windows over a prepared split: (x, y) pairs of `context_len` tokens, the target the
input shifted by one, memory-mapped from the shards (no copy per worker, no tokenization while
training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from raygpt.data.shards import SPLITS, load_manifest, read_shard


def num_windows(num_tokens: int, context_len: int, stride: int) -> int:
    """Windows of context_len inputs (+1 target) starting every `stride` tokens, as the recipe's
    `range(0, len(ids) - context_len, stride)`."""
    if num_tokens <= context_len:
        return 0
    return (num_tokens - context_len - 1) // stride + 1


class WindowDataset(Dataset):
    """Item i is (x, y): `context_len` tokens starting at i * stride over the concatenation of a
    split's shards, and the same window shifted by one. Shards are memory-mapped lazily, so a
    pickled dataset (sent to a Ray worker or a DataLoader process) carries only paths."""

    def __init__(self, folder: str | Path, split: str, context_len: int, stride: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.folder = Path(folder)
        manifest = load_manifest(folder)
        self.context_len = context_len
        self.stride = stride or context_len
        shards = manifest["splits"][split]["shards"]
        self.files = [str(self.folder / s["file"]) for s in shards]
        # offsets[k] = first global token index of shard k; offsets[-1] = total tokens
        self.offsets = np.cumsum([0] + [s["tokens"] for s in shards])
        self.num_tokens = int(self.offsets[-1])
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return num_windows(self.num_tokens, self.context_len, self.stride)

    def _shards(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [read_shard(f) for f in self.files]
        return self._arrays

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Global tokens [start, stop) of the split, across shard boundaries."""
        arrays = self._shards()
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            lo = start - int(self.offsets[k])
            hi = min(stop, int(self.offsets[k + 1])) - int(self.offsets[k])
            pieces.append(arrays[k][lo:hi])
            start += hi - lo
            k += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.stride
        chunk = torch.from_numpy(self.tokens(start, start + self.context_len + 1).astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}
