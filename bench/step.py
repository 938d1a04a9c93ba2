"""The training step alone, at a preset's shapes: `d2v bench step`. The step is d2v.train's own (setup() builds
the objective, the process wrapper, AdamW, activation checkpointing, compile; Trainer.update runs forward, backward,
clipping, the optimizer and the EMA), fed random batches at the config's nominal shapes that already sit on the
device (d2v.data.synthetic), so neither the loader nor host-side masking is timed: what the GPU can do when data
keeps up. `d2v bench data` times the loader; `d2v bench pretrain` the whole command.

Reported per config: ms per update, samples/s, model FLOPs per update (d2v.runtime.flops), achieved TFLOP/s, MFU
against the device's dense peak at the run's precision, and peak memory (CUDA: torch.cuda.max_memory_allocated;
CPU: the process's peak resident set, which includes everything the process ever held). largest_batch() finds the
biggest micro-batch one device fits: two measured peaks give the memory per sample, the predicted size is tried and
lowered until an update runs."""
from __future__ import annotations

import gc
import itertools
import platform
import statistics
import time

import torch

from d2v.core.config import PretrainConfig, set_by_path
from d2v.core.device import resolve_device, resolve_precision
from d2v.core.presets import preset_config
from d2v.data.synthetic import fill_model_fields, synthetic_batch
from d2v.runtime import distributed
from d2v.runtime.flops import device_peak, flops_per_update, mfu
from d2v.validation import validate_config


class SyntheticPipeline:
    """The Pipeline protocol over d2v.data.synthetic: random samples at the config's shapes, no augmentation."""

    reads_files = False
    skipped = 0
    bad_files: set[int] = frozenset()

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.model_fields: dict = {}

    def micro_batch(self, first: int, count: int):
        return synthetic_batch(self.cfg, first, count)

    def on_device(self, batch, first: int):
        return batch

    def run_files(self) -> dict[str, bytes]:
        return {}


def config(modality: str, preset: str | None, recipe: str, batch: int | None, device: str, precision: str | None,
           sets: dict | None = None) -> PretrainConfig:
    """The preset's config for a step benchmark: one process, no accumulation, compile off unless set, its
    data-dependent fields filled as the synthetic batches imply, checked as `d2v pretrain` checks it."""
    cfg = preset_config(modality, preset, recipe)
    cfg.run.device, cfg.run.grad_accum, cfg.run.compile = device, 1, "off"
    if precision:
        cfg.run.precision = precision
    if batch:
        cfg.run.batch_size = batch
    for key, value in (sets or {}).items():
        set_by_path(cfg, key, value)
    fill_model_fields(cfg)
    validate_config(cfg, data_ready=True, memory=False)
    cfg.run.precision = resolve_precision(cfg.run.precision, resolve_device(cfg.run.device))
    return cfg


def trainer(cfg: PretrainConfig):
    """d2v.train's Trainer for `cfg` on one device, fed SyntheticPipeline batches."""
    from d2v.train import NoTimes, setup

    dist = distributed.Dist(device=resolve_device(cfg.run.device))
    return setup(cfg, SyntheticPipeline(cfg), dist, True, lambda msg: None, NoTimes())


def device_batches(cfg: PretrainConfig, count: int, device: torch.device, distinct: int = 4):
    """An endless cycle of `distinct` micro-batches of `count` samples, made once and kept on the device."""
    made = [(i * count, synthetic_batch(cfg, i * count, count).to(device)) for i in range(distinct)]
    return itertools.cycle(made)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(cfg: PretrainConfig, steps: int = 20, warmup: int = 5) -> dict:
    """Time `steps` updates after `warmup` (compilation, allocator growth) of cfg's step on random device batches."""
    t = trainer(cfg)
    device = t.device
    batches = device_batches(cfg, cfg.run.batch_size, device)
    t.model.train()
    total = warmup + steps
    _reset_peak(device)
    times = []
    for step in range(total):
        _sync(device)
        t0 = time.perf_counter()
        t.update(step, total, batches)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return row(cfg, statistics.median(times[warmup:]), _peak_bytes(device), device)


def row(cfg: PretrainConfig, step_s: float, peak_bytes: int | None, device: torch.device) -> dict:
    """The figures of one measured config: step time, samples/s, model FLOPs and MFU, peak memory."""
    flops = flops_per_update(cfg)
    name = device_name(device)
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    rate = flops["total"] / step_s
    peak = device_peak(name)
    return {
        "modality": cfg.modality, "recipe": cfg.recipe, "preset": cfg.preset, "batch": cfg.run.batch_size,
        "precision": cfg.run.precision, "compile": cfg.run.compile,
        "activation_checkpointing": cfg.run.activation_checkpointing, "fused_adamw": cfg.run.fused_adamw,
        "device": name, "step_ms": 1e3 * step_s, "samples_per_s": cfg.run.batch_size / step_s,
        "gflop_per_update": flops["total"] / 1e9, "flops_parts": flops, "tflop_per_s": rate / 1e12,
        "mfu": mfu(rate, name, cfg.run.precision, tf32), "peak_source": peak.source if peak else None,
        "peak_memory_mb": None if peak_bytes is None else peak_bytes / 2**20,
    }


def update_peak(t, cfg: PretrainConfig, count: int) -> int | None:
    """Peak bytes of one update at micro-batch `count` on t's device, or None when it runs out of memory."""
    device = t.device
    try:
        batches = device_batches(cfg, count, device, distinct=1)
        _reset_peak(device)
        t.update(0, 10, batches)
        _sync(device)
        return _peak_bytes(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        t.optimizer.zero_grad(set_to_none=True)
        batches = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(cfg: PretrainConfig, probe: tuple[int, int] = (8, 16), limit_bytes: int | None = None,
                  max_tries: int = 8, attempt=None) -> dict:
    """The largest micro-batch whose update fits on cfg's GPU: the peaks at the two `probe` sizes give memory per
    sample; the size they predict for the device's memory (or `limit_bytes`) is tried, then lowered by 5% until an
    update runs (every try is a full update: forward, backward, AdamW, EMA). attempt(count) -> peak bytes or None
    (out of memory) replaces the real update (tests)."""
    if attempt is None:
        t = trainer(cfg)
        if t.device.type != "cuda":
            raise ValueError("the largest batch is searched on a GPU (a CPU's resident set has no resettable peak)")
        limit_bytes = limit_bytes or torch.cuda.get_device_properties(t.device).total_memory
        attempt = lambda count: update_peak(t, cfg, count)  # noqa: E731
    a, b = attempt(probe[0]), attempt(probe[1])
    if a is None or b is None:
        return {"largest": None, "why": f"a micro-batch of {probe[1] if a else probe[0]} does not fit", "tries": []}
    per_sample = max((b - a) / (probe[1] - probe[0]), 1.0)
    predicted = int(probe[1] + (0.97 * limit_bytes - b) / per_sample)
    tries, size = [], max(predicted, probe[1])
    for _ in range(max_tries):
        peak = attempt(size)
        tries.append({"batch": size, "fits": peak is not None, "peak_memory_mb": peak and peak / 2**20})
        if peak is not None or size == probe[1]:
            break
        size = max(probe[1], int(size * 0.95))
    good = [tr["batch"] for tr in tries if tr["fits"]]
    return {"largest": max(good) if good else probe[1], "predicted": predicted, "bytes_per_sample": per_sample,
            "fixed_bytes": a - probe[0] * per_sample, "limit_bytes": limit_bytes, "tries": tries,
            "activation_checkpointing": cfg.run.activation_checkpointing}
