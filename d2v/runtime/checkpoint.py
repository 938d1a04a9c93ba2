"""Run directories and checkpoints: weights and optimizer tensors in safetensors, everything else in JSON.

Nothing here unpickles: loading a checkpoint never executes code. Every file is written to a temporary name,
fsynced and renamed, and a checkpoint directory appears only once complete, so an interrupted write never
leaves a half-written checkpoint behind.

    RUN_DIR/config.json                              the fully resolved config
    RUN_DIR/metrics.jsonl                            one JSON object per logged step
    RUN_DIR/checkpoints/step_00000300/model.safetensors
    RUN_DIR/checkpoints/step_00000300/state.safetensors   optimizer tensors
    RUN_DIR/checkpoints/step_00000300/state.json          step, optimizer scalars, grad-scaler state
    RUN_DIR/checkpoints/step_00000300/manifest.json       size and sha256 of each file above, written last
    RUN_DIR/checkpoints/latest                       name of the newest complete checkpoint

A checkpoint is complete when its manifest lists every file with the right size; reading it also checks the
sha256 of each file, so a truncated, deleted or corrupted file is refused, never half-loaded.

A sharded checkpoint (FSDP2 runs, run.strategy=fsdp) keeps the tensors as torch.distributed.checkpoint (DCP) shards
in safetensors files, one per rank, with their placement in each file's safetensors metadata (JSON; DCP's own
pickled .metadata file is not used), so it loads at any world size, or consolidated in one process:

    RUN_DIR/checkpoints/step_00000300/dcp/shard-0000R-model-00001-of-00001.safetensors   "model.<name>" weights,
                                                                          "optim.state.<name>.<key>" Adam state
    RUN_DIR/checkpoints/step_00000300/state.json    step, optimizer scalars ("param_groups.<name>.<key>")
    RUN_DIR/checkpoints/step_00000300/manifest.json
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from d2v.core.errors import CheckpointError
from d2v.core.files import FILE_MODE, atomic_write_bytes, atomic_write_json, fsync_dir

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.safetensors", "state.json")
SHARDED_DIR = "dcp"  # the DCP shards of a sharded checkpoint
SHARDED_FILES = ("state.json",)  # besides the shards, which its manifest lists


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, FILE_MODE)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, names: tuple[str, ...] | list[str]) -> None:
    """Record size and sha256 of each named file; written last, so its presence means the rest is complete."""
    directory = Path(directory)
    files = {n: {"bytes": (directory / n).stat().st_size, "sha256": _sha256(directory / n)} for n in names}
    atomic_write_json(directory / MANIFEST, {"format": FORMAT_VERSION, "files": files})


def _manifest(directory: Path) -> dict | None:
    try:
        files = json.loads((Path(directory) / MANIFEST).read_text())["files"]
        return files if isinstance(files, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete(directory: Path) -> bool:
    """Every file of the checkpoint is present with the size its manifest records (no hashing: cheap)."""
    directory = Path(directory)
    files = _manifest(directory)
    if files is None:  # written before manifests (format 1): complete when all its files are there
        return not (directory / MANIFEST).exists() and _legacy(directory) and all((directory / n).is_file() for n in FILES)
    if set(_required(directory)) - set(files):
        return False
    try:
        return all((directory / n).stat().st_size == meta["bytes"] for n, meta in files.items())
    except (OSError, KeyError, TypeError):
        return False


def _legacy(directory: Path) -> bool:
    try:
        return json.loads((Path(directory) / "state.json").read_text()).get("format") == 1
    except (OSError, ValueError, AttributeError):
        return False


def verify(directory: Path) -> None:
    """Raise CheckpointError naming the first missing, resized or altered file of a checkpoint."""
    directory = Path(directory)
    files = _manifest(directory)
    if files is None:
        raise CheckpointError(f"checkpoint {directory} has no readable {MANIFEST}; it is incomplete")
    for name in sorted(set(_required(directory)) | set(files)):
        path, meta = directory / name, files.get(name)
        if meta is None:
            raise CheckpointError(f"checkpoint {directory} does not list {name} in its manifest")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
        if path.stat().st_size != meta.get("bytes") or _sha256(path) != meta.get("sha256"):
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} differs from its manifest")


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
    # How the optimizer runs (run.fused_adamw, which may change on resume) is this run's choice, not the saved one's:
    # load_state_dict would take the saved groups' flags, and place the step counters by them
    how = [{k: g[k] for k in IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, flags in zip(optimizer.param_groups, how):
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))  # else torch keeps step counters on the CPU
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(device=p.device if on_device else "cpu", dtype=torch.float32)


IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")


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
        write_manifest(tmp, FILES)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    _publish(run_dir, tmp, final, keep)
    return final


def _publish(run_dir: Path, tmp: Path, final: Path, keep: int) -> None:
    """Move the finished checkpoint `tmp` to `final` (replacing the same step saved again, e.g. Ctrl-C right after
    a scheduled checkpoint), point `latest` at it, and keep the newest `keep` checkpoints."""
    ckpt_root = final.parent
    if final.exists():
        old = ckpt_root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(ckpt_root)
    atomic_write_bytes(ckpt_root / "latest", (final.name + "\n").encode())
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p))


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete temporary checkpoint directories left by a killed process (call with the run directory locked)."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoint directories to resume or export from, best first: the one `latest` names, then the others newest
    first. Incomplete ones are included: reading them says what is wrong (read_latest skips them)."""
    run_dir = Path(run_dir)
    if (run_dir / "state.json").exists() and ((run_dir / "model.safetensors").exists() or is_sharded(run_dir)):
        return [run_dir]  # a checkpoint directory itself
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    root = run_dir / "checkpoints"
    found = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True) \
        if root.is_dir() else []
    pointer = run_dir / "checkpoints" / "latest"
    try:
        named = run_dir / "checkpoints" / pointer.read_text().strip()
    except OSError:
        named = None
    if named in found:
        found.remove(named)
        found.insert(0, named)
    return found


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run directory (or `run_dir` itself if it is a checkpoint)."""
    found = [p for p in candidates(run_dir) if p == Path(run_dir) or is_complete(p)]
    if not found:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint")
    return found[0]


def read_latest(run_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(path, model tensors, optimizer tensors, state) of the newest checkpoint that reads back intact; a damaged
    newer one is skipped with a warning naming it and what is wrong."""
    found = candidates(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint")
    errors = []
    for path in found:
        try:
            result = read_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        for msg in errors:
            warnings.warn(f"{msg}; using the older checkpoint {path.name} instead", stacklevel=2)
        return (path, *result)
    raise CheckpointError(errors[0] if len(errors) == 1 else f"no checkpoint of {run_dir} reads back intact ({errors[0]})")


def read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, optimizer tensors, state JSON) of a checkpoint directory; errors name the bad file."""
    ckpt = Path(ckpt)
    if not (_legacy(ckpt) and not (ckpt / MANIFEST).exists() and is_complete(ckpt)):
        verify(ckpt)  # format-1 checkpoints (before manifests) are read when all their files are there
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {ckpt / 'state.json'}: {exc}") from None
    if is_sharded(ckpt):
        model, opt = read_sharded(ckpt)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{ckpt / 'state.json'} does not hold a checkpoint state")
        return model, opt, state
    try:
        model = load_file(str(ckpt / "model.safetensors"))
        opt = load_file(str(ckpt / "state.safetensors"))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or unreadable: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{ckpt / 'state.json'} does not hold a checkpoint state")
    return model, opt, state


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config a run (or a checkpoint inside one) was started with."""
    run_dir = Path(run_dir)
    for candidate in (run_dir, run_dir.parent.parent):
        path = candidate / "config.json"
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (ValueError, OSError) as exc:
                raise CheckpointError(f"cannot parse {path}: {exc}") from None
            if not isinstance(data, dict) or "modality" not in data or "run" not in data:
                raise CheckpointError(f"{path} is not a d2v run config (is {run_dir} an exported encoder?)")
            return data
    raise CheckpointError(f"{run_dir} is not a d2v run directory (no config.json)")


