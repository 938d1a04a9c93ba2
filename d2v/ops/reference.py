"""Readable reference implementations of the three hot ops: the spec every backend is tested against.

Written for clarity, not speed. Math runs in float64 when `dtype=torch.float64` is asked for, else float32.
"""
from __future__ import annotations

from typing import Sequence

import torch

NORMS = ("layer", "instance", "none")


def _norm(x: torch.Tensor, kind: str, valid: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalize x (B, T, D). `valid` (B, T) bool marks non-padded steps (instance norm only)."""
    if kind == "none":
        return x
    if kind == "layer":
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased
        return (x - mean) / torch.sqrt(var + eps)
    if kind == "instance":
        w = valid.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        n = w.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1, 1)
        mean = (x * w).sum(dim=1, keepdim=True) / n
        var = (((x - mean) ** 2) * w).sum(dim=1, keepdim=True) / n  # biased, padding excluded
        return (x - mean) / torch.sqrt(var + eps)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


def targets_reference(
    layers: Sequence[torch.Tensor] | torch.Tensor,
    norm: str = "layer",
    final_norm: str = "none",
    mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """K layers (B, T, D) -> normalized, averaged, final-normed targets (B, T, D), or (N, D) at `mask`.

    `padding_mask` (B, T) bool is True at padded steps; they are excluded from instance-norm statistics.
    """
    layers = [layer.to(dtype) for layer in layers]
    B, T, _ = layers[0].shape
    valid = torch.ones(B, T, dtype=torch.bool, device=layers[0].device)
    if padding_mask is not None:
        valid = ~padding_mask.bool()
    y = sum(_norm(layer, norm, valid, eps) for layer in layers) / len(layers)
    y = _norm(y, final_norm, valid, eps)
    if mask is not None:
        y = y[mask.bool()]
    return y


def ema_update_reference(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, in place, one tensor at a time."""
    with torch.no_grad():
        for t, s in zip(teacher, student):
            t.copy_(decay * t.double() + (1.0 - decay) * s.double())


def masked_regression_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.0,
    scale: float = 1.0,
    reduction: str = "mean",
    dtype: torch.dtype = torch.float32,
    clones: int = 1,
) -> torch.Tensor:
    """Per element d**2 (beta == 0) or smooth-L1(beta); summed over D; times scale; mean or sum over selected rows.

    pred (B*M, ..., D) with M = clones: pred sample i is compared with target sample i // M of target (B, ..., D),
    through a broadcast view (B, M, ..., D) - (B, 1, ..., D); mask has pred.shape[:-1].
    """
    pred, target = pred.to(dtype), target.to(dtype)
    B = target.shape[0]
    d = pred.unflatten(0, (B, clones)) - target.unsqueeze(1)  # (B, M, ..., D)
    if mask is not None:
        d = d[mask.bool().unflatten(0, (B, clones))]  # (N, D)
    if beta == 0:
        per_elem = d * d
    else:
        ad = d.abs()
        per_elem = torch.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)
    per_row = per_elem.sum(dim=-1) * scale
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.numel(), 1)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")
