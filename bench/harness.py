"""The one way a benchmark runs d2v: `d2v pretrain` as a user runs it, in a subprocess (one plain process, or
torchrun with N processes), a failure raised with the run's last lines; and what a run left behind, read back with
d2v's own metrics reader."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from d2v.core.errors import UserError
from d2v.runtime.metrics import METRICS, read_metrics


class RunFailed(UserError, RuntimeError):
    """A command a benchmark ran exited non-zero; the message ends with its last output lines. The benchmark exits
    1 (what it ran failed, not how it was asked)."""

    exit_code = 1


def pretrain_command(args: list[str], nproc: int = 1) -> list[str]:
    """The `d2v pretrain ARGS` command line for `nproc` processes (1: the plain command, no torchrun)."""
    if nproc == 1:
        return [sys.executable, "-m", "d2v", "pretrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "d2v", "pretrain", *args]


def run_pretrain(args: list[str], out: Path, nproc: int = 1, env: dict | None = None, threads: int | None = None,
                 timeout: float | None = None, what: str = "d2v pretrain") -> float:
    """Run `d2v pretrain ARGS --out OUT --no-progress`; its wall seconds. RunFailed (named `what`, with the last
    lines of its output) when it fails; subprocess.TimeoutExpired past `timeout` seconds."""
    env = dict(os.environ if env is None else env)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(pretrain_command([*args, "--out", str(out), "--no-progress"], nproc), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RunFailed(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))
    return time.perf_counter() - t0


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return read_metrics(Path(run_dir) / METRICS)


def samples_per_s(run_dir: Path, warmup: int) -> tuple[float, int]:
    """(median samples/s of a run's logged windows after the first `warmup`, windows used)."""
    rates = [r["samples_per_s"] for r in metrics(run_dir) if "samples_per_s" in r]
    used = rates[warmup:] or rates[-1:]
    return statistics.median(used), len(used)
