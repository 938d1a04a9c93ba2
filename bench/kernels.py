"""Kernel benchmark of the three hot ops: every available implementation at realistic sizes.

Implementations per op: the readable reference ("reference", eager fp32), the run-time torch fallback
("torch"), torch.compile of the reference ("compile"), Triton ("triton"), every other backend that
d2v.ops.backends reports available (the compiled extension), and for EMA torch._foreach_lerp_ on its own.
Each row: median time, the bytes the op must minimally move, GB/s, % of a measured device copy bandwidth,
and speedups over the eager reference and its torch.compile.

Triton's CPU interpreter is only run when asked (include_interpreter): its timings mean nothing.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

MB = 1 << 20


# ---------------------------------------------------------------------------------------------- cases
def vit_param_shapes(dim: int, depth: int, mlp: int, patch: int = 16, tokens: int = 197) -> list[tuple[int, ...]]:
    """Parameter shapes of a ViT encoder (timm layout): patch embed, cls/pos embed, blocks, final norm."""
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (mlp, dim), (mlp,), (dim, mlp), (dim,)]
    return shapes + [(dim,), (dim,)]


@dataclass
class TargetsCase:
    name: str
    B: int
    T: int
    D: int
    K: int
    norm: str
    final_norm: str
    dtype: torch.dtype
    mask_prob: float | None  # None: targets for every step (what the objective asks for)
    pad_prob: float | None  # None: no padding mask
    prefix: int = 0  # leading tokens (cls) the objective slices off: layers are views layer[:, prefix:]


@dataclass
class EmaCase:
    name: str
    shapes: list
    student_dtype: torch.dtype


@dataclass
class LossCase:
    name: str
    B: int
    T: int
    D: int
    mask_prob: float
    dtype: torch.dtype  # pred's dtype; the target is fp32, as ops.targets returns it
    backward: bool = True
    clones: int = 1  # M: pred (B*M, T, D) against target (B, T, D), data2vec 2.0's multi-mask


def cases(quick: bool):
    """(targets, ema, loss) cases at the sizes training runs (issue 11), or tiny ones that run in seconds."""
    if quick:
        return ([TargetsCase("tiny layer K=3", 2, 9, 32, 3, "layer", "layer", torch.bfloat16, None, None, prefix=1),
                 TargetsCase("tiny instance K=2", 2, 12, 32, 2, "instance", "none", torch.bfloat16, 0.5, 0.2)],
                [EmaCase("tiny ViT fp32", vit_param_shapes(32, 2, 64, 4, 17), torch.float32),
                 EmaCase("tiny ViT bf16 student", vit_param_shapes(32, 2, 64, 4, 17), torch.bfloat16)],
                [LossCase("tiny", 2, 16, 32, 0.6, torch.bfloat16),
                 LossCase("tiny 3 clones", 2, 16, 32, 0.6, torch.bfloat16, clones=3)])
    vit_b, vit_l = vit_param_shapes(768, 12, 3072), vit_param_shapes(1024, 24, 4096)
    # Targets as the objective computes them: the teacher's top-K block outputs (B, 197, D) in bf16 under AMP,
    # passed as views layer[:, 1:] (the cls token sliced off), no mask; speech: instance norm with padding.
    return ([TargetsCase("ViT-B 256x196x768 K=6 layer+final layer, bf16 views", 256, 196, 768, 6, "layer", "layer",
                         torch.bfloat16, None, None, prefix=1),
             TargetsCase("ViT-L 256x196x1024 K=10 layer+final layer, bf16 views", 256, 196, 1024, 10, "layer",
                         "layer", torch.bfloat16, None, None, prefix=1),
             TargetsCase("speech 16x1500x768 K=8 instance, padded, bf16", 16, 1500, 768, 8, "instance", "none",
                         torch.bfloat16, None, 0.1)],
            [EmaCase("ViT-B 86M fp32", vit_b, torch.float32),
             EmaCase("ViT-B 86M bf16 student", vit_b, torch.bfloat16),
             EmaCase("ViT-L 304M fp32", vit_l, torch.float32),
             EmaCase("ViT-L 304M bf16 student", vit_l, torch.bfloat16)],
            [LossCase("ViT-B 256x196x768 60% masked, bf16 pred, fwd+bwd", 256, 196, 768, 0.6, torch.bfloat16),
             LossCase("ViT-L 256x196x1024 60% masked, bf16 pred, fwd+bwd", 256, 196, 1024, 0.6, torch.bfloat16),
             # data2vec 2.0 images: 16 clones of each sample (DATA2VEC2.md), one fp32 target per sample
             LossCase("ViT-B 16 samples x 16 clones x196x768 80% masked, bf16 pred, fwd+bwd", 16, 196, 768, 0.8,
                      torch.bfloat16, clones=16)])


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, runs: int, max_seconds: float) -> float:
    """Median wall time of fn in ms after `warmup` calls; CUDA events with L2 flushed before each run on GPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    began = time.perf_counter()
    if device.type == "cuda":
        flush = torch.empty(256 * MB, dtype=torch.uint8, device=device)  # larger than any L2
        events = []
        for _ in range(runs):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if len(events) >= 3 and time.perf_counter() - began > max_seconds:
                break
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - began > max_seconds:
            break
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """Measured device copy bandwidth (read + write) of one large tensor: the roofline for these ops."""
    n = (16 if quick else 256 if device.type == "cpu" else 1024) * MB
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, runs=20, max_seconds=5.0)
    return 2 * n / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------- implementations
