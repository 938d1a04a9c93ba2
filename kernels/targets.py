"""Regression targets from K teacher layers in Triton: per-layer norm, average, final norm, masked-row gather.

Two kernels:
  _instance_stats_kernel  per (D-block, b, layer): Chan-merged mean and M2 over the valid steps of T, written as
                          a per-(b, layer, d) scale = rstd and shift = mean (instance norm only), applied
                          as (x - mean) * rstd: exactly 0 for a constant channel, where x * rstd - mean * rstd
                          (one FMA) leaves the rounding error of mean * rstd for a final layer norm to amplify
  _targets_rows_kernel    per (block of steps, b): normalize each layer, average, final layer norm, write the
                          rows once (or, with a mask, only masked rows, at their compacted index)

The K layers are kernel arguments (a tuple of tensors; K is a compile-time constant), not a device table of
pointers: no host-to-device copy per call (nothing for a CUDA graph to replay from recycled pinned memory), and
Triton specializes each pointer on 16-byte alignment, which is what lets the loads vectorize (16-byte
`ld.global.v4`; tests/test_codegen.py checks the PTX). The K-loop is unrolled and loads layer k+1 before
normalizing layer k, so the next layer's loads are in flight during the reductions.

Layer norm reads each layer once. Instance norm reads each layer twice (stats, then rows): the statistics span
all of T, so a single pass would have to keep a whole (T, D-block) slab per layer on chip. A final instance
norm is three launches: the average is written once in fp32, its statistics taken, then normalized.

The layers must share strides (stride_b, stride_t, 1), which is what unbind() of a (K, B, T, D) tensor, K
separate (B, T, D) activations or K views layer[:, 1:] give; otherwise they are copied.

With a mask the output size N is data dependent, so this op makes one host sync (`.item()` on the mask's
cumulative count) to allocate (N, D). The instance statistics are launched before that sync so the GPU keeps
working while the host waits. The other two ops never sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import device_of, supported

_NORM_CODE = {"none": 0, "layer": 1, "instance": 2}


@triton.jit
def _instance_stats_kernel(
    layers,  # tuple of K tensors (B, T, D) with strides (stride_b, stride_t, 1)
    pad_ptr,  # (B, T) uint8, nonzero at padded steps (HAS_PAD only)
    scale_ptr,  # (B, K, D) fp32 out: rstd
    shift_ptr,  # (B, K, D) fp32 out: mean
    T, D,
    stride_b, stride_t,
    eps,
    K: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k = tl.program_id(2)
    x_ptr = layers[0]
    for j in tl.static_range(1, K):  # this program's layer: a select between kernel arguments, no table
        if k == j:
            x_ptr = layers[j]
    x_ptr = x_ptr + b * stride_b
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
    out = (b * K + k) * D + cols
    tl.store(scale_ptr + out, rstd, mask=col_ok)
    tl.store(shift_ptr + out, mean, mask=col_ok)


@triton.jit
def _layer_norm_rows(x, ok, D, eps):
    """Parameter-free layer norm of each row of fp32 x (ROWS, BLOCK_D); lanes outside `ok` stay 0."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    return xc * tl.rsqrt(var + eps)[:, None]


