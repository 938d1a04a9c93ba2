"""Pretraining on a shared machine: `d2v pretrain` samples/s alone and beside one busy process, for several thread
settings (environment variables), in alternating runs; the figure of a setting is the median over its runs.

The busy process is one of: `python` (a pure-Python loop: one core, no threads), `torch` (a matrix-multiply loop in a
stock torch process: as many OpenMP threads as cores, libgomp's default spinning), `d2v` (a second copy of the same
run with the same settings). What a run keeps beside it is busy samples/s / alone samples/s; 0.5 is a fair share of
two cores."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from d2v.core.errors import ConfigError

from .harness import pretrain_command, run_pretrain, samples_per_s

BUSY = {
    "python": "while True: pass",
    "torch": "import torch\nx = torch.randn(256, 256)\nwhile True: x = torch.tanh(x @ x)",
}
# libgomp's own behaviour (what torch did before d2v set its defaults) spelled out, so that it can be compared
SETTINGS = {
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "d2v default": {},
    "spin 10000": {"GOMP_SPINCOUNT": "10000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                           "KMP_BLOCKTIME")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _busy(kind: str, env: dict, args: list[str], tmp: Path) -> subprocess.Popen:
    if kind == "d2v":
        cmd = pretrain_command([*args, "--out", str(tmp / f"busy-{time.monotonic_ns()}"), "--no-progress"])
    else:
        cmd = [sys.executable, "-c", BUSY[kind]]
    return subprocess.Popen(cmd, env=env if kind == "d2v" else _clean_env({}), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def run(settings: dict[str, dict[str, str]], args: list[str], busy: str = "python", repeats: int = 3,
        warmup: int = 1, on_row=None) -> dict:
    """Alternate (setting, alone / beside `busy`) runs `repeats` times; rows and per-setting medians."""
    if busy not in (*BUSY, "d2v"):
        raise ConfigError(f"--busy must be python, torch or d2v, got {busy!r}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for rep in range(repeats):
            for name, extra in settings.items():
                env = _clean_env(extra)
                for beside in (False, True):
                    other = _busy(busy, env, args, tmp) if beside else None
                    try:
                        time.sleep(1.0 if other else 0.0)  # let the busy process get going
                        out = tmp / f"run-{rep}-{len(rows)}"
                        wall = run_pretrain(args, out, env=env, what="the run")
                    finally:
                        if other is not None:
                            other.kill()
                            other.wait()
                    rate, used = samples_per_s(out, warmup)
                    row = {"setting": name, "env": extra, "beside": busy if beside else None, "repeat": rep,
                           "samples_per_s": rate, "records": used, "wall_s": wall}
                    rows.append(row)
                    if on_row:
                        on_row(row)
    summary = {}
    for name in settings:
        alone = statistics.median(r["samples_per_s"] for r in rows if r["setting"] == name and not r["beside"])
        near = statistics.median(r["samples_per_s"] for r in rows if r["setting"] == name and r["beside"])
        summary[name] = {"alone": alone, "beside_busy": near, "kept": near / alone if alone else None}
    meta = {"args": args, "busy": busy, "repeats": repeats, "warmup_records": warmup, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}
    return {"meta": meta, "rows": rows, "summary": summary}
