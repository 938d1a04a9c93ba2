"""End-to-end pretraining throughput per process count: `d2v pretrain` run as it would be run (one plain process,
or torchrun with N processes), samples/s read back from each run's metrics.jsonl.

The figure of a run is the median of its logged samples/s (all processes together) after the first `warmup` log
records, which include start-up, the first compilation of kernels and allocator growth."""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from d2v.runtime.steptimes import summarize

from .harness import metrics, run_pretrain, samples_per_s


def model_figures(run_dir: Path, samples_per_s: float | None, device: str, gpus: int = 1,
                  peak_memory_mb: float | None = None) -> dict:
    """Model FLOPs per update of the run in `run_dir` (from its saved, data-filled config), the TFLOP/s its
    samples/s make, MFU against `gpus` x the dense peak of `device` (a GPU name; None elsewhere) at its precision."""
    from d2v.core.config import PretrainConfig, from_dict
    from d2v.runtime.flops import flops_per_update, mfu

    cfg = from_dict(PretrainConfig, json.loads((Path(run_dir) / "config.json").read_text()))
    flops = flops_per_update(cfg)
    rate = flops["total"] / cfg.run.batch_size * (samples_per_s or 0.0)
    util = mfu(rate / max(gpus, 1), device, cfg.run.precision)
    return {"gflop_per_update": flops["total"] / 1e9, "flops_parts": flops, "tflop_per_s": rate / 1e12,
            "mfu": util, "precision": cfg.run.precision, "peak_memory_mb": peak_memory_mb}


def run_device(run_dir: Path) -> str:
    """The name of the device a finished run trained on: its GPU's, or "cpu"."""
    import torch

    saved = json.loads((Path(run_dir) / "config.json").read_text())["run"]["device"]
    on_gpu = saved.startswith("cuda") or (saved == "auto" and torch.cuda.is_available())
    return torch.cuda.get_device_name(0) if on_gpu else "cpu"


def last_peak_memory(run_dir: Path) -> float | None:
    """The last peak_memory_mb a run logged (CUDA runs log their allocator's high-water mark), or None."""
    peaks = [r["peak_memory_mb"] for r in metrics(run_dir) if "peak_memory_mb" in r]
    return peaks[-1] if peaks else None


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
                wall = run_pretrain(args, out, nproc=n, threads=t, what=f"the {n}-process run")
                rate, used = samples_per_s(out, warmup)
                row = {"nproc": n, "threads_per_process": t, "repeat": rep, "samples_per_s": rate,
                       "samples_per_s_per_process": rate / n, "records": used, "wall_s": wall}
                device = run_device(out)
                row.update(device=device, **model_figures(out, rate, device, n if device != "cpu" else 1,
                                                          last_peak_memory(out)))
                rows.append(row)
                if on_row:
                    on_row(row)
    summary = {}
    for n in nprocs:
        rates = [r["samples_per_s"] for r in rows if r["nproc"] == n]
        ran = [r for r in rows if r["nproc"] == n]
        summary[n] = {"samples_per_s": statistics.median(rates), "runs": len(rates),
                      **{k: statistics.median(r[k] for r in ran) if all(r[k] is not None for r in ran) else None
                         for k in ("gflop_per_update", "tflop_per_s", "mfu", "peak_memory_mb")}}
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


def breakdown(args: list[str], warmup: int = 2) -> dict:
    """Run `d2v pretrain ARGS --step-times FILE` (the real command, in a subprocess): the mean time of each phase of
    a step after `warmup` steps, and the run's config summary."""
    with tempfile.TemporaryDirectory() as tmp:
        times = Path(tmp) / "times.json"
        run_pretrain([*args, "--step-times", str(times)], Path(tmp) / "run")
        timed = json.loads(times.read_text())
        result = summarize(timed["steps"], max(1, warmup), timed["config"]["batch_size"])
        result["config"] = timed["config"]
        result["device"] = timed.get("device", "cpu")
        result.update(model_figures(Path(tmp) / "run", result["samples_per_s"], result["device"],
                                    peak_memory_mb=timed.get("peak_memory_mb")))
    return result
