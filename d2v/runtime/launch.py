"""`d2v pretrain --nproc-per-node N`: N processes on this machine through torch.distributed's launcher API (the
engine of torchrun), with the console of a single process.

torchrun itself prints for its own sake: a warning that it set OMP_NUM_THREADS, on Ctrl-C or SIGTERM a
`SignalException` traceback of about 40 lines and exit code 1, and on a worker's error that worker's output from
every rank plus a `ChildFailedError` report. Here instead:
- rank 0 writes to this console (progress bar included); the other ranks' output goes to files that are shown only
  when one of them failed alone (its last lines, once); the launcher's own logging is silenced;
- the exit code is the one a single process would give: rank 0's when it failed (2 for a usage or data error, 3
  diverged), else the first failing rank's; 128 + the signal when the launcher was stopped by one (130 Ctrl-C,
  143 SIGTERM), after every worker saved its checkpoint;
- workers start in their own session (the launcher's choice), so a Ctrl-C reaches them once, forwarded by the
  launcher, and the run saves a checkpoint as a single process does (a second Ctrl-C interrupts at once).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

# Signals the launcher forwards to every worker: stop after the current update with a checkpoint. SIGUSR1 is SLURM's
# early warning (sbatch --signal=USR1@120).
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# How long the launcher waits for the workers to save their checkpoint after forwarding a signal before it kills
# them (torchrun waits 30 s).
SHUTDOWN_S = 120
SHOWN_LINES = 20  # lines of a failed non-zero rank's output shown
LAUNCHED_ENV = "D2V_LAUNCHED"  # set for the workers of launch_local
# Signals the launcher itself sends to workers when it stops them (after another one failed, or at shutdown)
LAUNCHER_SIGNALS = (15, 9)  # SIGTERM, SIGKILL
LATE_ERROR_S = 5.0  # how long a non-zero rank with a user error waits for rank 0 to report the same (d2v.cli)


def worker_exit_code(exitcode: int) -> int:
    """A worker's exit status as a shell reports it: 128 + N for a worker killed by signal N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def launch_local(nproc: int, argv: list[str], environ_chosen: dict[str, str] | None = None, err=None) -> int:
    """Run `python -m d2v ARGV` as nproc processes of one run on this machine; the exit code for the command.

    environ_chosen: the variables d2v's own defaults put into os.environ for one process (d2v.core.threads.apply_env),
    taken out again so that each worker chooses its own share of the CPUs."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    err = err or sys.stderr
    for key, value in (environ_chosen or {}).items():
        if os.environ.get(key) == value:
            del os.environ[key]
    os.environ[LAUNCHED_ENV] = "1"  # inherited by the workers
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.launcher").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="d2v-launch-") as logs:
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"d2v-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects={r: Std.ALL for r in range(1, nproc)}),
            signals_to_handle=FORWARDED, shutdown_timeout=SHUTDOWN_S)
        try:
            elastic_launch(config, sys.executable)("-m", "d2v", *argv)
        except SignalException as exc:
            return 128 + int(exc.sigval)
        except ChildFailedError as exc:
            return failed_exit_code(exc.failures.values(), Path(logs), err)
    return 0


def failed_exit_code(failures, logs: Path, err) -> int:
    """The exit code of a run some of whose workers failed. A worker that exited on its own (an error, a signal it
    handled) tells why; the launcher then stops the others with SIGTERM, which may catch one still shutting down, so
    deaths by signal count only when no worker exited on its own. Rank 0 has told the user itself; another rank's
    output is shown only when rank 0 did not fail on its own."""
    failures = list(failures)
    exited = {f.local_rank: f.exitcode for f in failures if f.exitcode > 0}
    if 0 in exited:
        return exited[0]
    if exited:
        rank = min(exited)
        _show_rank_output(logs, rank, err)
        return exited[rank]
    # Only deaths by signal. One the launcher does not send (SIGABRT, SIGSEGV, ...) is a crash of that worker: say
    # which and show what it printed, since a non-zero rank's output is otherwise in a deleted temporary folder.
    crashed = {f.local_rank: f.exitcode for f in failures if -f.exitcode not in LAUNCHER_SIGNALS}
    if crashed:
        rank = min(crashed)
        if rank != 0:
            _show_rank_output(logs, rank, err)
        print(f"Process {rank} of the run was killed by signal {-crashed[rank]} ({_signal_name(-crashed[rank])}).",
              file=err)
        return worker_exit_code(crashed[rank])
    return min(worker_exit_code(f.exitcode) for f in failures)


def _signal_name(signum: int) -> str:
    import signal
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown signal"


def _show_rank_output(logs: Path, rank: int, err) -> None:
    """The last lines of a failed rank's output (its stderr and stdout files under the launcher's log dir)."""
    lines: list[str] = []
    for name in ("stderr.log", "stdout.log"):
        for path in sorted(logs.rglob(f"{rank}/{name}")):
            lines += path.read_text(errors="replace").splitlines()
    lines = [line for line in lines if line.strip()][-SHOWN_LINES:]
    print(f"Process {rank} of the run failed:", file=err)
    for line in lines:
        print(f"  {line}", file=err)
