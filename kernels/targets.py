"""Regression targets from K teacher layers in Triton: per-layer norm, average, final norm, masked-row gather.

Two kernels:
  _instance_stats_kernel  per (layer, b, D-block): mean and rstd over the valid steps of T (instance norm only)
  _targets_rows_kernel    per block of rows: normalize each layer, average, final layer norm, write the row
                          (or, with a mask, only masked rows, at their compacted index)

Layer norm reads each layer once. Instance norm reads each layer twice (stats, then rows): the statistics
span all of T, so a single pass would have to keep a whole (T, D-block) slab per layer on chip. A final
instance norm is three launches: the average is written once in fp32, its statistics taken, then normalized.

The K layers are passed as a table of int64 data_ptrs (no stacking copy); they must share strides, which is
what unbind() of a (K, B, T, D) tensor or K separate (B, T, D) activations give; otherwise they are copied.

With a mask the output size N is data dependent, so this op makes one host sync (`.item()` on the mask's
cumulative count) to allocate (N, D). The instance statistics are launched before that sync so the GPU keeps
working while the host waits. The other two ops never sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import TL_DTYPES, aligned, pointer_table

_NORM_CODE = {"none": 0, "layer": 1, "instance": 2}


@triton.jit
def _instance_stats_kernel(
    layer_ptrs,  # (K,) int64 data_ptrs of the layers, each (B, T, D) with strides (stride_b, stride_t, 1)
    pad_ptr,  # (B, T) uint8, nonzero at padded steps (HAS_PAD only)
    mean_ptr,  # (K, B, D) fp32 out
    rstd_ptr,  # (K, B, D) fp32 out
    B, T, D,
    stride_b, stride_t,
    eps,
    DTYPE: tl.constexpr,
    HAS_PAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k = tl.program_id(2).to(tl.int64)
    base = tl.load(layer_ptrs + k)
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    x_ptr = base.to(tl.pointer_type(DTYPE)) + b * stride_b
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    steps = tl.arange(0, BLOCK_T)

    # Chan's parallel update: exact mean / M2 per chunk of T, merged into running ones (no sum-of-squares
    # cancellation when |mean| >> std, which teacher activations often have).
    n = tl.zeros((), tl.float32)
    mean = tl.zeros((BLOCK_D,), tl.float32)
    m2 = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + steps
        valid = t < T
        if HAS_PAD:
            valid = valid & (tl.load(pad_ptr + b * T + t, mask=t < T, other=1) == 0)
        w = valid.to(tl.float32)[:, None]  # (BLOCK_T, 1)
        ok = valid[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + t.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        n_c = tl.sum(valid.to(tl.float32), axis=0)
        mean_c = tl.sum(x, axis=0) / tl.maximum(n_c, 1.0)
        xc = (x - mean_c[None, :]) * w
        m2_c = tl.sum(xc * xc, axis=0)
        n_new = n + n_c
        delta = mean_c - mean
        frac = n_c / tl.maximum(n_new, 1.0)
        mean = mean + delta * frac
        m2 = m2 + m2_c + delta * delta * (n * frac)
        n = n_new
    rstd = tl.rsqrt(m2 / tl.maximum(n, 1.0) + eps)
    out = (k * B + b) * D + cols
    tl.store(mean_ptr + out, mean, mask=col_ok)
    tl.store(rstd_ptr + out, rstd, mask=col_ok)


@triton.jit
def _layer_norm_rows(x, ok, D, eps):
    """Parameter-free layer norm of each row of fp32 x (ROWS, BLOCK_D); lanes outside `ok` stay 0."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    return xc * tl.rsqrt(var + eps)[:, None]