# ------------------------------------------------------------------------------------------------ sharded (DCP)
def read_checkpoint_state(ckpt: Path) -> dict[str, Any]:
    """The state.json of a checkpoint (step, optimizer scalars, ...), without its tensors."""
    try:
        state = json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {Path(ckpt) / 'state.json'}: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{Path(ckpt) / 'state.json'} does not hold a checkpoint state")
    return state


def is_sharded(directory: Path) -> bool:
    return (Path(directory) / SHARDED_DIR).is_dir()


def _required(directory: Path) -> tuple[str, ...]:
    return SHARDED_FILES if is_sharded(directory) else FILES


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able optimizer scalars) of a model and its optimizer, keyed by parameter name; with FSDP the
    tensors are this rank's DTensor shards. Also the template a sharded checkpoint loads into."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    scalars = {}
    flat = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    for key, value in flat.items():
        if isinstance(value, torch.Tensor):
            tensors[f"optim.{key}"] = value
        else:
            scalars[key] = list(value) if isinstance(value, tuple) else value
    return tensors, scalars


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       scalars: dict, full: bool = False) -> None:
    """Set model and optimizer from sharded_state()-style dicts (full tensors on every rank when `full`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim_sd = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    optim_sd.update({k: tuple(v) if isinstance(v, list) else v for k, v in scalars.items()})
    options = StateDictOptions(full_state_dict=full, flatten_optimizer_state_dict=True)
    try:
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=full))
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint does not match the run's model: {str(exc).splitlines()[0]}") from None


def load_full_into_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                           opt_tensors: dict[str, torch.Tensor], opt_meta: dict) -> None:
    """A single-file checkpoint (full tensors) into an FSDP-sharded model and its optimizer: each rank keeps the
    slices of its own shards (torch.distributed.tensor.distribute_tensor with the parameter's placement)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if isinstance(like, DTensor) and tuple(full.shape) == tuple(like.shape):
            return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
        return full

    with torch.no_grad():
        saved = set(model.state_dict())  # persistent tensors only
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name not in saved:
                continue
            if name not in weights:
                raise CheckpointError(f"the checkpoint has no tensor {name!r} for the run's model")
            sharded = shard_like(weights[name], p)
            p.copy_(sharded)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    converted = {}
    for key, value in opt_tensors.items():
        pid = int(key.split(".", 1)[0])
        converted[key] = shard_like(value, params[pid]) if pid < len(params) else value
    load_optimizer_state(optimizer, converted, opt_meta)


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            extra: dict[str, Any], keep: int, is_main: bool, barrier) -> Path:
    """Every rank writes its shards (torch.distributed.checkpoint); rank 0 then adds state.json and the manifest
    and renames the directory into place, so that the checkpoint appears only once every shard is written.
    All ranks must call this together; `barrier()` synchronizes them."""
    import torch.distributed.checkpoint as dcp

    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}-dcp"
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    tensors, scalars = sharded_state(model, optimizer)
    try:
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=True))
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()  # every rank's shards are on disk
    if is_main:
        try:
            atomic_write_json(tmp / "state.json", {"format": FORMAT_VERSION, "step": step, "layout": "dcp",
                                                   "optimizer": {"scalars": scalars}, **extra})
            shards = sorted(str(p.relative_to(tmp)) for p in (tmp / SHARDED_DIR).rglob("*") if p.is_file())
            write_manifest(tmp, [*SHARDED_FILES, *shards])
            fsync_dir(tmp / SHARDED_DIR)
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(run_dir, tmp, final, keep)
    barrier()
    return final


