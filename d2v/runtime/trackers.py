"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow, each fed by a background
thread so that a slow or unreachable tracker never stops or slows training.

`--log` names a list (`tensorboard,wandb,mlflow`; `jsonl`, metrics.jsonl, is always written and stays the record
of the run). Each tracker receives the resolved config once, every metrics row, and the run's summary. The id of
its tracker run is kept in RUN/trackers.json (written atomically), so `--resume` continues the same tracker run;
rows that the stopped run had already sent (those metrics.jsonl held past the checkpoint) are not sent twice,
since a resumed run recomputes them bit for bit. A tracker first named on `--resume` gets the earlier rows of
metrics.jsonl first.

Where each logs (the clients' own settings, from the environment):
  tensorboard  RUN/tb
  wandb        WANDB_PROJECT (default d2v), WANDB_ENTITY, WANDB_MODE (online, offline); its files in RUN/wandb
               (or WANDB_DIR)
  mlflow       MLFLOW_TRACKING_URI (default: the client's, sqlite:///mlflow.db in the working directory),
               MLFLOW_EXPERIMENT_NAME (default d2v); the run is named after the run directory

A tracker that fails (its server gone, the network down) warns once; its later rows are still tried in batches
from its thread (rows of a failed batch are dropped) and none ever waits training. Its queue is bounded: when it
falls behind, rows are dropped and counted."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import queue
import secrets
import string
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Callable

from d2v.core.errors import ConfigError
from d2v.core.files import atomic_write_json

TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")
# tracker -> (module to find, the d2v extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
RUNS_FILE = "trackers.json"
QUEUE_ROWS = 10_000  # rows a tracker may fall behind before it drops them (a row is a few hundred bytes)
CLOSE_SECONDS = 60.0  # how long the end of a run waits for a tracker to send what it holds and close
FAILED_CLOSE_SECONDS = 15.0  # the same for a tracker that has failed during the run
PROJECT = "d2v"  # W&B project / MLflow experiment when the environment names none
# MLflow's defaults retry a dead server for about four minutes per request; a training run wants to know sooner.
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
MLFLOW_BATCH = {"metrics": 1000, "params": 100}  # MLflow's limits per log_batch request


def parse_log(value: str) -> list[str]:
    """The trackers a run.log value names besides metrics.jsonl: "" -> [], "jsonl,wandb" -> ["wandb"], in the
    given order, each once. Raises ConfigError naming an unknown one."""
    names = []
    for part in str(value).replace(" ", ",").split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in TRACKERS:
            raise ConfigError(f"--log {name!r} is not a tracker; choose from {', '.join(TRACKERS)} (comma-separated)")
        if name != "jsonl" and name not in names:
            names.append(name)
    return names


def valid_log(value) -> bool:
    """validation's rule for run.log."""
    try:
        parse_log(value)
    except ConfigError:
        return False
    return isinstance(value, str)


def check_installed(value: str) -> None:
    """A one-line error naming the extra to install for each tracker of `value` whose client is missing."""
    for name in parse_log(value):
        module, extra = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--log {name} needs the {module} package: pip install 'd2v[{extra}]'")


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: the config as the flat parameters MLflow takes."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def numbers(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (booleans as 0 / 1), without its step."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))}


