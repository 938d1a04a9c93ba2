"""Compile the Triton kernels for an sm_90 GPU on a machine without one, and count their global memory accesses.

    python tests/triton_codegen.py            # prints one JSON object: {case: {"ptx": {...}, "sass": {...}}}

Each case launches nothing: it binds real (CPU) tensors to the kernel exactly as a launch would (so pointer
alignment and integer divisibility are specialized as on the GPU), then runs `triton.compile` for a CUDA
target of compute capability 9.0. Counted per case: PTX global loads/stores by width (`ld.global.v4.b32` is a
16-byte load) and, when the cubin can be disassembled (cuobjdump bundled with triton), SASS local-memory
accesses (LDL/STL: register spills).

Must run without TRITON_INTERPRET=1 (the interpreter replaces @triton.jit functions), hence a script that
tests/test_codegen.py runs in a subprocess.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

try:  # triton's own launch-time binding (3.3+): private, so a triton without it is reported, not failed
    from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

    UNSUPPORTED = None if hasattr(JITFunction, "_pack_args") else "triton.runtime.jit.JITFunction has no _pack_args"
except ImportError as exc:
    UNSUPPORTED = f"triton.runtime.jit: {exc}"

TARGET = GPUTarget("cuda", 90, 32)


def compile_sm90(kernel, *args, **kwargs):
    """triton.compile of `kernel` bound to args/kwargs as a launch would bind them, for sm_90."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def cuobjdump() -> str | None:
    for path in (os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump",
                 os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def counts(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    out = {"ptx": dict(collections.Counter(re.findall(r"\b(?:ld|st)\.global[.\w]*", ptx)))}
    tool = cuobjdump()
    if tool is not None and "cubin" in compiled.asm:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            res = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True)
        if res.returncode == 0:
            sass = res.stdout
            out["sass"] = {"LDG.128": len(re.findall(r"\bLDG\.E\.128\b", sass)),
                           "local": len(re.findall(r"\b(?:LDL|STL)\b", sass))}
    return out


def cases() -> dict:
    import importlib

    # importlib, not `from d2v.kernels import targets`: the package re-exports the op functions by those names
    ema, regression_loss, targets = (importlib.import_module(f"d2v.kernels.{m}")
                                     for m in ("ema", "regression_loss", "targets"))

    result = {}
    # --- targets rows: K = 6 bf16 views layer[:, 1:] of (B, T + 1, D), as the objective passes them
    B, T, D, K = 2, 196, 768, 6
    full = [torch.empty(B, T + 1, D, dtype=torch.bfloat16) for _ in range(K)]
    views = tuple(x[:, 1:] for x in full)
    out = torch.empty(B * T, D)
    dest = torch.empty(B * T, dtype=torch.int64)
    stats = torch.empty(B, K, D)
    rows, block_d, warps = targets._rows_config(D)
    for name, norm, final in (("layer+final layer", 1, 1), ("instance", 2, 0)):
        result[f"targets rows bf16 {name}"] = counts(compile_sm90(
            targets._targets_rows_kernel, views, stats, stats, dest, out, T, D, views[0].stride(0),
            views[0].stride(1), 1.0 / K, 1e-5, K=K, NORM=norm, FINAL=final, HAS_MASK=True, ROWS=rows,
            BLOCK_D=block_d, num_warps=warps))
    # the same with rows that are not 16-byte aligned (D = 100 bf16: 200-byte rows): must not vectorize
    rows98, block98, warps98 = targets._rows_config(98)
    odd = tuple(torch.empty(B, T, 100, dtype=torch.bfloat16)[:, :, :] for _ in range(K))
    result["targets rows bf16 unaligned"] = counts(compile_sm90(
        targets._targets_rows_kernel, tuple(x[:, :, 1:99] for x in odd), stats, stats, dest, out, T, 98, 100 * T,
        100, 1.0 / K, 1e-5, K=K, NORM=1, FINAL=1, HAS_MASK=True, ROWS=rows98, BLOCK_D=block98, num_warps=warps98))
    # --- instance statistics of 8 bf16 layers (speech)
    layers = tuple(torch.empty(B, 1500, D, dtype=torch.bfloat16) for _ in range(8))
    pad = torch.empty(B, 1500, dtype=torch.uint8)
    stats8 = torch.empty(B, 8, D)
    result["targets instance stats bf16"] = counts(compile_sm90(
        targets._instance_stats_kernel, layers, pad, stats8, stats8, 1500, D, layers[0].stride(0),
        layers[0].stride(1), 1e-5, K=8, HAS_PAD=True, BLOCK_T=64, BLOCK_D=64, num_warps=4))
    # --- EMA: fp32 and bf16 students through the cached pointer table
    tables = [torch.empty(8, dtype=torch.int64) for _ in range(3)] + [torch.empty(8, dtype=torch.int32)] * 2
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[f"ema {name} student"] = counts(compile_sm90(
            ema._ema_update_kernel, *tables, 1e-4, STUDENT_DTYPE=ema.TL_DTYPES[dtype], ALIGNED=True,
            BLOCK=ema.BLOCK, num_warps=ema.NUM_WARPS))
    # --- loss: bf16 pred, fp32 target, bf16 gradient (see d2v.ops.grad_dtype), masked mean
    R = B * T
    pred, target = torch.empty(R, D, dtype=torch.bfloat16), torch.empty(R, D)
    grad = torch.empty(R, D, dtype=torch.bfloat16)
    mask, count = torch.empty(R, dtype=torch.uint8), torch.empty(())
    rows, block_d, warps = regression_loss._rows_config(D)
    partial = torch.empty(triton.cdiv(R, rows))
    result["loss bf16 pred"] = counts(compile_sm90(
        regression_loss._masked_regression_loss_kernel, pred, target, mask, count, grad, partial, R, D, T, T, D, D,
        0.0, 1.0, SMOOTH=False, HAS_MASK=True, COUNT_ON_DEVICE=True, NEED_GRAD=True, CLONED=False, ROWS=rows,
        BLOCK_D=block_d, num_warps=warps))
    # --- the same with M = 8 clones per sample (data2vec 2.0's multi-mask): target rows (B*T, D), pred (B*M*T, D);
    # each pred row computes its target row, and the target loads must stay 16-byte vector loads
    M = 8
    pred, grad = torch.empty(R * M, D, dtype=torch.bfloat16), torch.empty(R * M, D, dtype=torch.bfloat16)
    mask, partial = torch.empty(R * M, dtype=torch.uint8), torch.empty(triton.cdiv(R * M, rows))
    result["loss bf16 pred clones"] = counts(compile_sm90(
        regression_loss._masked_regression_loss_kernel, pred, target, mask, count, grad, partial, R * M, D, T, T * M,
        D, D, 0.0, 1.0, SMOOTH=False, HAS_MASK=True, COUNT_ON_DEVICE=True, NEED_GRAD=True, CLONED=True, ROWS=rows,
        BLOCK_D=block_d, num_warps=warps))
    return result


if __name__ == "__main__":
    json.dump({"_unsupported": f"triton {triton.__version__}: {UNSUPPORTED}"} if UNSUPPORTED else cases(),
              sys.stdout, indent=1, sort_keys=True)
    print()
