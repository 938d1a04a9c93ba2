"""Files written whole or not at all: a temporary file, fsync, then a rename (and an fsync of the directory), so a
reader or a process killed halfway never sees a part of one."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: tempfile-style 0600 would hide a shared run from its group


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (best effort: some file systems refuse)."""
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


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it and rename it to `path`: readers see the old
    file or the whole new one, never a part (a large file can be streamed into f)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def check_writable_file(path: Path, what: str) -> None:
    """A ConfigError naming `what` (the flag) unless `path` can be written: not a directory, in an existing and
    writable directory, and writable itself if it exists. Checked before any work, so nothing is computed for
    nothing."""
    from d2v.core.errors import ConfigError, SystemRefusal

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SystemRefusal(f"{what} {path} is not writable")  # a permission refusal: exit 1, as the README says
