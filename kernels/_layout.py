"""Host-side helpers shared by the launchers: dtypes, the launch device, pointer tables, the alignment test."""
from __future__ import annotations

import contextlib

import torch
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def supported(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels read its dtype (fp32/bf16/fp16), else an fp32 copy (float64, ...)."""
    return x if x.dtype in TL_DTYPES else x.float()


def device_of(x: torch.Tensor):
    """Context in which launches go to x's device: Triton launches on the *current* CUDA device, which is not
    necessarily the one the tensors live on (`--device cuda:1`)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def pointer_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(len(tensors),) int64 data_ptrs on `device`; kernels cast each entry with tl.pointer_type.

    On CUDA the table goes through pinned memory with a non-blocking copy, so building it never waits
    for the GPU (a plain pageable copy would synchronize the host with the stream). Callers build it once
    and cache it (EMA); a per-call table would be a host-to-device copy that a CUDA graph replays from a pinned
    buffer the caching host allocator may since have recycled.
    """
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def aligned(tensors: list[torch.Tensor], *strides: int) -> bool:
    """True when every base pointer is 16-byte aligned and every row stride keeps it so (vector loads are safe)."""
    size = tensors[0].element_size()
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all((s * size) % 16 == 0 for s in strides)
