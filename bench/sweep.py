"""Quality sweep: pretrain several configurations (in parallel where the machine allows), export every checkpoint
of each, and linear-probe its student (and, if asked, its teacher). Made for searching a preset's settings on a GPU
machine in minutes; speed is not measured here (runs share the machine), only quality against steps.

A spec is a JSON list of runs:

    [{"name": "span10", "modality": "speech", "recipe": "v2", "steps": 200, "checkpoints": 4,
      "probe": "spoken-digits", "set": ["mask.span_length=10"], "weights": ["student", "teacher"]}, ...]

Required: name (unique, letters, digits, '.', '_', '-'), modality, steps, probe. Optional: recipe (v1), checkpoints
(4), set (KEY=VALUE list for `d2v pretrain --set`), args (more `d2v pretrain` arguments, e.g. ["--preset", "small"]),
weights (["student"]), max_train (0: all), holdout (speech: held-out file globs; the built-in spoken-digits holds out
its two voices by itself). Each finished run appends one JSON line to the results file as soon as it is probed."""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from d2v.core.errors import ConfigError
from d2v.export import export_checkpoint
from d2v.probe import probe_path
from d2v.runtime.checkpoint import list_checkpoints

from .harness import RunFailed, metrics, run_pretrain

_KEYS = {"name", "modality", "recipe", "steps", "checkpoints", "probe", "set", "args", "weights", "max_train",
         "holdout"}


def load_spec(path: Path) -> list[dict]:
    """The spec's runs with defaults filled in; ConfigError (one sentence) for anything malformed."""
    try:
        runs = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the sweep spec {path} ({exc})") from None
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"the sweep spec {path} must be a non-empty JSON list of runs")
    seen = set()
    out = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise ConfigError(f"run {i} of {path} is not a JSON object")
        unknown = set(run) - _KEYS
        missing = {"name", "modality", "steps", "probe"} - set(run)
        if unknown or missing:
            what = f"unknown keys {sorted(unknown)}" if unknown else f"missing keys {sorted(missing)}"
            raise ConfigError(f"run {i} of {path} has {what}")
        name = str(run["name"])
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in seen:
            raise ConfigError(f"run {i} of {path}: name {name!r} must be unique and use only letters, digits, "
                              f"'.', '_' and '-'")
        seen.add(name)
        if not isinstance(run["steps"], int) or run["steps"] < 1:
            raise ConfigError(f"run {name}: steps must be a positive integer")
        weights = run.get("weights", ["student"])
        if not weights or set(weights) - {"student", "teacher"}:
            raise ConfigError(f"run {name}: weights must list 'student' and/or 'teacher'")
        out.append({"recipe": "v1", "checkpoints": 4, "set": [], "args": [], "max_train": 0, "holdout": None,
                    **run, "weights": weights})
    return out


def _pretrain_args(run: dict, device: str) -> list[str]:
    every = max(1, run["steps"] // max(1, run["checkpoints"]))
    args = ["--modality", run["modality"], "--recipe", run["recipe"], "--device", device, "--steps", str(run["steps"]),
            "--checkpoint-every", str(every), "--set", "run.keep_checkpoints=0", *run["args"]]
    for item in run["set"]:
        args += ["--set", item]
    return args


def run_one(run: dict, work: Path, device: str, threads: int, deadline: float) -> dict:
    """Pretrain one run and probe its checkpoints; a result record (with "error" instead of rows on failure)."""
    record = {"name": run["name"], "modality": run["modality"], "recipe": run["recipe"], "steps": run["steps"],
              "set": run["set"], "args": run["args"]}
    out = work / "runs" / run["name"]
    t0 = time.time()
    try:
        wall = run_pretrain(_pretrain_args(run, device), out, threads=threads, what="pretrain",
                            timeout=max(1.0, deadline - t0) if deadline < float("inf") else None)
    except subprocess.TimeoutExpired:
        return {**record, "error": "stopped at the sweep's time limit"}
    except RunFailed as exc:
        return {**record, "error": str(exc)}
    record["pretrain_s"] = round(wall, 1)
    rows = []
    for ck in list_checkpoints(out):
        row = {"step": int(ck.name.split("_")[-1])}
        for weights in run["weights"]:
            enc = work / "encoders" / f"{run['name']}-{ck.name}-{weights}"
            export_checkpoint(ck, enc, weights=weights, hf=False)
            row[weights] = probe_path(enc, run["probe"], device=device, max_train=run["max_train"],
                                      holdout=run["holdout"]).accuracy
        rows.append(row)
    logged = [r for r in metrics(out) if "loss" in r]
    last = logged[-1] if logged else {}
    return {**record, "rows": rows, **{k: last[k] for k in ("loss", "target_std", "pred_std") if k in last}}


def sweep(runs: list[dict], work: Path, results: Path, device: str = "cpu", parallel: int = 1, threads: int = 1,
          seconds: float = 0.0, on_record=None) -> list[dict]:
    """Run every spec entry, `parallel` at a time; each record is appended to `results` (JSON lines) when done.
    seconds > 0: runs not started by then are skipped, a pretraining still going at the limit is stopped."""
    (work / "runs").mkdir(parents=True, exist_ok=True)
    (work / "encoders").mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + seconds if seconds > 0 else float("inf")
    lock = threading.Lock()
    records = []

    def one(run: dict) -> None:
        if time.time() >= deadline:
            record = {"name": run["name"], "error": "not started: the sweep's time limit had passed"}
        else:
            try:
                record = run_one(run, work, device, threads, deadline)
            except Exception as exc:  # one failed run must not lose the others' results
                record = {"name": run["name"], "error": f"{type(exc).__name__}: {exc}"}
        with lock:
            records.append(record)
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
            if on_record:
                on_record(record)

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(one, runs))
    return records
