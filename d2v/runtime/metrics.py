"""The metrics log of a run: metrics.jsonl, one JSON object per logged step (the record of the run, flushed at
once), sent on to the experiment trackers --log names (d2v.runtime.trackers), and the run's summary.json. A resumed
run first drops the records written after its checkpoint."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

from d2v.core.files import atomic_write_bytes, atomic_write_json
from d2v.runtime.trackers import RunsFile, Start, check_installed, open_trackers, parse_log

METRICS = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics log (JSON lines with an integer step); a line cut short by a crash, or otherwise
    unreadable, is dropped."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (later ones come from a run that stopped after its last checkpoint)."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


def last_logged(path: Path, key: str) -> float:
    """The last finite-or-not number logged under `key`, NaN when none was."""
    values = [r[key] for r in read_metrics(path) if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else float("nan")


SUMMARY = "summary.json"


class MetricsLog:
    """Appends records to RUN/metrics.jsonl (after dropping those past `start`) and sends them to the trackers named
    in `log` (d2v.runtime.trackers: TensorBoard, W&B, MLflow, each from its own thread); does nothing where
    `enabled` is False (ranks other than 0 keep no log). `config` (the resolved config) goes to each tracker once;
    summary() writes RUN/summary.json and sends the run's summary; close(status) ends the tracker runs."""

    def __init__(self, run_dir: Path, start: int, log: str = "", enabled: bool = True, config: dict | None = None,
                 warn: Callable[[str], None] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        self.file, self.trackers = None, []
        if not enabled:
            return
        check_installed(log)
        history = read_metrics(self.path) if start and parse_log(log) else []
        truncate_metrics(self.path, start)
        self.file = open(self.path, "a")
        begin = Start(self.run_dir, start, config or {}, RunsFile(self.run_dir), history)
        self.trackers = open_trackers(log, begin, warn or (lambda msg: warnings.warn(msg, stacklevel=2)))

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for tracker in self.trackers:
            tracker.put("row", record)

    def summary(self, values: dict) -> None:
        """RUN/summary.json and each tracker's summary of the run (JSON values: numbers, strings, booleans)."""
        if self.file is None:
            return
        atomic_write_json(self.run_dir / SUMMARY, values)
        for tracker in self.trackers:
            tracker.put("summary", values)

    def close(self, status: str = "FINISHED") -> None:
        """Ends the tracker runs with `status` (FINISHED, KILLED: interrupted, FAILED: stopped by an error), each
        waiting at most CLOSE_SECONDS for what it still holds."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(status)
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close("FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED")
