"""Run directories and checkpoints: weights and optimizer tensors in safetensors, everything else in JSON.

Nothing here unpickles: loading a checkpoint never executes code. Every file is written to a temporary name,
fsynced and renamed, and a checkpoint directory appears only once complete, so an interrupted write never
leaves a half-written checkpoint behind.

    RUN_DIR/config.json                              the fully resolved config
    RUN_DIR/metrics.jsonl                            one JSON object per logged step
    RUN_DIR/checkpoints/step_00000300/model.safetensors
    RUN_DIR/checkpoints/step_00000300/state.safetensors   optimizer tensors
    RUN_DIR/checkpoints/step_00000300/state.json          step, optimizer scalars, grad-scaler state
    RUN_DIR/checkpoints/latest                       name of the newest complete checkpoint
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from d2v.errors import CheckpointError

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` of a run atomically, point `latest` at it, and keep the newest `keep`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_tensors(tmp / "model.safetensors", model.state_dict(), {"format": str(FORMAT_VERSION)})
        opt_tensors, opt_meta = optimizer_state(optimizer)
        _save_tensors(tmp / "state.safetensors", opt_tensors)
        atomic_write_json(tmp / "state.json", {"format": FORMAT_VERSION, "step": step, "optimizer": opt_meta, **extra})
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    if final.exists():  # the same step saved again (Ctrl-C right after a scheduled checkpoint)
        old = ckpt_root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_bytes(ckpt_root / "latest", (name + "\n").encode())
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / "state.json").exists() and (p / "model.safetensors").exists())


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run directory (or `run_dir` itself if it is a checkpoint)."""
    run_dir = Path(run_dir)
    if (run_dir / "model.safetensors").exists() and (run_dir / "state.json").exists():
        return run_dir
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        candidate = run_dir / "checkpoints" / pointer.read_text().strip()
        if (candidate / "state.json").exists() and (candidate / "model.safetensors").exists():
            return candidate
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint")
    return found[-1]


def read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, optimizer tensors, state JSON) of a checkpoint directory; errors name the bad file."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {ckpt / 'state.json'}: {exc}") from None
    try:
        model = load_file(str(ckpt / "model.safetensors"))
        opt = load_file(str(ckpt / "state.safetensors")) if (ckpt / "state.safetensors").exists() else {}
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or unreadable: {exc}") from None
    return model, opt, state


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a run (or a checkpoint inside one) was started with."""
    run_dir = Path(run_dir)
    for candidate in (run_dir, run_dir.parent.parent):
        path = candidate / "config.json"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError as exc:
                raise CheckpointError(f"cannot parse {path}: {exc}") from None
    raise CheckpointError(f"{run_dir} is not a d2v run directory (no config.json)")
