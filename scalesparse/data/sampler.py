"""Worker side: packed blocks over a token file, the global sample order, and each rank's slice of it.

The global batch of step s is a pure function of (seed, samples consumed), independent of the world
size, so 1 and N workers see the same data and a resumed run (also onto another worker count)
continues at the exact sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scalesparse.data.tokens import open_tokens
from scalesparse.errors import DataError


class TokenBlocks:
    """Non-overlapping blocks of seq_len+1 tokens (inputs and shifted targets) over a token array."""

    def __init__(self, path: Path, seq_len: int) -> None:
        self.tokens = open_tokens(path)  # uint16 or uint32, as the file says; widened per block below
        self.seq_len = seq_len
        self.n_blocks = (self.tokens.size - 1) // seq_len
        if self.n_blocks < 1:
            raise DataError(f"{path}: {self.tokens.size} tokens is too few for one block of {seq_len}")

    def __len__(self) -> int:
        return self.n_blocks

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * T : i * T + T + 1], dtype=np.int64) for i in indices])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]  # (B, T) each


class BatchSchedule:
    """Sample order: an endless sequence of epochs, each a permutation seeded by (seed, epoch).

    `global_batch(samples_seen, B)` is the next B block indices; it depends on nothing but the seed
    and the position, which is what makes resume exact and 1-vs-N-worker runs comparable.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n_blocks = n_blocks
        self.seed = seed
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, samples_seen: int, size: int) -> np.ndarray:
        out = np.empty(size, dtype=np.int64)
        for j in range(size):
            epoch, offset = divmod(samples_seen + j, self.n_blocks)
            out[j] = self._permutation(epoch)[offset]
        return out


def rank_slice(global_indices: np.ndarray, micro_step: int, rank: int, world: int, micro: int) -> np.ndarray:
    """The micro-batch of `rank` at accumulation step `micro_step` within one global batch."""
    start = (micro_step * world + rank) * micro
    return global_indices[start : start + micro]
