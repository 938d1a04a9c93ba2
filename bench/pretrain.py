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
