"""The run directory's life: what state it is in, an exclusive lock while a process works in it, and the checks
that a path may become one. A run directory only ever holds what d2v pretrain writes:

    config.json  metrics.jsonl  checkpoints/  .lock  (and data-made files such as tokenizer.json)
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from d2v.core.errors import CheckpointError, ConfigError, SystemRefusal
from d2v.runtime import checkpoint as ckpt

LOCK = ".lock"


def is_run_dir(path: Path) -> bool:
    """A directory written by d2v pretrain (its config.json is a run config, not an exported encoder's)."""
    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "modality" in data and "run" in data


def enclosing_run(path: Path) -> Path | None:
    """The run directory that `path` is, or lies inside, if any."""
    path = Path(path).expanduser().resolve()
    for candidate in (path, *path.parents):
        if is_run_dir(candidate):
            return candidate
    return None


def check_writable_dir(path: Path, what: str) -> None:
    """Fail with one sentence unless `path` is (or can be created as) a directory this process can write in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a directory")
    parent = next((p for p in (path, *path.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemRefusal(f"{what} {path} is not writable (no write permission in {parent})")
    try:  # a unique name: threads of one process (a sweep exporting in parallel) check the same parent at once
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".d2v-write-test-"):
            pass
    except OSError as exc:
        raise SystemRefusal(f"{what} {path} is not writable ({exc.strerror or exc})") from None


class RunLock:
    """An exclusive advisory lock (flock) on RUN_DIR/.lock, held while a process trains in the directory.

    The kernel drops the lock when the process dies, however it dies, so a lock left by a killed run is never
    stale: the next process simply gets it. The file records the holder's pid for the error message."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            holder = self._holder()
            raise ConfigError(f"run directory {self.path.parent} is in use by another d2v process"
                              f"{f' (pid {holder})' if holder else ''}; wait for it to finish or choose another "
                              "--out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_new_run_target(out: Path) -> None:
    """`out` may receive a new run: it does not exist, is empty, or holds a run that never saved a checkpoint."""
    out = Path(out)
    check_writable_dir(out, "--out")
    if not out.exists():
        inside = enclosing_run(out.parent)
        if inside is not None:
            raise ConfigError(f"--out {out} lies inside the run directory {inside}; choose a path outside it")
        return
    entries = [p.name for p in out.iterdir() if p.name != LOCK]
    if not entries or is_run_dir(out):
        return
    if (out / "config.json").exists():
        raise ConfigError(f"--out {out} holds a config.json that is not a d2v run (an exported encoder?); "
                          "choose another --out")
    raise ConfigError(f"--out {out} is a non-empty directory that is not a d2v run; choose a new or empty one")


def has_checkpoint(run_dir: Path) -> bool:
    try:
        return bool(ckpt.candidates(run_dir))
    except CheckpointError:
        return False



def open_run(run_dir: Path, resume: bool, say) -> tuple[RunLock, bool]:
    """Create and lock a run directory (pretraining or fine-tuning); returns (the lock, whether to start from
    scratch). A partial checkpoint left by a killed process is removed; a new run never overwrites one that saved a
    checkpoint, and resuming a run that has none starts it again."""
    if not resume:
        check_new_run_target(run_dir)
    else:
        check_writable_dir(run_dir, "--out")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        for p in ckpt.remove_partial(run_dir):
            say(f"Removed {p.name}, a partial checkpoint left by a process that was killed while saving.")
        saved = has_checkpoint(run_dir)
        if resume and not saved:
            say(f"{run_dir} has no checkpoint yet: starting the run again from scratch with its saved config.")
        elif not resume and is_run_dir(run_dir):
            if saved:
                raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
            say(f"{run_dir} holds a run that stopped before its first checkpoint: starting it again from scratch.")
    except BaseException:
        lock.release()
        raise
    return lock, not (resume and saved)
