"""Updates by a budget of audio samples (fairseq's `max_tokens`): which sample positions make up update u when an
update holds as many utterances as fit in run.batch_tokens waveform samples, and how an update is split into the
micro-batches of its processes.

Everything here is a function of (seed, budget, the utterance lengths listed when the data set was opened):

- update u takes the next positions of the run's sample order (d2v.data.sampling.SampleOrder) while their cropped
  lengths sum to at most the budget (at least one utterance), so an update holds the same amount of audio whatever
  the lengths of its utterances;
- its files are then placed over its positions shortest first, so that each micro-batch, a contiguous run of
  positions, holds utterances of similar length and little padding;
- the split into micro-batches depends only on how many there are (processes x grad_accum), each holding about the
  same number of samples.

A position keeps its meaning (the crop and masks of position p come from p's own generators), so N processes
compute what one does with the same micro-batches, and a resumed run recomputes the same updates from the lengths.
"""
from __future__ import annotations

import bisect

import numpy as np

from d2v.data.sampling import SampleOrder


class BudgetedUpdates:
    """Update spans over the sample stream for a budget of `budget` samples per update.

    costs: (N,) int64, each utterance's samples as a crop sees them (its length, at most the crop length)."""

    def __init__(self, costs: np.ndarray, order: SampleOrder, budget: int):
        self.costs = np.asarray(costs, dtype=np.int64)
        if len(self.costs) == 0 or self.costs.min() < 1:
            raise ValueError("every utterance must cost at least one sample")
        self.order, self.budget, self.n = order, int(budget), len(self.costs)
        self.total = int(self.costs.sum())  # the samples of one epoch
        self._starts = [0]  # update u spans positions _starts[u] .. _starts[u + 1] - 1 (grows on demand)
        self._cum: dict[int, np.ndarray] = {}  # epoch -> costs summed along that epoch's order, (N + 1,)
        self._sorted: tuple[int, np.ndarray] | None = None  # (update, its files shortest first)

    @property
    def min_count(self) -> int:
        """The fewest utterances an update can hold: the budget filled by the longest crops."""
        return max(1, self.budget // int(self.costs.max()))

    def mean_count(self) -> float:
        """Utterances per update on average over an epoch."""
        return self.budget * self.n / self.total

    def _epoch_cum(self, epoch: int) -> np.ndarray:
        if epoch not in self._cum:
            if len(self._cum) >= 2:  # an update spans at most a few epochs; keep the two latest
                del self._cum[min(self._cum)]
            files = self.order.indices(epoch * self.n, self.n).numpy()
            cum = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(self.costs[files], out=cum[1:])
            self._cum[epoch] = cum
        return self._cum[epoch]

    def _next_start(self, start: int) -> int:
        """The position after the update that starts at `start`: the positions whose costs, summed from `start`,
        stay within the budget (at least one)."""
        epoch, offset = divmod(start, self.n)
        limit = epoch * self.total + int(self._epoch_cum(epoch)[offset]) + self.budget  # samples before the end
        while True:
            # the last position p of this epoch with (samples before p) <= limit; N: the epoch ends within budget
            r = int(np.searchsorted(self._epoch_cum(epoch), limit - epoch * self.total, side="right")) - 1
            if r < self.n:
                return max(epoch * self.n + r, start + 1)
            epoch += 1

    def _extend(self, update: int = -1, position: int = -1) -> None:
        while len(self._starts) <= update + 1 or self._starts[-1] <= position:
            self._starts.append(self._next_start(self._starts[-1]))

    def span(self, update: int) -> tuple[int, int]:
        """(first position, position after the last) of `update`."""
        self._extend(update=update)
        return self._starts[update], self._starts[update + 1]

    def update_of(self, position: int) -> int:
        self._extend(position=position)
        return bisect.bisect_right(self._starts, position) - 1

    def files(self, update: int) -> np.ndarray:
        """Dataset indices of `update`, shortest first (ties: sample order), one per position of its span."""
        if self._sorted is None or self._sorted[0] != update:
            start, end = self.span(update)
            files = self.order.indices(start, end - start).numpy()
            self._sorted = (update, files[np.argsort(self.costs[files], kind="stable")])
        return self._sorted[1]

    def indices(self, first: int, count: int) -> np.ndarray:
        """Dataset indices at global sample positions first .. first + count - 1."""
        out = np.empty(count, dtype=np.int64)
        p = first
        while p < first + count:
            update = self.update_of(p)
            start, end = self.span(update)
            stop = min(end, first + count)
            out[p - first: stop - first] = self.files(update)[p - start: stop - start]
            p = stop
        return out

    def parts(self, update: int, n: int) -> list[tuple[int, int]]:
        """`update` cut into n contiguous runs of positions, (first, count) each, every one non-empty and holding
        about 1/n of the update's samples. Needs at least n utterances in the update (min_count >= n)."""
        start, end = self.span(update)
        size = end - start
        if size < n:
            raise ValueError(f"update {update} holds {size} utterances, fewer than its {n} parts")
        cum = np.cumsum(self.costs[self.files(update)])
        bounds = [0]
        for i in range(1, n):
            target = i * int(cum[-1]) / n
            b = int(np.searchsorted(cum, target, side="right"))  # utterances whose running total <= target
            if b < size and abs(cum[b] - target) < abs((cum[b - 1] if b else 0) - target):
                b += 1  # one more utterance comes closer to an equal share
            bounds.append(min(max(b, bounds[-1] + 1), size - (n - i)))
        bounds.append(size)
        return [(start + lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]
