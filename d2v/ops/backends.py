"""Which implementation of the hot ops runs: availability of each backend and resolution of "auto".

Backends: "torch" (always), "triton" (d2v.kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"cuda" and "cpu" (the compiled extension d2v._C). An explicitly requested backend that cannot run raises
BackendUnavailable with the reason; there is no silent fallback.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


class BackendUnavailable(RuntimeError):
    """The requested op backend cannot run here; the message says why."""


@functools.lru_cache(maxsize=None)
def import_optional(name: str) -> tuple[ModuleType | None, str]:
    """(the module, "") when `name` imports, else (None, one line saying why); cached."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or a broken build raising anything at import
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def status(backend: str, device_type: str) -> tuple[bool, str]:
    """(available, reason) of `backend` for tensors on `device_type` ("cpu" or "cuda")."""
    if device_type == "cuda" and backend in ("torch", "triton", "cuda"):
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch"
    if backend == "torch":
        return True, "pure PyTorch"
    if backend == "triton":
        mod, why = import_optional("triton")
        if mod is None:
            return False, f"triton is not importable ({why}); pip install 'd2v[triton]'"
        if device_type == "cpu" and not triton_interpreting():
            return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type != "cpu" and triton_interpreting():
            return False, "TRITON_INTERPRET=1 is set, so Triton cannot run on the GPU"
        kern, why = import_optional("d2v.kernels")
        if kern is None:
            return False, f"d2v.kernels failed to import ({why})"
        return True, f"triton {mod.__version__}" + (" (interpreter)" if triton_interpreting() else "")
    if backend in ("cpu", "cuda"):
        if backend != device_type:
            return False, f"the {backend!r} backend runs only {backend.upper()} tensors, got {device_type.upper()} tensors"
        ext, why = import_optional("d2v.ops.extension")
        if ext is None:
            return False, f"the compiled extension d2v._C is not available ({why})"
        return ext.status(backend)
    raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def auto_order(device_type: str) -> tuple[str, ...]:
    """Preference of "auto", fastest first, per device (from bench/RESULTS.md).

    CUDA: the compiled extension when it is built, else Triton. Measured on an H100 (bench/RESULTS.md, 2026-11-25):
    the extension was faster than Triton in 9 of the 10 kernel cases, by up to 1.6x (loss at ViT-B); the tenth
    (targets at ViT-B) was 0.270 vs 0.264 ms."""
    if device_type == "cuda":
        return ("cuda", "triton", "torch")
    return ("cpu", "torch")


def resolve(backend: str, device_type: str) -> str:
    """Turn "auto" into a concrete backend; check that an explicit one can run."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        for name in auto_order(device_type):
            if name == "triton" and triton_interpreting():
                continue  # the interpreter is a test tool, never picked automatically
            if status(name, device_type)[0]:
                return name
        return "torch"
    ok, why = status(backend, device_type)
    if not ok:
        raise BackendUnavailable(f"op backend {backend!r} is unavailable: {why}")
    return backend


def module(backend: str) -> ModuleType:
    """The module holding `backend`'s implementations of the three ops."""
    name = {"torch": "d2v.ops.torch_impl", "triton": "d2v.kernels", "cpu": "d2v.ops.extension",
            "cuda": "d2v.ops.extension"}[backend]
    mod, why = import_optional(name)
    if mod is None:
        raise BackendUnavailable(f"op backend {backend!r} is unavailable: {why}")
    return mod


def report() -> list[tuple[str, str, bool, str]]:
    """(backend, device, available, reason) for every concrete backend and device type."""
    rows = []
    for device_type in ("cpu", "cuda"):
        for name in BACKENDS[1:]:
            if name in ("cpu", "cuda") and name != device_type:
                continue
            ok, why = status(name, device_type)
            rows.append((name, device_type, ok, why))
    return rows