class RunsFile:
    """RUN/trackers.json: {tracker: what resumes its tracker run}, updated atomically from the trackers' threads."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / RUNS_FILE
        self.lock = threading.Lock()

    def get(self, name: str) -> dict | None:
        try:
            entry = json.loads(self.path.read_text()).get(name)
        except (OSError, ValueError, AttributeError):
            return None
        return entry if isinstance(entry, dict) else None

    def put(self, name: str, entry: dict) -> None:
        with self.lock:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            data = data if isinstance(data, dict) else {}
            data[name] = entry
            atomic_write_json(self.path, data)


@dataclasses.dataclass
class Start:
    """What a tracker needs to open its run."""

    run_dir: Path
    start: int  # the step the run continues from (0: a new run)
    config: dict  # the resolved config
    runs: RunsFile
    history: list[dict]  # rows metrics.jsonl held before this start (the stopped run's, past it included)


class TensorBoard:
    """RUN/tb, continuing a resumed run's curves at its checkpoint (purge_step drops the events past it)."""

    name = "tensorboard"

    def open(self, s: Start) -> bool:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(s.run_dir / "tb"), purge_step=s.start + 1)
        if s.start == 0:
            self.writer.add_text("config", "```\n" + json.dumps(s.config, indent=2) + "\n```", 0)
        return True  # purge_step replaces what it held past the checkpoint: send every row from here

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            for key, value in numbers(row).items():
                self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def summary(self, values: dict) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(values, indent=2) + "\n```", 0)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run with the d2v run's name, its id kept in trackers.json and resumed with it."""

    name = "wandb"

    def open(self, s: Start) -> bool:
        import wandb

        project = os.environ.get("WANDB_PROJECT") or PROJECT
        entity = os.environ.get("WANDB_ENTITY") or None
        stored = s.runs.get(self.name)
        same = bool(stored and stored.get("project") == project and stored.get("entity") == entity)
        run_id = stored["id"] if same else new_run_id()
        entry = {"id": run_id, "project": project, "entity": entity}
        s.runs.put(self.name, {**entry, "opened": same and bool(stored.get("opened"))})  # before init: a run
        # killed during it still resumes this id, and sends the earlier rows if the id never opened
        self.run = wandb.init(project=project, entity=entity, id=run_id, resume="allow", name=s.run_dir.name,
                              dir=os.environ.get("WANDB_DIR") or str(s.run_dir), config=s.config,
                              settings=wandb.Settings(console="off"))
        s.runs.put(self.name, {**entry, "opened": True})
        return same and bool(stored.get("opened"))

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            self.run.log(numbers(row), step=row["step"])

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def new_run_id() -> str:
    """A W&B run id: 8 lowercase letters and digits, as wandb makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _public_uri(uri: str) -> str:
    """A tracking URI without the user name and password it may hold (kept out of trackers.json)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


