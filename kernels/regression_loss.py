"""Masked regression loss in Triton: loss and d(loss)/d(pred) in one pass, without gathering pred[mask].

Each program takes a block of rows, reads pred and target only for selected rows, writes the gradient of
every row (zero where not selected) and one partial loss. The mean's denominator (the mask count) is a
device tensor the kernel loads, and the partials are summed on device in a fixed order, so the op never
synchronizes with the host and is deterministic. With clones = M (multi-mask) pred holds M clones of each
sample; the kernel computes each pred row's target row, so target is read in place, never repeated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import device_of, supported


@triton.jit
def _masked_regression_loss_kernel(
    pred_ptr,  # (R, D) rows stride_pred apart: (B*M, *S) rows of D
    target_ptr,  # (R / M, D) rows stride_target apart: (B, *S) rows of D
    mask_ptr,  # (R,) uint8, nonzero at selected rows (HAS_MASK only)
    count_ptr,  # () fp32 number of selected rows (COUNT_ON_DEVICE only)
    grad_ptr,  # (R, D) contiguous, fp32 or bf16 (NEED_GRAD only)
    partial_ptr,  # (n_programs,) fp32 out: this program's share of the loss
    R, D,
    rows_per_sample, rows_per_group,  # prod(S), and M * prod(S): the pred rows of one target sample (CLONED only)
    stride_pred, stride_target,
    beta, factor,  # factor: scale, already divided by the row count when that is known on the host
    SMOOTH: tl.constexpr,  # smooth-L1 with beta, else squared error
    HAS_MASK: tl.constexpr,
    COUNT_ON_DEVICE: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    CLONED: tl.constexpr,  # M > 1
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    # pred row r = (b * M + m) * prod(S) + s reads target row b * prod(S) + s
    if CLONED:
        t_rows = (rows // rows_per_group) * rows_per_sample + rows % rows_per_sample
    else:
        t_rows = rows
    selected = row_ok
    if HAS_MASK:
        selected = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
    if COUNT_ON_DEVICE:
        factor = factor / tl.maximum(tl.load(count_ptr), 1.0)
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        ok = selected[:, None] & (c < D)[None, :]
        p = tl.load(pred_ptr + rows[:, None] * stride_pred + c[None, :], mask=ok, other=0.0).to(tl.float32)
        y = tl.load(target_ptr + t_rows[:, None] * stride_target + c[None, :], mask=ok, other=0.0).to(tl.float32)
        d = p - y  # 0 outside selected rows
        if SMOOTH:
            ad = tl.abs(d)
            small = ad < beta
            acc += tl.where(ok, tl.where(small, 0.5 * d * d / beta, ad - 0.5 * beta), 0.0)
            g = tl.where(small, d / beta, tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)))
        else:
            acc += d * d
            g = 2.0 * d
        if NEED_GRAD:
            g = tl.where(ok, g * factor, 0.0)
            out_ok = row_ok[:, None] & (c < D)[None, :]
            tl.store(grad_ptr + rows[:, None] * D + c[None, :], g.to(grad_ptr.dtype.element_ty), mask=out_ok)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0) * factor)


def _rows_config(D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps): ~4K elements per tile, several rows per program when D is small."""
    block_d = min(1024, triton.next_power_of_2(D))
    rows = max(1, min(256, 4096 // block_d))
    return rows, block_d, 8 if rows * block_d >= 4096 else 4


def _grad_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if pred.dtype == torch.bfloat16 else torch.float32


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (R, D) of a supported dtype with unit stride over D, copying only when required."""
    x = supported(x).reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def masked_regression_loss(pred, target, mask, beta, scale, reduction, need_grad, clones=1):
    """pred (B*M, *S, D), target (B, *S, D) with M = clones; mask bool pred.shape[:-1] or None
    -> (fp32 loss (), grad of pred's shape or empty).

    The gradient is fp32, or bf16 for bf16 pred, never fp16: the autograd wrapper folds in the incoming gradient
    before rounding to pred's dtype.
    """
    with device_of(pred):
        return _loss(pred, target, mask, beta, scale, reduction, need_grad, clones)


def _loss(pred, target, mask, beta, scale, reduction, need_grad, clones):
    D = pred.shape[-1]
    device = pred.device
    if pred.numel() == 0:  # no rows, or D = 0: zero loss, (empty) zero gradient
        grad = torch.zeros(pred.shape, dtype=_grad_dtype(pred), device=device) if need_grad else pred.new_empty(0)
        return torch.zeros((), dtype=torch.float32, device=device), grad
    p, y = _rows_2d(pred), _rows_2d(target)
    R = p.shape[0]
    rows_per_sample = R // pred.shape[0]  # pred.numel() > 0, so pred.shape[0] > 0
    grad = torch.empty(pred.shape, dtype=_grad_dtype(pred), device=device) if need_grad else pred.new_empty(0)
    count = None
    factor = float(scale)
    if reduction == "mean":
        if mask is not None:
            count = mask.sum(dtype=torch.float32)  # stays on device: no sync
        else:
            factor /= R
    m = mask.reshape(-1).contiguous().view(torch.uint8) if mask is not None else p
    rows, block_d, warps = _rows_config(D)
    grid = triton.cdiv(R, rows)
    partial = torch.empty(grid, dtype=torch.float32, device=device)
    _masked_regression_loss_kernel[(grid,)](
        p, y, m, count if count is not None else partial, grad if need_grad else partial, partial,
        R, D, rows_per_sample, rows_per_sample * clones, p.stride(0), y.stride(0), float(beta), factor,
        SMOOTH=beta > 0, HAS_MASK=mask is not None, COUNT_ON_DEVICE=count is not None, NEED_GRAD=need_grad,
        CLONED=clones > 1,
        ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )
    return partial.sum(), grad
