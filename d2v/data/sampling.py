"""Which sample a run reads where, and the randomness each sample gets: all functions of (seed, global sample
position) (dropout, drop-path and LayerDrop too: d2v.models.stochastic). The sample at position p (the p-th the run consumes, counting from 0 over all processes), its mask and
its augmentation depend on nothing else, so a run is reproducible and resumable whatever the number of processes,
workers or micro-batches its updates are split into."""
from __future__ import annotations

import numpy as np
import torch

# Independent random streams of a sample position: rng_for(seed, STREAM, position).
STREAM_MASKS = 1  # masks (and text's BERT corruption)
STREAM_CROPS = 2  # image crops and flips
STREAM_AUDIO_CROPS = 3  # speech crop offsets
STREAM_BUCKETS = 4  # speech: the length-bucket windows (keyed by window)
STREAM_JITTER = 5  # colour jitter
STREAM_MIXTURE = 6  # a mixture: which source each position draws from (keyed by window) and each source's order

class SampleOrder:
    """Sample order over epochs: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of global sample positions start .. start + count - 1."""
        return self.at(torch.arange(start, start + count))

    def at(self, pos: torch.Tensor) -> torch.Tensor:
        """Dataset indices of the given sample positions (int64, any order)."""
        out = torch.empty(pos.shape, dtype=torch.long)
        for epoch in torch.unique(pos // self.n).tolist():
            sel = (pos // self.n) == epoch
            out[sel] = self._permutation(epoch)[pos[sel] % self.n]
        return out

    def drawn(self, positions: int) -> list[int]:
        """Samples drawn from each source by the first `positions` positions: one source, all of them."""
        return [positions]


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def sample_rngs(seed: int, stream: int, first: int, count: int) -> list[np.random.Generator]:
    """One generator per sample position first .. first + count - 1 for random `stream` (masks, crops, ...)."""
    return [rng_for(seed, stream, p) for p in range(first, first + count)]


def split_indices(labels: np.ndarray | None, n: int, split: str, test_fraction: float, seed: int = 0) -> np.ndarray:
    """A fixed, stratified (when labelled) train/test split of n items."""
    if split == "all":
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if labels is not None else [np.arange(n)]
    test = []
    for g in groups:
        g = rng.permutation(g)
        test.extend(g[: int(round(len(g) * test_fraction))])
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)