class MLflow:
    """An MLflow run in MLFLOW_EXPERIMENT_NAME (default d2v) on MLFLOW_TRACKING_URI: the config as parameters
    (dotted keys), rows as metrics at their step (one request per batch), the summary as `summary.*` metrics and
    tags, the status at the end (FINISHED, KILLED when interrupted, FAILED)."""

    name = "mlflow"

    def open(self, s: Start) -> bool:
        for key, value in MLFLOW_HTTP.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(uri)
        stored = s.runs.get(self.name)
        if stored and stored.get("tracking_uri") == _public_uri(uri):
            self.run_id = stored["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return True
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=s.run_dir.name,
                                     tags={"d2v.run_dir": str(s.run_dir.resolve())})
        self.run_id = run.info.run_id
        s.runs.put(self.name, {"run_id": self.run_id, "experiment_id": experiment_id,
                               "tracking_uri": _public_uri(uri)})
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                  for k, v in flatten(s.config).items()]
        for i in range(0, len(params), MLFLOW_BATCH["params"]):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH["params"]])
        return False

    def log(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, row["step"]) for row in rows for k, v in numbers(row).items()]
        for i in range(0, len(metrics), MLFLOW_BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MLFLOW_BATCH["metrics"]])

    def summary(self, values: dict) -> None:
        from mlflow.entities import Metric, RunTag

        now, step = int(time.time() * 1000), int(values.get("steps", 0))
        metrics = [Metric(f"summary.{k}", v, now, step) for k, v in numbers(values).items()]
        tags = [RunTag(f"d2v.summary.{k}", str(v)) for k, v in values.items() if isinstance(v, str)]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Tracker:
    """One tracker behind a bounded queue and its own thread: put() never blocks; the first failure is said once
    (`warn`), later rows are still tried."""

    def __init__(self, backend, start: Start, warn: Callable[[str], None], queue_rows: int = QUEUE_ROWS):
        self.backend, self.warn, self.name = backend, warn, backend.name
        self.queue: queue.Queue = queue.Queue(maxsize=queue_rows)
        self.opened = self.failed = self.warned = False
        self.dropped = 0
        self.thread = threading.Thread(target=self._work, args=(start,), name=f"d2v-{self.name}", daemon=True)
        self.thread.start()

    def put(self, kind: str, payload) -> None:
        try:
            self.queue.put_nowait((kind, payload))
        except queue.Full:
            self.dropped += 1
            self._fail(f"{self.name} fell {self.queue.maxsize} rows behind; dropping rows")

    def close(self, status: str) -> None:
        """Hands over the close and waits for the thread: CLOSE_SECONDS, or FAILED_CLOSE_SECONDS when the tracker
        has failed (its server is likely still gone: the end of the run should not wait on it long)."""
        timeout = FAILED_CLOSE_SECONDS if self.failed else CLOSE_SECONDS
        deadline = time.monotonic() + timeout
        while self.thread.is_alive():
            try:
                self.queue.put(("close", status), timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            self._fail(f"{self.name} did not finish within {timeout:.0f} s; what it still held is lost")
        if self.dropped:
            self.warn(f"{self.name}: {self.dropped} rows were not sent (metrics.jsonl has them all)")

    def _fail(self, reason: str) -> None:
        self.failed = True
        if not self.warned:
            self.warned = True
            self.warn(f"{reason}; training goes on (metrics.jsonl keeps every row)")

    def _work(self, start: Start) -> None:
        sent = self._open(start)
        while True:
            kind, payload = self.queue.get()
            if kind == "row":  # every row waiting goes in one request
                rows = [payload]
                while True:
                    try:
                        kind, payload = self.queue.get_nowait()
                    except queue.Empty:
                        kind = None
                        break
                    if kind != "row":
                        break
                    rows.append(payload)
                rows = [r for r in (_unsent(row, sent) for row in rows) if r]
                self._call("log", rows)
                if kind is None:
                    continue
            if kind == "summary":
                self._call("summary", payload)
            elif kind == "close":
                self._call("close", payload)
                return

    def _open(self, start: Start) -> dict[str, int]:
        """Opens the tracker run; returns the last step of each key it already holds (a resumed tracker run)."""
        try:
            resumed = self.backend.open(start)
            self.opened = True
        except Exception as exc:  # noqa: BLE001 - any failure of a tracker is a warning, never a stop
            self._fail(f"{self.name} could not start ({_reason(exc)})")
            return {}
        if resumed:
            return _last_steps(start.history)
        earlier = [row for row in start.history if row["step"] <= start.start]
        if start.start and earlier:  # a tracker run new to a resumed run: the curve so far first
            self._call("log", earlier)
        return {}

    def _call(self, method: str, payload) -> None:
        if not self.opened or (method == "log" and not payload):
            return
        try:
            getattr(self.backend, method)(payload)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"{self.name} failed ({_reason(exc)})")


def _last_steps(rows: list[dict]) -> dict[str, int]:
    last: dict[str, int] = {}
    for row in rows:
        for key in numbers(row):
            last[key] = max(last.get(key, row["step"]), row["step"])
    return last


def _unsent(row: dict, sent: dict[str, int]) -> dict:
    """The part of `row` a resumed tracker run does not hold yet ({} when it holds all of it)."""
    keep = {k: v for k, v in row.items() if k != "step" and row["step"] > sent.get(k, -1)}
    return {"step": row["step"], **keep} if keep else {}


def open_trackers(log: str, start: Start, warn: Callable[[str], None]) -> list[Tracker]:
    """A Tracker per tracker that `log` names (check_installed first: a missing client is a ConfigError)."""
    check_installed(log)
    return [Tracker(BACKENDS[name](), start, warn) for name in parse_log(log)]
