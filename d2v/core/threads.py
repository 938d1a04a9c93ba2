"""CPU thread defaults that behave on a shared machine, set before torch loads its OpenMP runtime.

Two things make a CPU run lose far more than its fair share beside another busy process:
- OpenMP threads that spin at every barrier (GNU libgomp's default spins ~300k iterations before sleeping): beside
  another process they burn the time slices the working threads need, so every parallel region waits for a thread
  that is not running;
- more threads than the CPUs this process may use (its affinity mask, e.g. `taskset`, and its cgroup CPU quota,
  e.g. `docker --cpus`).

libgomp reads OMP_WAIT_POLICY / GOMP_SPINCOUNT / OMP_NUM_THREADS once, when the library is loaded (at `import
torch`), so the `d2v` command sets them first (`apply_env`). Whatever the user set in the environment wins.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

# Idle OpenMP threads sleep at once instead of spinning (libgomp's default spins 300000 iterations first). Measured
# on the shared 2-core machine (bench/RESULTS.md, "Threads on a shared machine"): passive waiting was faster alone
# (other engineers' jobs were running) and kept about half of that beside a busy process, where libgomp's default
# kept under a fifth; a short spin (GOMP_SPINCOUNT=10000) came between the two.
WAIT_POLICY = "PASSIVE"
# Variables that, when the user set any of them, mean the user chose how OpenMP waits.
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 cpu.max or v1 cpu.cfs_quota_us), None if none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all of them where the OS has no affinity call)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_budget(affinity: int | None = None, quota: float | None = -1.0, processes: int = 1) -> int:
    """Threads one of `processes` processes on this machine should use: its share of the affinity mask, capped by
    the cgroup quota (rounded down, at least 1)."""
    affinity = affinity_cpus() if affinity is None else affinity
    quota = cgroup_cpus() if quota == -1.0 else quota
    cpus = min(affinity, math.floor(quota)) if quota is not None else affinity
    return max(1, cpus // max(1, processes))


CHOSEN: dict[str, str] = {}  # what apply_env put into os.environ (a launcher takes it out again for its workers)


def apply_env(environ=None) -> dict[str, str]:
    """Set the thread defaults in `environ` (os.environ) where the user has not; returns what was set.

    Call before torch is imported: libgomp reads these once, at load."""
    environ = os.environ if environ is None else environ
    chosen = CHOSEN if environ is os.environ else {}
    if "OMP_NUM_THREADS" not in environ:
        # torchrun sets OMP_NUM_THREADS=1 itself for several processes; a bare launcher may not
        chosen["OMP_NUM_THREADS"] = str(cpu_budget(processes=int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    if not any(v in environ for v in WAIT_VARS):
        chosen["OMP_WAIT_POLICY"] = WAIT_POLICY
    environ.update(chosen)
    return chosen


def cap_torch_threads() -> int:
    """In a process where torch was imported before apply_env could run (d2v used as a library): lower torch's
    intra-op threads to the CPU budget unless the user set OMP_NUM_THREADS. Returns the thread count in use."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > cpu_budget():
        torch.set_num_threads(cpu_budget())
    return torch.get_num_threads()