@triton.jit
def _targets_rows_kernel(
    layer_ptrs,  # (K,) int64 data_ptrs of the layers, each (B, T, D) with strides (stride_b, stride_t, 1)
    mean_ptr,  # (K, B, D) fp32 instance-norm means (NORM == 2 only)
    rstd_ptr,  # (K, B, D) fp32 instance-norm rstds (NORM == 2 only)
    dest_ptr,  # (B * T,) int64 output row of each input row, -1 where not selected (HAS_MASK only)
    out_ptr,  # (N, D) fp32, N = B * T without a mask
    K, B, T, D,
    stride_b, stride_t,
    inv_k, eps,
    DTYPE: tl.constexpr,
    NORM: tl.constexpr,  # 0 none, 1 layer, 2 instance (from precomputed stats)
    FINAL: tl.constexpr,  # 0 none, 1 layer
    HAS_MASK: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # flat (b, t) indices
    row_ok = rows < B * T
    dest = rows
    if HAS_MASK:
        dest = tl.load(dest_ptr + rows, mask=row_ok, other=-1)
        row_ok = dest >= 0  # unselected rows are never read
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    b = rows // T
    t = rows % T
    in_off = (b * stride_b + t * stride_t)[:, None] + cols[None, :]  # (ROWS, BLOCK_D) int64

    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for k in range(K):
        base = tl.load(layer_ptrs + k)
        if ALIGNED:
            base = tl.multiple_of(base, 16)
        x = tl.load(base.to(tl.pointer_type(DTYPE)) + in_off, mask=ok, other=0.0).to(tl.float32)
        if NORM == 1:
            x = _layer_norm_rows(x, ok, D, eps)
        elif NORM == 2:
            stat = (k * B + b)[:, None] * D + cols[None, :]
            mu = tl.load(mean_ptr + stat, mask=ok, other=0.0)
            rs = tl.load(rstd_ptr + stat, mask=ok, other=0.0)
            x = (x - mu) * rs
        acc += x
    acc = acc * inv_k
    if FINAL == 1:
        acc = _layer_norm_rows(acc, ok, D, eps)
    tl.store(out_ptr + dest[:, None] * D + cols[None, :], acc, mask=ok)


def _common_layout(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Layers of one dtype sharing (stride_b, stride_t, 1); copies only when they do not already."""
    if len({x.dtype for x in layers}) > 1:
        layers = [x.float() for x in layers]
    strides = {x.stride() for x in layers}
    if len(strides) > 1 or layers[0].stride(-1) != 1:
        layers = [x.contiguous() for x in layers]
    return layers


def _rows_config(D: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_D, num_warps): a whole row per program, several rows when D is small (~4K elements)."""
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(64, 4096 // block_d))
    return rows, block_d, 8 if rows * block_d >= 4096 else 4


def _instance_stats(layers, table, padding_mask, eps, aligned_):
    B, T, D = layers[0].shape
    K = len(layers)
    mean = torch.empty((K, B, D), dtype=torch.float32, device=layers[0].device)
    rstd = torch.empty_like(mean)
    pad = padding_mask.contiguous().view(torch.uint8) if padding_mask is not None else mean
    block_d = min(64, triton.next_power_of_2(D))
    block_t = max(1, min(64, 4096 // block_d, triton.next_power_of_2(T)))
    _instance_stats_kernel[(triton.cdiv(D, block_d), B, K)](
        table, pad, mean, rstd, B, T, D, layers[0].stride(0), layers[0].stride(1), eps,
        DTYPE=TL_DTYPES[layers[0].dtype], HAS_PAD=padding_mask is not None, ALIGNED=aligned_,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return mean, rstd


def _targets_pass(layers, norm, final_norm, mask, padding_mask, eps):
    """One rows launch (plus the stats launch for instance norm); final_norm here is "none" or "layer"."""
    layers = _common_layout(layers)
    x0 = layers[0]
    B, T, D = x0.shape
    device = x0.device
    table = pointer_table(layers, device)
    aligned_ = aligned(layers, x0.stride(0), x0.stride(1))
    mean = rstd = None
    if norm == "instance":
        mean, rstd = _instance_stats(layers, table, padding_mask, eps, aligned_)
    if mask is not None:
        selected = mask.reshape(-1)
        position = torch.cumsum(selected, 0)  # (B*T,) int64, on device
        n = int(position[-1].item()) if position.numel() else 0  # the one host sync: the size of (N, D)
        dest = torch.where(selected, position - 1, -1)
    else:
        n, dest = B * T, None
    out = torch.empty((n, D), dtype=torch.float32, device=device)
    if n == 0 or D == 0:
        return out if mask is not None else out.view(B, T, D)
    rows, block_d, warps = _rows_config(D)
    _targets_rows_kernel[(triton.cdiv(B * T, rows),)](
        table, mean if mean is not None else out, rstd if rstd is not None else out,
        dest if dest is not None else out, out,
        len(layers), B, T, D, x0.stride(0), x0.stride(1), 1.0 / len(layers), eps,
        DTYPE=TL_DTYPES[x0.dtype], NORM=_NORM_CODE[norm], FINAL=_NORM_CODE[final_norm],
        HAS_MASK=mask is not None, ALIGNED=aligned_, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )
    return out if mask is not None else out.view(B, T, D)


@torch.no_grad()
def targets(layers, norm, final_norm, mask, padding_mask, eps):
    """K layers (B, T, D) fp32/bf16/fp16 -> fp32 (B, T, D), or (N, D) rows where `mask` (B, T) is True."""
    layers = list(layers)
    pad = padding_mask if "instance" in (norm, final_norm) else None
    if final_norm == "instance":
        average = _targets_pass(layers, norm, "none", None, pad, eps)  # (B, T, D) fp32
        return _targets_pass([average], "instance", "none", mask, pad, eps)
    return _targets_pass(layers, norm, final_norm, mask, pad, eps)
