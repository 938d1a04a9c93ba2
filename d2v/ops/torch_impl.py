"""Run-time PyTorch fallback of the three ops: the same math as reference.py, formulated for speed.

Every backend module (this one, d2v.kernels, d2v.ops.extension) exposes the same three functions:

    targets(layers, norm, final_norm, mask, padding_mask, eps) -> fp32 (B, T, D) or (N, D)
    ema_update_(teacher, student, decay) -> None
    masked_regression_loss(pred, target, mask, beta, scale, reduction, need_grad, clones=1) -> (loss, grad_pred)

With clones = M, pred is (B*M, ..., D) against target (B, ..., D): pred sample i pairs with target sample
i // M, and no backend copies target M times (kernels compute the target row from the pred row).
`grad_pred` is d(loss)/d(pred), contiguous, of pred's shape, in d2v.ops.grad_dtype(pred.dtype): fp32, or bf16
for bf16 pred (an empty tensor when need_grad is False). The autograd wrapper in d2v.ops scales it by the
incoming gradient in fp32, then rounds to pred's dtype (a gradient stored in fp16 before that scaling would
flush to zero or, times a grad scaler's 65536, overflow).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalize_(y: torch.Tensor, kind: str, w: torch.Tensor | None, n: torch.Tensor | None, eps: float):
    """Normalize fp32 y (B, T, D); w (B, T, 1) valid-step weights and n (B, 1, 1) their count for instance norm.

    Uses torch's fused layer/instance norm kernels (fp32 math) where no padding is involved.
    """
    if kind == "layer":
        return F.layer_norm(y, y.shape[-1:], eps=eps)
    if kind == "instance":
        if w is None:
            return F.instance_norm(y.transpose(1, 2), eps=eps).transpose(1, 2)
        mean = (y * w).sum(dim=1, keepdim=True) / n
        var = (((y - mean) * w) ** 2).sum(dim=1, keepdim=True) / n
        return (y - mean) * torch.rsqrt(var + eps)
    return y


@torch.no_grad()
def targets(layers, norm, final_norm, mask, padding_mask, eps):
    w = n = None
    if padding_mask is not None and "instance" in (norm, final_norm):
        w = (~padding_mask).unsqueeze(-1).float()  # (B, T, 1)
        n = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    acc = torch.zeros(layers[0].shape, dtype=torch.float32, device=layers[0].device)  # (B, T, D)
    for layer in layers:  # (B, T, D) each
        acc.add_(_normalize_(layer.float(), norm, w, n, eps))
    acc.div_(len(layers))
    acc = _normalize_(acc, final_norm, w, n, eps)
    if mask is not None:
        acc = acc[mask]
    return acc.contiguous()


@torch.no_grad()
def ema_update_(teacher, student, decay):
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for t, s in zip(teacher, student):
        ts, ss = by_dtype.setdefault(s.dtype, ([], []))
        ts.append(t)
        ss.append(s)
    for dtype, (ts, ss) in by_dtype.items():
        if dtype != ts[0].dtype:
            ss = [s.to(ts[0].dtype) for s in ss]
        torch._foreach_lerp_(ts, ss, 1.0 - decay)


def masked_regression_loss(pred, target, mask, beta, scale, reduction, need_grad, clones=1):
    # aten's fused smooth_l1 / mse kernels, forward and backward: one pass each over (..., D), where the
    # composition of elementwise ops it replaces made about ten and was 3-5x slower than eager indexing on the CPU
    # (bench/RESULTS.md, issue 25 item 4). No row selection by index: that would synchronize a GPU with the host;
    # unselected rows get weight 0, in the sum and through the backward's grad_output.
    shape = pred.shape
    if clones > 1:  # broadcast views (B, M, ..., D) - (B, 1, ..., D): target is read, never repeated
        B = target.shape[0]
        pred, target = pred.unflatten(0, (B, clones)), target.unsqueeze(1)
        mask = mask.unflatten(0, (B, clones)) if mask is not None else None
    p = pred.float()
    t = target.float().expand_as(p)  # a view: the fused kernels take strided inputs
    if beta == 0:
        per_elem = F.mse_loss(p, t, reduction="none")
    else:
        per_elem = F.smooth_l1_loss(p, t, reduction="none", beta=beta)
    per_row = per_elem.sum(dim=-1)  # (...)
    if mask is not None:
        w = mask.to(per_row.dtype)
        count = w.sum()
        per_row = per_row * w
    else:
        w = None
        count = torch.tensor(float(per_row.numel()), device=pred.device)
    factor = scale / count.clamp_min(1.0) if reduction == "mean" else torch.tensor(scale, device=pred.device)
    loss = per_row.sum() * factor
    if not need_grad:
        return loss, pred.new_empty(0)
    # d(loss)/d(per_elem) per row: factor on selected rows, 0 elsewhere; broadcast over D as a strided view
    row_grad = (w * factor if w is not None else factor.expand(per_row.shape)).unsqueeze(-1).expand_as(p)
    if beta == 0:
        g = torch.ops.aten.mse_loss_backward(row_grad, p, t, 0)  # 0: reduction "none"
    else:
        g = torch.ops.aten.smooth_l1_loss_backward(row_grad, p, t, 0, beta)
    return loss, g.to(torch.bfloat16 if pred.dtype == torch.bfloat16 else torch.float32).reshape(shape).contiguous()
