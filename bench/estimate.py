"""`d2v bench estimate`: how close `d2v pretrain --estimate` comes to the run it estimates. Each round runs the
estimate (a process of its own, as a user runs it), then the run itself with the same options, then the estimate
again (on a shared machine the load moves; the two estimates bracket the run), and compares:

- time: the estimated time of the run's updates against the run's own training time (its logged updates, from its
  summary's samples/s) and against its whole wall time;
- memory: the estimated peak of one process against the run's peak resident memory, read from the kernel's
  accounting of that process (os.wait4's ru_maxrss), and the part the model adds to the process (estimate: weights,
  gradients, AdamW, activations; run: peak minus the estimate's measured process before the model)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .harness import RunFailed, metrics, pretrain_command


def estimate(args: list[str], env: dict, json_path: Path) -> dict:
    """`d2v pretrain ARGS --estimate`'s JSON."""
    proc = subprocess.run(pretrain_command([*args, "--estimate", "--estimate-json", str(json_path)]), env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RunFailed("d2v pretrain --estimate failed: " + " | ".join(proc.stderr.strip().splitlines()[-5:]))
    return json.loads(json_path.read_text())


def measured_run(args: list[str], env: dict, out: Path) -> dict:
    """Wall seconds, peak resident bytes and the training seconds of `d2v pretrain ARGS --out OUT`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(pretrain_command([*args, "--out", str(out), "--no-progress"]), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RunFailed("d2v pretrain failed: " + " | ".join(output.strip().splitlines()[-5:]))
    records = [r for r in metrics(out) if "samples_per_s" in r]
    config = json.loads((out / "config.json").read_text())
    batch, steps = config["run"]["batch_size"], config["run"]["steps"]
    # each record's rate covers the updates since the one before: their time is (updates x batch) / rate
    train_s, last = 0.0, 0
    for r in records:
        train_s += (r["step"] - last) * batch / r["samples_per_s"]
        last = r["step"]
    return {"wall_s": wall, "train_s": train_s, "steps": steps, "peak_rss": usage.ru_maxrss * 1024}


def run(args: list[str], rounds: int = 1, threads: int | None = None, on_row=None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="d2v-bench-estimate-") as tmp:
        for k in range(rounds):
            before = estimate(args, env, Path(tmp) / f"before-{k}.json")
            real = measured_run(args, env, Path(tmp) / f"run-{k}")
            after = estimate(args, env, Path(tmp) / f"after-{k}.json")
            model_part = before["memory"] - before["baseline"]
            row = {"estimate_before": before, "estimate_after": after, "run": real,
                   "time_ratio_train": before["run_seconds"] / real["train_s"],
                   "time_ratio_train_after": after["run_seconds"] / real["train_s"],
                   "time_ratio_wall": before["run_seconds"] / real["wall_s"],
                   "memory_ratio": before["memory"] / real["peak_rss"],
                   "model_memory_ratio": model_part / max(real["peak_rss"] - before["baseline"], 1)}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return {"meta": {"command": [sys.executable, "-m", "d2v", "pretrain", *args], "threads": threads,
                     "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}, "rounds": rows}
