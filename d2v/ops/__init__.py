"""The three hot ops of data2vec, one public function each, with a `backend=` argument.

    targets(layers, ...)                  top-K layer outputs -> normalized, averaged regression targets
    ema_update_(teacher, student, decay)  the EMA teacher update, in place
    masked_regression_loss(pred, target)  Smooth-L1 / L2 over masked rows, with a fused backward; clones=M
                                          pairs M student clones per sample with one target

Each is a registered torch custom op (namespace `d2v`) so torch.compile does not graph-break on it.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

from d2v.ops import backends
from d2v.ops.backends import BACKENDS, BackendUnavailable
from d2v.ops.reference import NORMS

__all__ = ["targets", "ema_update_", "masked_regression_loss", "grad_dtype", "BACKENDS", "BackendUnavailable",
           "NORMS"]


def _impl(backend: str, device: torch.device):
    return backends.module(backends.resolve(backend, device.type))


def grad_dtype(pred_dtype: torch.dtype) -> torch.dtype:
    """dtype of the loss gradient the backends return: fp32, except bf16 for bf16 pred.

    fp16 cannot hold the unscaled gradient (~1e-5: subnormals) nor a grad scaler's factor (65536 > 65504), so it
    is never the storage type; bf16 has fp32's exponent range, and storing bf16 halves the gradient's traffic.
    """
    return torch.bfloat16 if pred_dtype == torch.bfloat16 else torch.float32


def _same_device(device: torch.device, what: str, tensors) -> None:
    """Refuse tensors on another device than the data: kernels would read them through a foreign pointer."""
    for name, t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device} but the data is on {device}; move it to {device} first")


# ---------------------------------------------------------------------------------------------- targets
@torch.library.custom_op("d2v::targets", mutates_args=())
def _targets_op(
    layers: list[torch.Tensor],
    norm: str,
    final_norm: str,
    mask: torch.Tensor | None,
    padding_mask: torch.Tensor | None,
    eps: float,
    backend: str,
) -> torch.Tensor:
    return _impl(backend, layers[0].device).targets(layers, norm, final_norm, mask, padding_mask, eps)


@_targets_op.register_fake
def _(layers, norm, final_norm, mask, padding_mask, eps, backend):
    B, T, D = layers[0].shape
    if mask is None:
        return layers[0].new_empty((B, T, D), dtype=torch.float32)
    n = torch.library.get_ctx().new_dynamic_size()
    return layers[0].new_empty((n, D), dtype=torch.float32)


def targets(
    layers: Sequence[torch.Tensor] | torch.Tensor,
    norm: str = "layer",
    final_norm: str = "none",
    mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """Regression targets from K teacher layers; no gradient.

    layers: (K, B, T, D) tensor or K tensors (B, T, D), fp32/bf16/fp16. Each is normalized by `norm`
    ("layer": over D, no affine; "instance": per (b, d) over T, padded steps excluded; "none"), the K are
    averaged, then `final_norm` is applied. Returns fp32 (B, T, D), or (N, D) rows where bool `mask` (B, T)
    is True, in row-major (b, t) order. padding_mask: (B, T) bool, True at padded steps.
    """
    layers = list(layers.unbind(0) if isinstance(layers, torch.Tensor) else layers)
    if not layers:
        raise ValueError("targets needs at least one layer")
    shape = layers[0].shape
    if len(shape) != 3 or any(layer.shape != shape for layer in layers):
        raise ValueError(f"targets needs K layers of one shape (B, T, D); got {[tuple(x.shape) for x in layers]}")
    for name, value in (("norm", norm), ("final_norm", final_norm)):
        if value not in NORMS:
            raise ValueError(f"{name} must be one of {NORMS}, got {value!r}")
    for name, m in (("mask", mask), ("padding_mask", padding_mask)):
        if m is not None and (m.dtype != torch.bool or m.shape != shape[:2]):
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(shape[:2])}")
    _same_device(layers[0].device, "targets", [(f"layer {i}", x) for i, x in enumerate(layers)]
                 + [("mask", mask), ("padding_mask", padding_mask)])
    layers = [layer.detach() for layer in layers]
    return _targets_op(layers, norm, final_norm, mask, padding_mask, float(eps), backend)


# ---------------------------------------------------------------------------------------------- EMA
@torch.library.custom_op("d2v::ema_update_", mutates_args=("teacher",))
def _ema_op(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float, backend: str) -> None:
    _impl(backend, teacher[0].device).ema_update_(teacher, student, decay)


@_ema_op.register_fake
def _(teacher, student, decay, backend):
    return None


def ema_update_(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], decay: float, backend: str = "auto"
) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, in place, for every pair of equal-shape tensors.

    teacher: fp32 tensors; student: fp32/bf16/fp16 tensors on the same device.
    """
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_ got {len(teacher)} teacher tensors but {len(student)} student tensors")
    if not teacher:
        return
    for t, s in zip(teacher, student):
        if t.shape != s.shape:
            raise ValueError(f"teacher and student shapes differ: {tuple(t.shape)} vs {tuple(s.shape)}")
        if t.dtype != torch.float32:
            raise ValueError(f"teacher tensors must be float32 (EMA weights are kept in fp32), got {t.dtype}")
    _same_device(teacher[0].device, "ema_update_", [("a teacher tensor", t) for t in teacher]
                 + [("a student tensor", s) for s in student])
    with torch.no_grad():
        _ema_op([t.detach() for t in teacher], [s.detach() for s in student], float(decay), backend)


