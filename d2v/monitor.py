"""Live quality monitor: a k-NN classifier on frozen `embed` features of the student and the EMA teacher, run
every few updates on a labelled set, because a data2vec loss alone says little about representation quality.
It takes at most about 10% of the training time: an evaluation that would exceed that waits for a later one
(the evaluation at the end always runs), and the bank is at most 2000 training and 1000 test items.

The classifier is the weighted k-NN of instance-discrimination work (k = 20, temperature 0.07, cosine
similarity): each test item votes with its k nearest training items, weighted by exp(similarity / T)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from d2v.core.errors import DataError
from d2v.data.labelled import load_labelled
from d2v.encoders.features import features


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy of the weighted cosine k-NN; x (N, D) float, y (N,) int64."""
    train_x = torch.nn.functional.normalize(train_x.float(), dim=1)
    test_x = torch.nn.functional.normalize(test_x.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.T  # (n, N)
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return correct / len(test_x)


@dataclass
class LabelledSplits:
    train: object
    test: object


class KnnMonitor:
    """k-NN top-1 of the student and the teacher on a labelled set (train split = bank, test split = queries)."""

    BUDGET = 0.10  # share of the training time the monitor may take; evaluations past it wait (the last one runs)

    def __init__(self, source: str, encoder, max_train: int = 2000, max_test: int = 1000, seed: int = 0,
                 skip_bad_files: bool = False):
        self.source = source  # skip_bad_files: the run's --skip-bad-files covers its --eval-data too
        train = load_labelled(source, encoder, "train", skip_bad_files=skip_bad_files)
        test = load_labelled(source, encoder, "test", skip_bad_files=skip_bad_files)
        if len(train) == 0 or len(test) == 0:
            raise DataError(f"--eval-data {source} needs a train and a test split with items in both")
        rng = np.random.default_rng(seed)
        self.train = train.subset(np.sort(rng.permutation(len(train))[:max_train])) if len(train) > max_train else train
        self.test = test.subset(np.sort(rng.permutation(len(test))[:max_test])) if len(test) > max_test else test
        self.seconds, self.evaluations = 0.0, 0

    def within_budget(self, train_seconds: float) -> bool:
        """Whether one more evaluation now keeps the monitor within BUDGET of the training time (judged by the
        mean cost of the evaluations so far), so it never dominates a run whatever the labelled set's size."""
        per_eval = self.seconds / self.evaluations if self.evaluations else 0.0
        return self.seconds + per_eval <= self.BUDGET * train_seconds

    @torch.no_grad()
    def _features(self, encoder, dataset, device) -> torch.Tensor:
        return torch.from_numpy(features(encoder, dataset, batch_size=128, device=device)).float()

    def evaluate(self, model, device) -> dict[str, float]:
        """{'knn_student': top-1, 'knn_teacher': top-1, 'knn_seconds': wall time}; restores training mode."""
        t0 = time.perf_counter()
        result = {}
        y_train, y_test = self.train.labels.long(), self.test.labels.long()
        was_training = model.student.training
        model.student.eval()
        try:
            for name, encoder in (("student", model.student), ("teacher", model.teacher)):
                x_train = self._features(encoder, self.train, device)
                x_test = self._features(encoder, self.test, device)
                result[f"knn_{name}"] = knn_top1(x_train, y_train, x_test, y_test)
        finally:
            model.student.train(was_training)
        elapsed = time.perf_counter() - t0
        self.seconds += elapsed
        self.evaluations += 1
        result["knn_seconds"] = elapsed
        return result