@triton.jit
def _targets_rows_kernel(
    layers,  # tuple of K tensors (B, T, D) with strides (stride_b, stride_t, 1)
    scale_ptr,  # (B, K, D) fp32 instance-norm scale (NORM == 2 only)
    shift_ptr,  # (B, K, D) fp32 instance-norm mean (NORM == 2 only)
    dest_ptr,  # (B * T,) int64 output row of each input row, -1 where not selected (HAS_MASK only)
    out_ptr,  # (N, D) fp32, N = B * T without a mask
    T, D,
    stride_b, stride_t,
    inv_k, eps,
    K: tl.constexpr,
    NORM: tl.constexpr,  # 0 none, 1 layer, 2 instance (from precomputed scale/shift)
    FINAL: tl.constexpr,  # 0 none, 1 layer
    HAS_MASK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (T blocks, B): every row of a program has the same b, so no division per row, and the instance
    # scale/shift of (b, layer) is one (BLOCK_D,) vector per layer, broadcast over the rows.
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b = tl.program_id(1).to(tl.int64)
    row_ok = t < T
    dest = b * T + t
    if HAS_MASK:
        dest = tl.load(dest_ptr + dest, mask=row_ok, other=-1)
        row_ok = dest >= 0  # unselected rows are never read
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    in_off = b * stride_b + t.to(tl.int64)[:, None] * stride_t + cols[None, :]  # (ROWS, BLOCK_D) int64

    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    x = tl.load(layers[0] + in_off, mask=ok, other=0.0)
    for k in tl.static_range(K):
        if k + 1 < K:  # prefetch: layer k+1's loads are issued before layer k's reductions
            x_next = tl.load(layers[k + 1] + in_off, mask=ok, other=0.0)
        xf = x.to(tl.float32)
        if NORM == 1:
            xf = _layer_norm_rows(xf, ok, D, eps)
        elif NORM == 2:
            stat = (b * K + k) * D + cols
            sc = tl.load(scale_ptr + stat, mask=col_ok, other=0.0)
            sh = tl.load(shift_ptr + stat, mask=col_ok, other=0.0)
            xf = (xf - sh[None, :]) * sc[None, :]
        acc += xf
        if k + 1 < K:
            x = x_next
    acc = acc * inv_k
    if FINAL == 1:
        acc = _layer_norm_rows(acc, ok, D, eps)
    tl.store(out_ptr + dest[:, None] * D + cols[None, :], acc, mask=ok)


def _common_layout(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Layers of one supported dtype sharing (stride_b, stride_t, 1); copies only when they do not already."""
    layers = [supported(x) for x in layers]
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


def _instance_stats(layers, padding_mask, eps):
    B, T, D = layers[0].shape
    K = len(layers)
    scale = torch.empty((B, K, D), dtype=torch.float32, device=layers[0].device)
    shift = torch.empty_like(scale)
    pad = padding_mask.contiguous().view(torch.uint8) if padding_mask is not None else scale
    block_d = min(64, triton.next_power_of_2(D))
    block_t = max(1, min(64, 4096 // block_d, triton.next_power_of_2(T)))
    _instance_stats_kernel[(triton.cdiv(D, block_d), B, K)](
        tuple(layers), pad, scale, shift, T, D, layers[0].stride(0), layers[0].stride(1), eps,
        K=K, HAS_PAD=padding_mask is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return scale, shift


def _targets_pass(layers, norm, final_norm, mask, padding_mask, eps):
    """One rows launch (plus the stats launch for instance norm); final_norm here is "none" or "layer"."""
    layers = _common_layout(layers)
    x0 = layers[0]
    B, T, D = x0.shape
    device = x0.device
    if B * T == 0 or D == 0:  # nothing to normalize; the (possibly empty) selection of an empty result
        n = int(mask.sum()) if mask is not None else B * T
        return torch.zeros((n, D) if mask is not None else (B, T, D), dtype=torch.float32, device=device)
    scale = shift = None
    if norm == "instance":
        scale, shift = _instance_stats(layers, padding_mask, eps)
    if mask is not None:
        selected = mask.reshape(-1)
        position = torch.cumsum(selected, 0)  # (B*T,) int64, on device
        n = int(position[-1].item())  # the one host sync: the size of (N, D)
        dest = torch.where(selected, position - 1, -1)
    else:
        n, dest = B * T, None
    out = torch.empty((n, D), dtype=torch.float32, device=device)
    if n == 0:
        return out
    rows, block_d, warps = _rows_config(D)
    _targets_rows_kernel[(triton.cdiv(T, rows), B)](
        tuple(layers), scale if scale is not None else out, shift if shift is not None else out,
        dest if dest is not None else out, out,
        T, D, x0.stride(0), x0.stride(1), 1.0 / len(layers), eps,
        K=len(layers), NORM=_NORM_CODE[norm], FINAL=_NORM_CODE[final_norm],
        HAS_MASK=mask is not None, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )
    return out if mask is not None else out.view(B, T, D)


@torch.no_grad()
def targets(layers, norm, final_norm, mask, padding_mask, eps):
    """K layers (B, T, D) fp32/bf16/fp16 -> fp32 (B, T, D), or (N, D) rows where `mask` (B, T) is True.

    Other float dtypes (float64) are computed from an fp32 copy, as the other backends do.
    """
    layers = list(layers)
    pad = padding_mask if "instance" in (norm, final_norm) else None
    with device_of(layers[0]):
        if final_norm == "instance":
            average = _targets_pass(layers, norm, "none", None, pad, eps)  # (B, T, D) fp32
            return _targets_pass([average], "instance", "none", mask, pad, eps)
        return _targets_pass(layers, norm, final_norm, mask, pad, eps)
