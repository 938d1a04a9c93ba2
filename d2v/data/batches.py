"""A micro-batch on the CPU, as the pipelines hand it to the loader."""
from __future__ import annotations

import numpy as np
import torch

from d2v.core.batch import Batch
from d2v.core.config import PretrainConfig
from d2v.masking import kept_positions


def make_batch(cfg: PretrainConfig, first: int, inputs: torch.Tensor, mask: np.ndarray,
               valid: np.ndarray | None = None, **fields) -> Batch:
    """A CPU Batch; for data2vec 2.0 also the positions each clone's student encodes, computed here (in the
    DataLoader worker) so the device never waits on a data-dependent size. valid (B * clones, T): True at real
    positions (None: all)."""
    if cfg.recipe != "v2":
        return Batch(inputs=inputs, mask=torch.from_numpy(mask), first=first, **fields)
    keep, filler = kept_positions(mask, valid)
    return Batch(inputs=inputs, mask=torch.from_numpy(mask), keep=torch.from_numpy(keep),
                 keep_padding=None if filler is None else torch.from_numpy(filler), clones=cfg.mask.clones,
                 first=first, **fields)
