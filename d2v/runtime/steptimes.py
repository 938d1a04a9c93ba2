"""Where a training step's time goes: a timer of its phases (data, student forward, teacher forward, targets, loss,
backward, optimizer, EMA) for `pretrain(..., step_times=...)` and `d2v pretrain --step-times FILE`; `d2v bench
pretrain --breakdown` reports it."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from d2v import ops
from d2v.core.files import atomic_write_json

PHASES = ("data", "student_forward", "teacher_forward", "targets", "loss", "backward", "optimizer", "ema")


def summarize(steps: list[dict], warmup: int, batch_size: int) -> dict:
    """Per-step means of the phases of `steps` (rows of phase -> seconds, and "step" -> the step's wall seconds)
    after the first `warmup`; "other" is the rest of a step (learning rate, logging, checks). batch_size 0 (an update
    of speech by audio samples, whose utterances vary): no samples/s."""
    counted = steps[warmup:]
    n = max(len(counted), 1)
    per_step = {p: sum(row[p] for row in counted) / n for p in PHASES}
    step = sum(row["step"] for row in counted) / n
    per_step["other"] = max(0.0, step - sum(per_step.values()))
    return {"steps_timed": len(counted), "step_ms": 1e3 * step, "samples_per_s": batch_size / step if step and batch_size else None,
            "phases_ms": {k: 1e3 * v for k, v in per_step.items()},
            "phases_share": {k: (v / step if step else None) for k, v in per_step.items()}}


class StepTimes:
    """Seconds spent in each phase of every training step.

    A phase's time excludes the phases timed inside it: "loss" is the objective's forward less the student, the
    teacher and the targets (so: the loss, its statistics and the glue). On CUDA every phase boundary synchronizes,
    which slows the run a little but puts the time where it is spent. result() leaves out the steps before `warmup`
    (start-up, first kernel compilations)."""

    def __init__(self, warmup: int = 2, cuda: bool = False):
        import torch

        self.warmup, self.sync = max(1, warmup), (torch.cuda.synchronize if cuda else (lambda: None))
        self.steps: list[dict] = []  # one row per finished step: phase -> seconds, "step" -> wall seconds
        self.current = dict.fromkeys(PHASES, 0.0)
        self.stack: list[float] = []
        self.t_last = time.perf_counter()
        self._restore: list = []

    def phase(self, name: str):
        @contextlib.contextmanager
        def timed():
            self.sync()
            t0 = time.perf_counter()
            self.stack.append(0.0)
            try:
                yield
            finally:
                self.sync()
                dt, inner = time.perf_counter() - t0, self.stack.pop()
                self.current[name] += dt - inner
                if self.stack:
                    self.stack[-1] += dt

        return timed()

    def _wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        self._restore.append((owner, attr, owner.__dict__.get(attr)))
        setattr(owner, attr, timed)

    def attach(self, model) -> None:
        """Time the objective's parts: the student path (encoder + head or decoder), the teacher, the targets."""
        for attr in ("_predict_v1", "_predict_v2"):
            if hasattr(model, attr):
                self._wrap(model, attr, "student_forward")
        self._wrap(model.teacher, "encode", "teacher_forward")
        self._wrap(ops, "targets", "targets")

    def step_done(self) -> None:
        now = time.perf_counter()
        self.steps.append({**self.current, "step": now - self.t_last})
        self.current, self.t_last = dict.fromkeys(PHASES, 0.0), now

    def close(self) -> None:
        """Undo attach (the objective's methods and d2v.ops.targets are themselves again)."""
        for owner, attr, value in reversed(self._restore):
            if value is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)
        self._restore.clear()

    def result(self, batch_size: int) -> dict:
        return summarize(self.steps, self.warmup, batch_size)

    def write(self, path: Path, cfg) -> None:
        """Every step's phases and the run's config summary as JSON (d2v pretrain --step-times FILE)."""
        import torch

        config = {"modality": cfg.modality, "recipe": cfg.recipe, "preset": cfg.preset,
                  "batch_size": cfg.run.batch_size, "batch_tokens": cfg.run.batch_tokens, "precision": cfg.run.precision, "compile": cfg.run.compile,
                  "threads": torch.get_num_threads()}
        atomic_write_json(Path(path), {"config": config, "steps": self.steps, **memory()})


def memory() -> dict:
    """This process's peak memory so far and where: CUDA's allocator high-water mark on a GPU (the device's name
    too), else the peak resident set (VmHWM, Linux), which counts everything the process ever held."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"device": torch.cuda.get_device_name(), "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        peak = None
    return {"device": "cpu", "peak_memory_mb": peak}