def implementations(device: torch.device, include_interpreter: bool, compile_: bool):
    """({name: backend or None}, {name: reason skipped}) for this device; None marks reference/compile."""
    from d2v.ops import backends

    chosen: dict[str, str | None] = {"reference": None, "torch": "torch"}
    skipped: dict[str, str] = {}
    if compile_:
        chosen["compile"] = None
    else:
        skipped["compile"] = "torch.compile not requested (--compile)"
    for name, dev, ok, why in backends.report():
        if dev != device.type or name == "torch":
            continue
        if name == "triton" and device.type == "cpu" and not include_interpreter:
            skipped[name] = "the Triton interpreter is not timed unless --include-interpreter is given"
        elif name == "triton" and device.type == "cpu" and "triton" in sys.modules and not _interpreted():
            skipped[name] = "triton was imported without TRITON_INTERPRET=1, so it cannot run CPU tensors"
        elif ok:
            chosen[name] = name
        else:
            skipped[name] = why
    return chosen, skipped


def _targets_runs(case: TargetsCase, device, chosen, compiled):
    from d2v import ops
    from d2v.ops import reference

    full = [torch.randn(case.B, case.T + case.prefix, case.D, device=device).to(case.dtype) for _ in range(case.K)]
    layers = [x[:, case.prefix:] for x in full]  # views, as the objective passes them
    mask = (torch.rand(case.B, case.T, device=device) < case.mask_prob) if case.mask_prob is not None else None
    pad = (torch.rand(case.B, case.T, device=device) < case.pad_prob) if case.pad_prob is not None else None
    args = (layers, case.norm, case.final_norm, mask, pad)
    rows = mask.sum().item() if mask is not None else case.B * case.T
    # must read every layer once (instance norm: twice is the best a kernel that does not keep all of T on
    # chip can do, but the model counts once) and write the fp32 rows once
    nbytes = case.K * layers[0].numel() * layers[0].element_size() + rows * case.D * 4
    runs = {}
    for name, backend in chosen.items():
        if name == "reference":
            runs[name] = lambda: reference.targets_reference(*args)
        elif name == "compile":
            fn = compiled.setdefault("targets", torch.compile(reference.targets_reference))
            runs[name] = lambda fn=fn: fn(*args)
        else:
            runs[name] = lambda backend=backend: ops.targets(*args, backend=backend)
    return runs, nbytes


def _ema_runs(case: EmaCase, device, chosen, compiled):
    from d2v import ops
    from d2v.ops import reference

    teacher = [torch.randn(s, device=device) for s in case.shapes]
    student = [torch.randn(s, device=device).to(case.student_dtype) for s in case.shapes]
    numel = sum(t.numel() for t in teacher)
    nbytes = numel * (8 + torch.empty(0, dtype=case.student_dtype).element_size())
    decay = 0.9998
    runs = {}
    for name, backend in chosen.items():
        if name == "reference":
            runs[name] = lambda: reference.ema_update_reference(teacher, student, decay)
        elif name == "compile":
            fn = compiled.setdefault("ema", torch.compile(reference.ema_update_reference))
            runs[name] = lambda fn=fn: fn(teacher, student, decay)
        else:
            runs[name] = lambda backend=backend: ops.ema_update_(teacher, student, decay, backend=backend)

    def foreach_lerp():  # what a hand-written training loop would do
        source = student if case.student_dtype == torch.float32 else [s.float() for s in student]
        torch._foreach_lerp_(teacher, source, 1.0 - decay)

    runs["foreach_lerp"] = foreach_lerp
    return runs, nbytes