def load_sharded_into(ckpt: Path, template: dict[str, torch.Tensor], check: bool = True) -> None:
    """Fill `template` (sharded_state()'s tensors: DTensor shards at any world size, or full tensors) in place from
    a sharded checkpoint; DCP reads each rank's slices from whichever files hold them."""
    import torch.distributed as td
    import torch.distributed.checkpoint as dcp

    if check:
        verify(ckpt)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
            dcp.load(template, storage_reader=dcp.HuggingFaceStorageReader(str(Path(ckpt) / SHARDED_DIR)),
                     no_dist=not td.is_initialized())
    except Exception as exc:  # noqa: BLE001 - DCP raises assorted types (CheckpointException, RuntimeError)
        raise CheckpointError(f"sharded checkpoint {ckpt} does not match the run or is unreadable: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def read_sharded(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model tensors, optimizer tensors) of a sharded checkpoint, consolidated into full tensors in this process
    (no model or process group needed): model names as in model.safetensors, optimizer keys "state.<name>.<key>"."""
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.HuggingFaceStorageReader(str(Path(ckpt) / SHARDED_DIR)).read_metadata()
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"sharded checkpoint {ckpt} is unreadable: {exc}") from None
    template = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()}
    load_sharded_into(ckpt, template, check=False)  # read_checkpoint verified it
    model = {k[len("model."):]: v for k, v in template.items() if k.startswith("model.")}
    optim = {k[len("optim."):]: v for k, v in template.items() if k.startswith("optim.")}
    return model, optim
