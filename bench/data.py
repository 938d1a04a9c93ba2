"""Data benchmark: how fast a modality's pipeline delivers micro-batches, beside how fast the model consumes them.

For a source (built-in name, folder, tar shards on disk or on a server, TSV manifest) the pipeline is built as `d2v pretrain` builds it
(listing, headers, tokenizing or their caches), then `batches` micro-batches are drawn through the same DataLoader
(workers included). Reported: setup seconds (listing to pipeline ready), time to the first batch, loader samples/s
over the remaining batches, and optionally the training step's samples/s on the same batch (forward + backward of
the data2vec objective), so a user can see whether data or compute bounds a run. Peak RSS is this process's (the
workers are separate processes)."""
from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

import torch


def source_kind(source: str) -> str:
    from d2v.data.remote import is_remote
    from d2v.data.sources import expand, shard_paths

    if is_remote(source):
        return "remote shards"
    if shard_paths(source) is not None:
        return "shards"
    path = expand(source)
    if path.is_dir():
        return "folder"
    if path.is_file():
        return {".tsv": "tsv", ".npy": "array", ".npz": "array"}.get(path.suffix, "file")
    return "built-in"


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def run(modality: str, source: str | None = None, preset: str | None = None, batches: int = 20,
        batch_size: int | None = None, num_workers: int = -1, image_size: int | None = None,
        model_steps: int = 0, device: str = "cpu", overrides: dict | None = None) -> dict:
    """Time the pipeline of `modality` on `source`; returns a JSON-able row."""
    from d2v.core.config import set_by_path
    from d2v.core.presets import preset_config
    from d2v.data.loader import batch_loader, resolve_workers
    from d2v.data.pipeline import build_pipeline

    cfg = preset_config(modality, preset)
    if source is not None:
        cfg.data.source = source
    if batch_size:  # utterances per micro-batch, also for presets that batch speech by audio samples
        cfg.run.batch_size, cfg.run.batch_tokens = batch_size, 0
    if image_size:
        cfg.data.image_size, cfg.model.image_size = image_size, 0
    cfg.data.num_workers = num_workers
    for key, value in (overrides or {}).items():
        set_by_path(cfg, key, value)
    t0 = time.perf_counter()
    pipeline = build_pipeline(cfg)
    t_setup = time.perf_counter() - t0
    on_gpu = torch.device(device).type == "cuda"  # the loader as a GPU run makes it (pinned, workers)
    workers = resolve_workers(num_workers, pipeline, on_gpu)
    from d2v.runtime.distributed import batch_plan

    loader = batch_loader(pipeline, batch_plan(cfg.run.batch_size, 1, 1, budget=pipeline.budget), 0, batches,
                          num_workers, on_gpu)
    _, first = next(loader)
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = samples = 0
    for _, batch in loader:
        n, samples = n + 1, samples + batch.inputs.shape[0]
    t_rest = time.perf_counter() - t1
    B = first.inputs.shape[0]  # run.batch_size, or a budget's first update
    row = {
        "modality": modality, "source": cfg.data.source, "source_kind": source_kind(cfg.data.source),
        "batch_size": B, "batches": batches, "num_workers": workers, "setup_s": t_setup,
        "first_batch_s": t_first, "loader_samples_per_s": samples / t_rest if n else None,
        "skipped_files": pipeline.skipped, "peak_rss_mb": peak_rss_mb(), "step_samples_per_s": None,
    }
    if model_steps:
        row["step_samples_per_s"] = _step_rate(cfg, pipeline, first, model_steps, torch.device(device))
    return row


def _step_rate(cfg, pipeline, batch, steps: int, device: torch.device) -> float:
    """Samples/s of forward + backward of the objective on one batch (the data cost excluded)."""
    from d2v.objective import build_objective

    torch.manual_seed(0)
    model = build_objective(cfg).to(device).train()
    batch = pipeline.on_device(batch.to(device), 0)
    loss, _ = model(batch)
    loss.backward()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss, _ = model(batch)
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch.inputs.shape[0] / (time.perf_counter() - t)


def meta() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "torch": torch.__version__, "cwd": str(Path.cwd())}
