"""End-to-end pretraining throughput per process count: `d2v pretrain` run as it would be run (one plain process,
or torchrun with N processes), samples/s read back from each run's metrics.jsonl.

The figure of a run is the median of its logged samples/s (all processes together) after the first `warmup` log
records, which include start-up, the first compilation of kernels and allocator growth."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command(nproc: int, args: list[str]) -> list[str]:
    """The pretrain command line for `nproc` processes (1: the plain command, no torchrun)."""
    if nproc == 1:
        return [sys.executable, "-m", "d2v", "pretrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "d2v", "pretrain", *args]


def samples_per_s(metrics: Path, warmup: int) -> tuple[float, int]:
    """(median samples/s after `warmup` records, records used)."""
    rates = [json.loads(line)["samples_per_s"] for line in metrics.read_text().splitlines() if line.strip()]
    used = rates[warmup:] or rates[-1:]
    return statistics.median(used), len(used)


def run(nprocs: list[int], args: list[str], threads: int | None = None, warmup: int = 2, repeats: int = 1,
        workdir: Path | None = None, on_row=None) -> dict:
    """Time `d2v pretrain ARGS` at each process count (alternating counts when repeats > 1); a dict with rows and
    the scaling efficiency of each count against 1 process (or the smallest count run)."""
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for rep in range(repeats):
            for n in nprocs:
                t = threads or max(1, cores // n)
                out = Path(tmp) / f"run-{n}-{rep}"
                env = {**os.environ, "OMP_NUM_THREADS": str(t)}
                t0 = time.perf_counter()
                proc = subprocess.run(command(n, [*args, "--out", str(out), "--no-progress"]), env=env,
                                      capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                    raise RuntimeError(f"{n}-process run failed (exit {proc.returncode}): " + " | ".join(tail))
                rate, used = samples_per_s(out / "metrics.jsonl", warmup)
                row = {"nproc": n, "threads_per_process": t, "repeat": rep, "samples_per_s": rate,
                       "samples_per_s_per_process": rate / n, "records": used, "wall_s": wall}
                rows.append(row)
                if on_row:
                    on_row(row)
    summary = {}
    for n in nprocs:
        rates = [r["samples_per_s"] for r in rows if r["nproc"] == n]
        summary[n] = {"samples_per_s": statistics.median(rates), "runs": len(rates)}
    base_n = min(nprocs)
    base = summary[base_n]["samples_per_s"] / base_n
    for n, s in summary.items():
        s["scaling_efficiency"] = s["samples_per_s"] / (n * base) if base > 0 else None
    meta = {"args": args, "nprocs": nprocs, "warmup_records": warmup, "repeats": repeats, "cpu_count": cores,
            "machine": platform.machine(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {"meta": meta, "rows": rows, "summary": {str(n): s for n, s in summary.items()}}


# ------------------------------------------------------------------------------------------------ step breakdown
PHASES = ("data", "student_forward", "teacher_forward", "targets", "loss", "backward", "optimizer", "ema")


class StepTimes:
    """Seconds spent in each phase of the training step, for `pretrain(..., step_times=...)`.

    A phase's time excludes the phases timed inside it: "loss" is the objective's forward less the student, the
    teacher and the targets (so: the loss, its statistics and the glue). "other" is the rest of a step (learning
    rate, logging, checks). On CUDA every phase boundary synchronizes, which slows the run a little but puts the time
    where it is spent. Steps before `warmup` (start-up, first kernel compilations) are not counted."""

    def __init__(self, warmup: int = 2, cuda: bool = False):
        import torch

        self.warmup, self.sync = max(1, warmup), (torch.cuda.synchronize if cuda else (lambda: None))
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.stack: list[float] = []
        self.steps, self.step_s, self.t_last = 0, 0.0, time.perf_counter()
        self._restore: list = []

    def phase(self, name: str):
        import contextlib

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
                if self.steps >= self.warmup:
                    self.totals[name] += dt - inner
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
        from d2v import ops

        for attr in ("_predict_v1", "_predict_v2"):
            if hasattr(model, attr):
                self._wrap(model, attr, "student_forward")
        self._wrap(model.teacher, "encode", "teacher_forward")
        self._wrap(ops, "targets", "targets")

    def step_done(self) -> None:
        now = time.perf_counter()
        if self.steps >= self.warmup:
            self.step_s += now - self.t_last
        self.t_last, self.steps = now, self.steps + 1

    def close(self) -> None:
        """Undo attach (the objective's methods and d2v.ops.targets are themselves again)."""
        for owner, attr, value in reversed(self._restore):
            if value is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)
        self._restore.clear()

    def result(self, batch_size: int) -> dict:
        counted = max(0, self.steps - self.warmup)
        per_step = {k: v / max(counted, 1) for k, v in self.totals.items()}
        step = self.step_s / max(counted, 1)
        per_step["other"] = max(0.0, step - sum(per_step.values()))
        return {"steps_timed": counted, "step_ms": 1e3 * step, "samples_per_s": batch_size / step if step else None,
                "phases_ms": {k: 1e3 * v for k, v in per_step.items()},
                "phases_share": {k: (v / step if step else None) for k, v in per_step.items()}}


def breakdown(args: list[str], warmup: int = 2) -> dict:
    """Run `d2v pretrain ARGS` in this process with a StepTimes; its result plus the run's config summary."""
    import functools

    import torch
    from rich.console import Console

    import d2v.train
    from d2v import cli

    seen = {}
    original = d2v.train.pretrain

    def timed_pretrain(cfg, **kwargs):
        seen["cfg"] = cfg
        seen["times"] = StepTimes(warmup, cuda=d2v.train.resolve_device(cfg.run.device).type == "cuda")
        try:
            return original(cfg, **kwargs, step_times=seen["times"])
        finally:
            seen["times"].close()

    with tempfile.TemporaryDirectory() as tmp:
        d2v.train.pretrain = functools.wraps(original)(timed_pretrain)
        quiet = cli.console.quiet
        cli.console.quiet = True
        try:
            code = cli.app(["pretrain", *args, "--out", str(Path(tmp) / "run"), "--no-progress"],
                           standalone_mode=False)
        finally:
            d2v.train.pretrain, cli.console.quiet = original, quiet
    if "times" not in seen or code:
        raise RuntimeError(f"d2v pretrain {' '.join(args)} failed (exit {code}; its error is shown above)")
    cfg = seen["cfg"]
    result = seen["times"].result(cfg.run.batch_size)
    result["config"] = {"modality": cfg.modality, "recipe": getattr(cfg, "recipe", "v1"), "preset": cfg.preset,
                        "batch_size": cfg.run.batch_size, "precision": cfg.run.precision,
                        "compile": getattr(cfg.run, "compile", "off"), "threads": torch.get_num_threads()}
    return result