def _loss_runs(case: LossCase, device, chosen, compiled):
    from d2v import ops
    from d2v.ops import reference

    B, M, T, D = case.B, case.clones, case.T, case.D
    pred = torch.randn(B * M, T, D, device=device).to(case.dtype).requires_grad_(True)
    target = torch.randn(B, T, D, device=device)  # fp32, as ops.targets returns it
    mask = torch.rand(B * M, T, device=device) < case.mask_prob
    # Bytes model of forward + backward: read the mask and the selected rows of pred and target (the loss), and
    # write pred.grad in pred's dtype for every row (the backward; zeros on unselected rows). Reading pred and
    # target again in the backward, or an fp32 intermediate gradient, are an implementation's extra traffic.
    # With clones a target row is counted once however many clones select it (later reads may hit the cache).
    selected = int(mask.sum())
    target_rows = int(mask.view(B, M, T).any(1).sum())
    nbytes = (mask.numel() + selected * D * pred.element_size() + target_rows * D * target.element_size()
              + pred.numel() * pred.element_size())

    def fwd_bwd(loss_fn):
        pred.grad = None
        loss_fn().backward()

    runs = {}
    for name, backend in chosen.items():
        if name == "reference":
            runs[name] = lambda: fwd_bwd(lambda: reference.masked_regression_loss_reference(pred, target, mask,
                                                                                              clones=M))
        elif name == "compile":
            fn = compiled.setdefault("loss", torch.compile(reference.masked_regression_loss_reference))
            runs[name] = lambda fn=fn: fwd_bwd(lambda: fn(pred, target, mask, clones=M))
        else:
            runs[name] = lambda backend=backend: fwd_bwd(
                lambda: ops.masked_regression_loss(pred, target, mask, backend=backend, clones=M))
    return runs, nbytes


OPS = {"targets": _targets_runs, "ema": _ema_runs, "loss": _loss_runs}


# ---------------------------------------------------------------------------------------------- driver
def run(
    quick: bool = False,
    device: str = "auto",
    include_interpreter: bool = False,
    compile_: bool | None = None,
    runs: int | None = None,
    max_seconds: float | None = None,
    ops: tuple[str, ...] = tuple(OPS),
    on_row: Callable[[dict], None] | None = None,
    case_filter: str | None = None,
    on_meta: Callable[[dict], None] | None = None,
) -> dict:
    """Benchmark the hot ops; returns {"meta": {...}, "rows": [...], "skipped": [...]} (JSON-ready).

    case_filter: only cases whose name contains it. on_meta(meta) is called once before the first case and
    on_row(row) after each measured row, so a caller can write results as they come (a run that is cut short
    still leaves every finished row behind).
    """
    from d2v.core.device import resolve_device

    dev = resolve_device(device)
    if include_interpreter and dev.type == "cpu" and "triton" not in sys.modules:
        # @triton.jit picks the interpreter at import time; once triton is in, the caller's setting stands.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    compile_ = (not quick) if compile_ is None else compile_
    runs = runs or (5 if quick else 50 if dev.type == "cuda" else 10)
    max_seconds = max_seconds or (0.5 if quick else 10.0)
    warmup = 1 if quick else 3
    chosen, skipped_impls = implementations(dev, include_interpreter, compile_)
    copy_gbps = copy_bandwidth_gbps(dev, quick)
    targets_cases, ema_cases, loss_cases = cases(quick)
    by_op = {"targets": targets_cases, "ema": ema_cases, "loss": loss_cases}
    compiled: dict[str, Callable] = {}
    rows, skipped = [], [{"impl": k, "reason": v} for k, v in skipped_impls.items()]
    meta = {"device": dev.type, "device_name": _device_name(dev), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": _triton_version(), "copy_gbps": copy_gbps, "quick": quick,
            "runs": runs, "warmup": warmup, "auto": _auto_backend(dev)}
    if on_meta:
        on_meta(meta)
    for op in ops:
        for case in by_op[op]:
            if case_filter and case_filter not in case.name:
                continue
            fns, nbytes = OPS[op](case, dev, chosen, compiled)
            times = {}
            for impl, fn in fns.items():
                try:
                    times[impl] = median_ms(fn, dev, warmup, runs, max_seconds)
                except Exception as exc:  # one failing implementation must not hide the others
                    skipped.append({"op": op, "case": case.name, "impl": impl,
                                    "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]})
            for impl, ms in times.items():
                gbps = nbytes / (ms * 1e-3) / 1e9
                row = {"op": op, "case": case.name, "impl": impl, "median_ms": ms, "bytes": nbytes,
                       "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps,
                       "speedup_vs_eager": times["reference"] / ms if "reference" in times else None,
                       "speedup_vs_compile": times["compile"] / ms if "compile" in times else None,
                       "speedup_vs_foreach": times["foreach_lerp"] / ms if "foreach_lerp" in times else None,
                       "device_name": meta["device_name"], "copy_gbps": copy_gbps}
                rows.append(row)
                if on_row:
                    on_row(row)
            del fns
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {"meta": meta, "rows": rows, "skipped": skipped}


def _auto_backend(dev: torch.device) -> str:
    from d2v.ops import backends

    return backends.resolve("auto", dev.type)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _interpreted() -> bool:
    """True when the imported triton runs kernels in its interpreter (decided when kernels were decorated)."""
    from d2v.kernels import interpreted

    return interpreted()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
