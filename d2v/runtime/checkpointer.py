"""When and how a training run saves and restores its state: model, optimizer, grad scaler and the data position.
The loop asks `due(...)` after each update and calls `save(...)`; `restore()` continues a run from its newest intact
checkpoint, whatever the layout it was saved in (one file, or FSDP shards at any world size)."""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

from d2v.core.device import local
from d2v.core.errors import CheckpointError
from d2v.runtime import checkpoint as ckpt
from d2v.runtime import distributed


def finite(model: torch.nn.Module) -> bool:
    """All weights and buffers finite (one device reduction per tensor, one host sync)."""
    flags = [torch.isfinite(local(t)).all() for t in model.state_dict().values()
             if t.is_floating_point() and local(t).numel()]
    return bool(torch.stack(flags).all()) if flags else True


class Checkpointer:
    """Saves every `every` updates (0: only at the end), when `minutes` have passed since the last save (0: never),
    on request (Ctrl-C) and at the end; keeps the newest `keep`. Replicated runs: rank 0 writes, the others wait
    until the checkpoint is complete. FSDP: every rank writes its shards."""

    def __init__(self, run_dir: Path, model, optimizer, scaler, dist, strategy: str, every: int = 0,
                 minutes: float = 0.0, keep: int = 2, start: int = 0):
        self.run_dir, self.model, self.optimizer, self.scaler = Path(run_dir), model, optimizer, scaler
        self.dist, self.strategy, self.every, self.minutes, self.keep = dist, strategy, every, minutes, keep
        self.saved_step, self.saved_path = start, None
        self.t_saved = time.perf_counter()

    def time_due(self) -> bool:
        """Rank 0's clock says a save is due (the ranks then agree on it)."""
        return (self.dist.is_main and self.minutes > 0
                and time.perf_counter() - self.t_saved >= 60 * self.minutes)

    def due(self, step: int, total: int, advanced: bool, time_due: bool) -> bool:
        """A save before the end: the agreed clock, or every `every` updates."""
        return step < total and (time_due or (advanced and self.every and step % self.every == 0))

    def save(self, step: int, batches: int, alone: bool = False) -> Path:
        """Checkpoint `step` (`batches` update-batches consumed). alone: rank 0 without the others (after an error,
        replicated runs only)."""
        dist = None if alone else self.dist
        extra = {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "batches": batches}
        if self.strategy == "fsdp":
            path = ckpt.save_sharded_checkpoint(self.run_dir, step, self.model, self.optimizer, extra, self.keep,
                                                self.dist.is_main, lambda: distributed.barrier(self.dist))
        else:
            path = None
            if dist is None or dist.is_main:
                path = ckpt.save_checkpoint(self.run_dir, step, self.model, self.optimizer, extra, keep=self.keep)
            if dist is not None:
                distributed.barrier(dist)
            path = path or self.run_dir / "checkpoints" / f"step_{step:08d}"
        self.saved_step, self.saved_path, self.t_saved = step, path, time.perf_counter()
        return path

    def save_after_error(self, step: int, batches: int, in_update: bool) -> bool:
        """Keep the updates done before an error (a file gone, a full disk) when the state is sound: not halfway
        through an update, finite, and savable by rank 0 alone (one process or DDP). True when saved."""
        can = self.strategy in ("single", "ddp") and self.dist.is_main
        if not can or in_update or step <= self.saved_step or not finite(self.model):
            return False
        try:
            self.save(step, batches, alone=True)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            return False
        return True

    def restore(self) -> tuple[int, int]:
        """(step, update-batches consumed) of the newest intact checkpoint, loaded into model, optimizer, scaler.

        Either layout loads into either strategy: single-file into a sharded (FSDP) model, sharded (DCP) into one
        process or DDP, and sharded at one world size into FSDP at another."""
        model, optimizer = self.model, self.optimizer
        path = ckpt.latest_checkpoint(self.run_dir)
        if self.strategy == "fsdp" and ckpt.is_sharded(path):  # each rank reads only its own slices
            state = ckpt.read_checkpoint_state(path)
            template, _ = ckpt.sharded_state(model, optimizer)
            ckpt.load_sharded_into(path, template)
            ckpt.load_sharded_state(model, optimizer, template, state["optimizer"]["scalars"])
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                path, weights, opt_tensors, state = ckpt.read_latest(self.run_dir)
            for w in caught:
                print(f"Warning: {w.message}", file=sys.stderr)
            try:
                self._load(state, weights, opt_tensors)
            except (RuntimeError, KeyError, ValueError, TypeError) as exc:
                raise CheckpointError(f"checkpoint {path} does not match the run's model: "
                                      f"{str(exc).splitlines()[0]}") from None
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        self.saved_step = step
        return step, int(state.get("batches", step))

    def _load(self, state: dict, weights: dict, opt_tensors: dict) -> None:
        model, optimizer = self.model, self.optimizer
        if state.get("layout") == "dcp":  # consolidated from shards; optimizer keyed by parameter name
            model.load_state_dict(weights)
            ckpt.load_optimizer_state(optimizer, *indexed_optimizer_state(model, optimizer, opt_tensors,
                                                                          state["optimizer"]["scalars"]))
        elif self.strategy == "fsdp":  # full tensors, each rank keeps its shard
            ckpt.load_full_into_sharded(model, optimizer, weights, opt_tensors, state["optimizer"])
        else:
            model.load_state_dict(weights)
            ckpt.load_optimizer_state(optimizer, opt_tensors, state["optimizer"])


def indexed_optimizer_state(model, optimizer, tensors: dict, scalars: dict) -> tuple[dict, dict]:
    """Optimizer state by parameter name (a consolidated sharded checkpoint) as load_optimizer_state takes it (by
    parameter index), for a model that is not sharded."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    pid = {n: i for i, n in enumerate(names)}
    by_index = {}
    for key, value in tensors.items():
        name, what = key[len("state."):].rsplit(".", 1)
        by_index[f"{pid[name]}.{what}"] = value
    groups, start = [], 0
    for g in optimizer.param_groups:
        first = names[start]
        group = {k.rsplit(".", 1)[1]: v for k, v in scalars.items() if k.rsplit(".", 1)[0] == f"param_groups.{first}"}
        groups.append({**group, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return by_index, {"param_groups": groups, "scalars": {}}
