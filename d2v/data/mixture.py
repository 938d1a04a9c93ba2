"""A mixture: several data sources of one modality drawn by weight (`--data A --data B --weights 0.7,0.3`).

The sources' samples are concatenated (source s's sample j is sample starts[s] + j of the mixture's data set) and
`MixtureOrder` says, for each sample position, which source it draws from and which of that source's samples.
Positions come in windows of MIXTURE_WINDOW; a window holds exactly quota[s] draws from source s (the weights
apportioned to the window by largest remainder), in an arrangement shuffled by (seed, window). Source s's k-th draw
is position k of the source's own SampleOrder (a fresh permutation of its samples per pass), so a source is read
through once before any of its samples repeats, and a small, heavily weighted source repeats sooner.

All of it is a function of (seed, position), like the order of one source: the same on any number of processes and
exact on resume. The draws per source up to any position (`drawn`) cost one window's arrangement.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from d2v.core.errors import ConfigError, DataError
from d2v.data.sampling import STREAM_MIXTURE, SampleOrder, rng_for

MIXTURE_WINDOW = 1000  # positions per window: shares are exact at every multiple, to 1/1000 of the weight


def mixture_sources(data) -> list[str]:
    """The sources a data config reads: data.sources for a mixture, else [data.source]."""
    return list(data.sources) if data.sources else [data.source]


def quotas(weights, sources: int) -> list[int]:
    """Draws per source in each window of MIXTURE_WINDOW positions: the weights (relative; none given: equal)
    apportioned by largest remainder. A weight that is not a positive number, or one too small to get a draw per
    window, is a ConfigError."""
    weights = list(weights) if len(weights) else [1.0] * sources
    if len(weights) != sources:
        raise ConfigError(f"--weights (data.weights) gives {len(weights)} weight(s) for {sources} --data source(s); "
                          f"give one per source, e.g. --weights {','.join(['1'] * sources)}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
           or w <= 0]
    if bad:
        raise ConfigError(f"--weights (data.weights) must be positive numbers, got {bad[0]!r}")
    exact = np.asarray(weights, dtype=np.float64) / sum(weights) * MIXTURE_WINDOW
    quota = np.floor(exact).astype(np.int64)
    for s in np.argsort(-(exact - quota), kind="stable")[: MIXTURE_WINDOW - int(quota.sum())]:
        quota[s] += 1
    if quota.min() == 0:
        s = int(np.argmin(quota))
        raise ConfigError(f"--weights (data.weights): weight {weights[s]!r} of source {s + 1} is too small; each "
                          f"source needs at least 1/{MIXTURE_WINDOW} of the total weight")
    return quota.tolist()


def _source_seed(seed: int, source: int) -> int:
    return int(np.random.SeedSequence([seed, STREAM_MIXTURE, source]).generate_state(1, np.uint32)[0])


class MixtureOrder:
    """Sample order over several sources (sizes: samples per source, in order) drawn by weight; indices() has
    SampleOrder's meaning over the sources' concatenation."""

    def __init__(self, sizes: list[int], weights, seed: int):
        self.sizes, self.seed = [int(n) for n in sizes], seed
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.quota = np.asarray(quotas(weights, len(self.sizes)), dtype=np.int64)
        self.orders = [SampleOrder(n, _source_seed(seed, s)) for s, n in enumerate(self.sizes)]
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def arrangement(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(source (W,), rank (W,)) of the window's positions: which source each draws from, and how many draws of
        that source precede it within the window."""
        if self._cached is None or self._cached[0] != window:
            source = rng_for(self.seed, STREAM_MIXTURE, window).permutation(
                np.repeat(np.arange(len(self.sizes)), self.quota))
            rank = np.empty(MIXTURE_WINDOW, dtype=np.int64)
            for s, q in enumerate(self.quota.tolist()):
                rank[source == s] = np.arange(q)
            self._cached = (window, source, rank)
        return self._cached[1], self._cached[2]

    def draws(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw number within that source) of positions start .. start + count - 1."""
        pos = np.arange(start, start + count, dtype=np.int64)
        source, draw = np.empty(count, np.int64), np.empty(count, np.int64)
        for window in np.unique(pos // MIXTURE_WINDOW).tolist():
            sel = pos // MIXTURE_WINDOW == window
            src, rank = self.arrangement(window)
            at = pos[sel] % MIXTURE_WINDOW
            source[sel] = src[at]
            draw[sel] = window * self.quota[src[at]] + rank[at]
        return source, draw

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Indices into the concatenated sources of positions start .. start + count - 1."""
        source, draw = self.draws(start, count)
        out = torch.empty(count, dtype=torch.long)
        for s in np.unique(source).tolist():
            sel = source == s
            out[torch.from_numpy(sel)] = int(self.starts[s]) + self.orders[s].at(torch.from_numpy(draw[sel]))
        return out

    def drawn(self, positions: int) -> list[int]:
        """Samples drawn from each source by the first `positions` positions."""
        window, rest = divmod(int(positions), MIXTURE_WINDOW)
        counts = window * self.quota + np.bincount(self.arrangement(window)[0][:rest], minlength=len(self.sizes))
        return counts.tolist()


def sample_order(sizes: list[int], weights, seed: int, names: list[str] | None = None):
    """The order of a run's samples: SampleOrder for one source (as before mixtures existed), MixtureOrder for
    several; a source left without a usable sample is a DataError."""
    if len(sizes) == 1:
        return SampleOrder(int(sizes[0]), seed)
    for s, n in enumerate(sizes):
        if n == 0:
            raise DataError(f"source {names[s] if names else s + 1} of the mixture has no usable samples")
    return MixtureOrder(sizes, weights, seed)
