"""--log trackers: W&B (offline, read back from its run files) and MLflow (a real `mlflow server` on 127.0.0.1 and a
local file store, read back with MLflow's client) get the config, every metrics row and the summary, and --resume
continues the same tracker run; a tracker that fails never stops training."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import tiny_cli_args, tiny_config
from d2v.cli import app
from d2v.objective import Data2Vec
from d2v.runtime import checkpoint as ckpt
from d2v.runtime import trackers
from d2v.runtime.metrics import read_metrics
from d2v.train import pretrain

runner = CliRunner()
SERVER_DEPS = ("mlflow", "flask", "flask_cors", "sqlalchemy", "alembic", "aiohttp")


def _missing(*modules):
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` (sqlite store) on 127.0.0.1 for the session, stopped with its process group after."""
    missing = _missing(*SERVER_DEPS)
    if missing:
        pytest.skip(f"mlflow server needs {', '.join(missing)} (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--default-artifact-root", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start in 180 s"
            time.sleep(0.3)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """W&B offline with its caches in tmp_path; MLflow's requests quick to give up."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                       "WANDB_X_DISABLE_STATS": "true", "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
                       "WANDB_PROJECT": "d2v-test", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_EXPERIMENT_NAME": "d2v-test"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _interrupt_at(monkeypatch, step_to_stop, then=None):
    original = Data2Vec.ema_step

    def ema_step(self, step):
        if step == step_to_stop:
            if then is not None:
                then()
            else:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
        return original(self, step)

    monkeypatch.setattr(Data2Vec, "ema_step", ema_step)


def _run(cfg, out, resume=False):
    buffer = io.StringIO()
    summary = pretrain(cfg, out=out, resume=resume, progress=False, console=Console(file=buffer, width=200))
    return summary, buffer.getvalue()


def _mlflow_rows(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_log_names_a_list_of_trackers():
    assert trackers.parse_log("") == [] and trackers.parse_log("jsonl") == []
    assert trackers.parse_log("tensorboard") == ["tensorboard"]  # what run configs before the list held
    assert trackers.parse_log("jsonl,wandb, mlflow,wandb") == ["wandb", "mlflow"]
    result = runner.invoke(app, ["pretrain", "--log", "wandb,neptune", "--dry-run"])
    assert result.exit_code == 2 and "neptune" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("name,extra", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_client_is_one_line_naming_the_extra(name, extra, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a))
    result = runner.invoke(app, ["pretrain", "--log", f"jsonl,{name}", "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"pip install 'd2v[{extra}]'" in " ".join(result.output.split())


def test_20_steps_to_mlflow_server_and_wandb_offline_and_resume_continues_both(tmp_path, monkeypatch, tracker_env,
                                                                                mlflow_server):
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from wandb_offline import finished_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "run"
    cfg = tiny_config(**{"run.steps": 20, "run.checkpoint_every": 5, "run.log": "wandb,mlflow"})
    with monkeypatch.context() as m:
        _interrupt_at(m, 12)
        part, _ = _run(cfg, out)
    assert part.interrupted and part.steps == 12
    ids = json.loads((out / "trackers.json").read_text())
    client = MlflowClient(mlflow_server)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "KILLED"
    # A stop after the checkpoint at 10 (a crash): steps 11 and 12 were sent, and the resumed run computes them again.
    shutil.rmtree(ckpt.latest_checkpoint(out))
    assert ckpt.latest_checkpoint(out).name == "step_00000010"
    resumed, said = _run(cfg, out, resume=True)
    assert resumed.steps == 20 and "Warning" not in said
    assert json.loads((out / "trackers.json").read_text()) == ids  # the same tracker runs, continued

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    run_id = ids["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["run.steps"] == "20" and run.data.params["model.dim"] == "32"
    for key in ("loss", "lr", "tau", "target_std", "pred_std", "samples_per_s"):
        rows = _mlflow_rows(mlflow_server, run_id, key)
        assert [s for s, _ in rows] == list(range(1, 21)), key  # every row once: 11 and 12 not twice
        if key != "samples_per_s":  # a resumed run recomputes its rows bit for bit; throughput is its own
            assert [v for _, v in rows] == pytest.approx([r[key] for r in records], rel=1e-12), key
    assert run.data.metrics["summary.final_loss"] == pytest.approx(resumed.final_loss)
    assert run.data.metrics["summary.steps"] == 20

    parts = finished_runs(out, ids["wandb"]["id"], count=2)
    assert len(parts) == 2  # one W&B run id, one file per process
    assert {p["id"] for p in parts} == {ids["wandb"]["id"]}
    history = [row for p in parts for row in p["history"]]
    assert [row["_step"] for row in history] == list(range(1, 21))
    assert [row["loss"] for row in history] == pytest.approx([r["loss"] for r in records], rel=1e-12)
    assert parts[0]["config"]["run"]["steps"] == 20 and parts[0]["config"]["model"]["dim"] == 32
    assert parts[0]["exit_code"] == 1 and parts[1]["exit_code"] == 0  # interrupted, then finished
    assert parts[1]["summary"]["final_loss"] == pytest.approx(resumed.final_loss)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["final_loss"] == pytest.approx(resumed.final_loss)


def test_mlflow_file_store_and_a_tracker_added_on_resume_gets_the_earlier_rows(tmp_path, monkeypatch, tracker_env):
    missing = _missing("mlflow")
    if missing:
        pytest.skip("needs mlflow (pip install 'd2v[mlflow]')")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.18 deprecates the file store
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)
        part, _ = _run(tiny_config(**{"run.steps": 8}), out)  # no tracker yet
    assert part.steps == 4 and not (out / "trackers.json").exists()
    cfg = tiny_config(**{"run.log": "mlflow"})
    resumed, said = _run(cfg, out, resume=True)  # where a run logs may change on --resume
    assert resumed.steps == 8 and "Warning" not in said
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    assert [s for s, _ in _mlflow_rows(uri, run_id, "loss")] == list(range(1, 9))
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert json.loads((out / "config.json").read_text())["run"]["log"] == ""  # the saved config is the run's


class _Gate:
    """A TCP forwarder to the tracking server; shut() takes the network away (connections refused after it)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut:
                client.close()
                return
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def shut(self):
        self.cut = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
        except OSError:
            pass
        self.listener.close()
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_a_tracker_whose_server_goes_away_warns_once_and_training_goes_on(tmp_path, monkeypatch, tracker_env,
                                                                          mlflow_server):
    gate = _Gate(int(mlflow_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{gate.port}")
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        def cut():  # once the tracker run exists (its start is not held up by the training loop)
            deadline = time.monotonic() + 120
            while "mlflow" not in json.loads((out / "trackers.json").read_text() if (out / "trackers.json").exists()
                                             else "{}") and time.monotonic() < deadline:
                time.sleep(0.05)
            gate.shut()

        _interrupt_at(m, 6, then=cut)
        summary, said = _run(tiny_config(**{"run.steps": 20, "run.log": "mlflow"}), out)
    assert summary.steps == 20 and not summary.interrupted
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 21))
    warnings = [line for line in said.splitlines() if line.startswith("Warning")]
    # once: "mlflow failed", or "mlflow could not start" when the cut lands while the run is still logging its config
    assert len(warnings) == 1 and ("mlflow failed" in warnings[0] or "mlflow could not start" in warnings[0]), said
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    steps = [s for s, _ in _mlflow_rows(mlflow_server, run_id, "loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 6  # what got through before the cut


class _Stuck:
    """A tracker whose server hangs until released."""

    name = "stuck"

    def __init__(self):
        self.entered, self.release, self.rows = threading.Event(), threading.Event(), []

    def open(self, start):
        return False

    def log(self, rows):
        self.entered.set()
        self.release.wait()
        self.rows += rows

    def summary(self, values):
        pass

    def close(self, status):
        pass


def test_a_stuck_tracker_never_blocks_the_caller_and_drops_beyond_its_queue(tmp_path):
    backend, said = _Stuck(), []
    start = trackers.Start(tmp_path, 0, {}, trackers.RunsFile(tmp_path), [])
    tracker = trackers.Tracker(backend, start, said.append, queue_rows=5)
    tracker.put("row", {"step": 1, "loss": 1.0})
    assert backend.entered.wait(60)  # the tracker's thread now hangs in its request
    putting = threading.Thread(target=lambda: [tracker.put("row", {"step": i, "loss": 1.0}) for i in range(2, 101)])
    putting.start()
    putting.join(60)
    assert not putting.is_alive()  # 99 rows handed over while the tracker hung: none waited
    backend.release.set()
    tracker.close("FINISHED")
    assert [r["step"] for r in backend.rows] == [1, 2, 3, 4, 5, 6] and tracker.dropped == 94
    assert len(said) == 2 and "fell 5 rows behind" in said[0] and "94 rows were not sent" in said[1]


def test_finetune_logs_to_wandb(tmp_path, monkeypatch, tracker_env):
    pytest.importorskip("wandb")
    from d2v.finetune import FinetuneConfig, finetune
    from wandb_offline import finished_runs

    pretrain(tiny_config(**{"run.steps": 2}), out=tmp_path / "pre", progress=False)
    cfg = FinetuneConfig(encoder=str(tmp_path / "pre"), steps=6, head_epochs=0, batch_size=32, eval_every=3,
                         log="wandb")
    said = io.StringIO()
    summary = finetune(cfg, tmp_path / "ft", progress=False, console=Console(file=said, width=200))
    run_id = json.loads((tmp_path / "ft" / "trackers.json").read_text())["wandb"]["id"]
    (run,) = finished_runs(tmp_path / "ft", run_id)
    assert [row["_step"] for row in run["history"]] == list(range(1, 7)), said.getvalue()
    assert [row["_step"] for row in run["history"] if "test_accuracy" in row] == [3, 6]
    assert run["config"]["finetune"]["steps"] == 6
    assert run["summary"]["test_accuracy"] == pytest.approx(summary.test_accuracy)


def test_cli_log_takes_a_list(tmp_path, tracker_env):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--out", str(out), "--log", "tensorboard", "--log", "jsonl,wandb",
                                 "--steps", "3", *tiny_cli_args()])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["run"]["log"] == "tensorboard,jsonl,wandb"
    assert (out / "tb").is_dir() and list((out / "wandb").glob("offline-run-*"))


def test_only_rank_0_logs_on_two_processes(tmp_path, tracker_env):
    pytest.importorskip("wandb")
    import torch.distributed as td

    if not td.is_available() or not td.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from test_distributed import cli_args, torchrun
    from wandb_offline import finished_runs

    out = tmp_path / "run"
    # torchrun reads a --log after the script as its own --log-dir (argparse abbreviations): --set it
    code, output = torchrun([*cli_args("vision"), "--out", str(out), "--set", "run.log=wandb"], tmp_path / "logs")
    assert code == 0, output
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # one W&B run: rank 0's
    (run,) = finished_runs(out, json.loads((out / "trackers.json").read_text())["wandb"]["id"])
    assert [row["_step"] for row in run["history"]] == [r["step"] for r in read_metrics(out / "metrics.jsonl")]
