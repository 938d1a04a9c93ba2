"""Triton backend of the three hot ops (installed as d2v.kernels); see d2v/ops/torch_impl.py for the interface.

One file per op: targets.py, ema.py, regression_loss.py, each with its kernels and host launcher.
Runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (a test tool: slow, never timed).
"""
from .ema import ema_update_, interpreted
from .regression_loss import masked_regression_loss
from .targets import targets

__all__ = ["targets", "ema_update_", "masked_regression_loss", "interpreted"]

