"""EMA teacher update in Triton: teacher <- teacher + (1 - decay) * (student - teacher), in place.

The whole parameter set goes in one launch per student dtype, whatever the number of tensors: a pointer
table (int64 data_ptrs of every teacher and student tensor) plus a block map (for every program, which
tensor and which block of it). Parameters stay where the model allocated them; no flat buffer is required.
The tables depend only on the pointers and sizes, so they are built once and cached: a training loop pays
for them on its first step only.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._layout import TL_DTYPES, device_of, pointer_table, supported

BLOCK = 4096  # elements per program: 16 KB of fp32 teacher, read and written once
NUM_WARPS = 8


@triton.jit
def _ema_update_kernel(
    teacher_ptrs,  # (n_tensors,) int64 data_ptrs of contiguous fp32 teacher tensors
    student_ptrs,  # (n_tensors,) int64 data_ptrs of contiguous student tensors (STUDENT_DTYPE)
    numels,  # (n_tensors,) int64 element counts
    block_tensor,  # (n_programs,) int32: which tensor this program updates
    block_index,  # (n_programs,) int32: which BLOCK of that tensor
    weight,  # 1 - decay
    STUDENT_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(block_tensor + pid)
    start = tl.load(block_index + pid).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    n = tl.load(numels + i)
    t_base = tl.load(teacher_ptrs + i).to(tl.pointer_type(tl.float32))
    s_base = tl.load(student_ptrs + i).to(tl.pointer_type(STUDENT_DTYPE))
    if ALIGNED:
        # The hint goes on the pointer: put on the integer before the int-to-pointer cast it is lost, and the
        # loads stay scalar (tests/test_codegen.py checks for 16-byte ld.global.v4 in the PTX).
        t_base = tl.multiple_of(t_base, 16)
        s_base = tl.multiple_of(s_base, 16)
    t_ptr = t_base + offs
    s_ptr = s_base + offs
    # A mask against a size loaded from memory defeats vector loads (its alignment is unknown), so only a
    # tensor's last block is masked.
    if start + BLOCK <= n:
        t = tl.load(t_ptr)
        s = tl.load(s_ptr).to(tl.float32)
        tl.store(t_ptr, t + weight * (s - t))
    else:
        ok = offs < n
        t = tl.load(t_ptr, mask=ok)
        s = tl.load(s_ptr, mask=ok).to(tl.float32)
        tl.store(t_ptr, t + weight * (s - t), mask=ok)


_TABLES: OrderedDict[tuple, tuple] = OrderedDict()
_TABLES_KEPT = 8


def _tables(teacher: list[torch.Tensor], student: list[torch.Tensor]):
    """(teacher_ptrs, student_ptrs, numels, block_tensor, block_index, aligned) for one dtype group, cached."""
    key = (teacher[0].device, student[0].dtype, tuple(t.data_ptr() for t in teacher),
           tuple(s.data_ptr() for s in student), tuple(t.numel() for t in teacher))
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    device = teacher[0].device
    numels = torch.tensor(key[4], dtype=torch.int64)
    blocks = (numels + BLOCK - 1) // BLOCK  # (n_tensors,)
    block_tensor = torch.repeat_interleave(torch.arange(len(teacher), dtype=torch.int32), blocks)
    starts = torch.cumsum(blocks, 0) - blocks
    block_index = (torch.arange(int(blocks.sum()), dtype=torch.int64) - starts.repeat_interleave(blocks)).int()
    aligned = all(p % 16 == 0 for p in key[2] + key[3])
    entry = (pointer_table(teacher, device), pointer_table(student, device), numels.to(device),
             block_tensor.to(device), block_index.to(device), aligned)
    _TABLES[key] = entry
    while len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return entry


@torch.no_grad()
def ema_update_(teacher, student, decay):
    """teacher: fp32 tensors; student: fp32/bf16/fp16 (others via fp32) tensors of the same shapes; in place."""
    if teacher:
        with device_of(teacher[0]):
            _ema_update(teacher, student, decay)


def _ema_update(teacher, student, decay):
    groups: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for t, s in zip(teacher, student):
        if t.numel() == 0:
            continue
        work = t if t.is_contiguous() else t.contiguous()  # a non-contiguous teacher is updated via a copy
        s = supported(s).contiguous()
        groups.setdefault(s.dtype, []).append((t, work, s))
    for dtype, members in groups.items():
        works = [w for _, w, _ in members]
        students = [s for _, _, s in members]
        t_ptrs, s_ptrs, numels, block_tensor, block_index, aligned_ = _tables(works, students)
        _ema_update_kernel[(block_tensor.numel(),)](
            t_ptrs, s_ptrs, numels, block_tensor, block_index, 1.0 - decay,
            STUDENT_DTYPE=TL_DTYPES[dtype], ALIGNED=aligned_, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
        for t, work, _ in members:
            if work is not t:
                t.copy_(work)


def interpreted() -> bool:
    """True when the imported triton runs these kernels in its interpreter (decided when they were decorated, by
    TRITON_INTERPRET=1 at import)."""
    return type(_ema_update_kernel).__name__ == "InterpretedFunction"