# ---------------------------------------------------------------------------------------------- loss
@torch.library.custom_op("d2v::masked_regression_loss", mutates_args=())
def _loss_op(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    beta: float,
    scale: float,
    reduction: str,
    need_grad: bool,
    backend: str,
    clones: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _impl(backend, pred.device)
    return impl.masked_regression_loss(pred, target, mask, beta, scale, reduction, need_grad, clones)


@_loss_op.register_fake
def _(pred, target, mask, beta, scale, reduction, need_grad, backend, clones=1):
    # Every backend returns the gradient contiguous, in grad_dtype(pred.dtype), whatever pred's layout; with
    # clones > 1 it is still pred's shape (B*M, ..., D), never target's.
    grad = pred.new_empty(pred.shape, dtype=grad_dtype(pred.dtype)) if need_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=torch.float32), grad


def _loss_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.pred_dtype = inputs[0].dtype
    # The gradient output is never differentiated: without this autograd fills a zero tensor of pred's size for
    # its incoming gradient on every backward (a third of the C++ backend's time on the CPU, issue 25 item 4).
    ctx.set_materialize_grads(False)


def _loss_backward(ctx, grad_loss, _grad_of_grad):
    # The saved gradient is unscaled and in fp32 (bf16 for bf16 pred: the same exponent range); the incoming
    # gradient (a grad scaler's 65536, or 1/65536) is folded in, in fp32, before one rounding to pred's dtype,
    # so fp16 neither overflows nor flushes it to zero. One elementwise kernel either way.
    (grad_pred,) = ctx.saved_tensors
    if _unit_cpu_gradient(grad_loss, grad_pred, ctx.pred_dtype):
        # loss.backward() on the CPU: the saved gradient is already the answer; multiplying by 1 into a fresh
        # tensor cost a full read and write of it (and its page faults), as much as the forward. Autograd copies
        # it where the graph is kept (retain_graph), so the saved tensor is never changed.
        return grad_pred, None, None, None, None, None, None, None, None
    out = torch.empty(grad_pred.shape, dtype=ctx.pred_dtype, device=grad_pred.device)
    torch.mul(grad_pred, grad_loss.to(torch.float32), out=out)
    return out, None, None, None, None, None, None, None, None


def _unit_cpu_gradient(grad_loss: torch.Tensor, grad_pred: torch.Tensor, pred_dtype: torch.dtype) -> bool:
    """Whether the incoming gradient is exactly 1, read on the host only where that is free (a plain CPU tensor,
    not a tracer's), and the saved gradient is already in pred's dtype."""
    return (type(grad_loss) is torch.Tensor and grad_loss.device.type == "cpu" and grad_pred.dtype == pred_dtype
            and not torch.compiler.is_compiling() and grad_loss.numel() == 1 and float(grad_loss) == 1.0)


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def _check_loss_shapes(pred: torch.Tensor, target: torch.Tensor, clones: int) -> None:
    """pred (clones * B, *S, D) against target (B, *S, D), or one ValueError naming both shapes."""
    if isinstance(clones, bool) or not isinstance(clones, (numbers.Integral, torch.SymInt)) or clones < 1:
        raise ValueError(f"clones must be an integer >= 1, got {clones!r}")
    p, t = tuple(pred.shape), tuple(target.shape)
    if (pred.dim() < 2 or pred.dim() != target.dim() or p[1:] != t[1:] or p[0] != clones * t[0]):
        if clones == 1:
            raise ValueError(f"pred and target must have one shape (..., D); got {p} and {t}")
        raise ValueError(f"with clones={clones}, pred must have shape ({clones} * B, ..., D) for target (B, ..., D); "
                         f"got pred {p} and target {t}")


def masked_regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.0,
    scale: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    clones: int = 1,
) -> torch.Tensor:
    """Regression loss of pred on target over selected rows; fp32 scalar, differentiable w.r.t. pred.

    pred, target: (N, D) or (B, T, D); mask: optional bool of pred.shape[:-1] choosing rows.
    Per element d**2 (beta == 0) or smooth-L1 with `beta`; summed over D; times `scale`; then "mean" over
    selected rows or "sum". An empty selection gives 0 and a zero gradient. No host synchronization.
    clones = M (multi-mask): pred is (B*M, ..., D) and target (B, ..., D); pred sample i is compared with target
    sample i // M, as if target were target.repeat_interleave(M, 0), without that copy ever being made.
    """
    _check_loss_shapes(pred, target, clones)
    if mask is not None and (mask.dtype != torch.bool or mask.shape != pred.shape[:-1]):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(pred.shape[:-1])}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    _same_device(pred.device, "masked_regression_loss", [("target", target), ("mask", mask)])
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    loss, _ = _loss_op(pred, target.detach(), mask, float(beta), float(scale), reduction, need_grad, backend,
                       int(clones))
    return loss
