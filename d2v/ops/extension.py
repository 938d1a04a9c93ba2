"""The "cpu" and "cuda" op backends: thin wrappers over the compiled ops torch.ops.d2v_ext.* from d2v._C.

Same three functions and conventions as d2v.ops.torch_impl. Importing this module never fails because the
extension is missing; `status(backend)` says whether it can run and why not.
"""
from __future__ import annotations

import importlib

import torch

try:
    _C = importlib.import_module("d2v._C")  # the compiled module (setup.py), not a Python source of this tree
except Exception as exc:  # not built (D2V_BUILD_EXT=0, no compiler, failed build) or built against another torch
    _C = None
    _why = f"{type(exc).__name__}: {exc}".splitlines()[0]
    _LOAD_ERROR = (
        f"d2v._C was not built or does not load ({_why}): it is skipped under D2V_BUILD_EXT=0 and after a failed "
        "build under the default D2V_BUILD_EXT=auto; `D2V_BUILD_EXT=1 pip install --no-build-isolation -e .` "
        "builds it or shows the error"
    )
else:
    _LOAD_ERROR = ""

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def status(backend: str) -> tuple[bool, str]:
    """(available, reason) of the compiled "cpu" or "cuda" backend."""
    if _C is None:
        return False, _LOAD_ERROR
    if backend == "cpu":
        return True, "d2v._C (C++/OpenMP)"
    if backend == "cuda":
        if not _C.with_cuda:
            why = "torch is a CPU build" if torch.version.cuda is None else "nvcc was not found or D2V_BUILD_CUDA=0"
            return False, f"d2v._C was built without CUDA kernels ({why} at install time)"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
        return True, f"d2v._C (CUDA {torch.version.cuda})"
    return False, f"d2v._C has no backend {backend!r}"


def _supported(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in _SUPPORTED else x.float()


def targets(layers, norm, final_norm, mask, padding_mask, eps):
    """K layers (B, T, D) -> fp32 (B, T, D), or (N, D) rows where `mask` is set; see d2v.ops.targets."""
    return torch.ops.d2v_ext.targets([_supported(x) for x in layers], norm, final_norm, mask, padding_mask, eps)


def ema_update_(teacher, student, decay):
    """teacher (fp32) <- decay * teacher + (1 - decay) * student, in place, in one pass over all tensors."""
    torch.ops.d2v_ext.ema_update_(list(teacher), [_supported(s) for s in student], decay)


def masked_regression_loss(pred, target, mask, beta, scale, reduction, need_grad, clones=1):
    """(loss fp32 0-dim, grad_pred contiguous in fp32, bf16 for bf16 pred, or empty); see d2v.ops.grad_dtype.

    clones = M: pred (B*M, ..., D) against target (B, ..., D); the kernels index target rows, never repeat them.
    """
    return torch.ops.d2v_ext.masked_regression_loss(pred, target, mask, beta, scale, reduction, need_grad, clones)


# ---------------------------------------------------------------------------------------------- fake kernels
# Shapes and dtypes of the d2v_ext ops for FakeTensor tracing (torch.compile, opcheck).
if _C is not None:

    @torch.library.register_fake("d2v_ext::targets")
    def _(layers, norm, final_norm, mask, padding_mask, eps):
        B, T, D = layers[0].shape
        if mask is None:
            return layers[0].new_empty((B, T, D), dtype=torch.float32)
        n = torch.library.get_ctx().new_dynamic_size()
        return layers[0].new_empty((n, D), dtype=torch.float32)

    @torch.library.register_fake("d2v_ext::ema_update_")
    def _(teacher, student, decay):
        return None

    @torch.library.register_fake("d2v_ext::masked_regression_loss")
    def _(pred, target, mask, beta, scale, reduction, need_grad, clones=1):
        dtype = torch.bfloat16 if pred.dtype == torch.bfloat16 else torch.float32
        grad = pred.new_empty(pred.shape, dtype=dtype) if need_grad else pred.new_empty(0)
        return pred.new_empty((), dtype=torch.float32), grad
