"""Reads W&B offline runs back for the tests (wandb ships no reader of its run files).

A run file RUN/wandb/offline-run-<time>-<id>/run-<id>.wandb is a 7-byte header (b":W&B", 0xBEE1, version) and then
a LevelDB-style log: 32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first,
3 middle, 4 last) and its bytes; a block's last < 7 bytes are padding. A record is a serialized
wandb.proto.wandb_internal_pb2.Record; history, config and summary items carry their values as JSON."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")


def records(path: Path):
    """The serialized records of one run file, in order (a record cut short by a kill ends the file)."""
    data = Path(path).read_bytes()
    magic, ident, _ = FILE_HEADER.unpack_from(data)
    assert magic == b":W&B" and ident == 0xBEE1, f"{path} is not a W&B run file"
    pos, parts = FILE_HEADER.size, []
    while pos + CHUNK_HEADER.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER.size:
            pos += room
            continue
        _, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0:
            break
        body = data[pos + CHUNK_HEADER.size: pos + CHUNK_HEADER.size + length]
        pos += CHUNK_HEADER.size + length
        if len(body) < length:
            break
        parts.append(body)
        if kind in (1, 4):  # full, or the last chunk of a record
            yield b"".join(parts)
            parts = []
        elif kind == 2:  # first chunk: a new record
            parts = [body]


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_run(path: Path) -> dict:
    """{"id", "config", "history" (rows), "summary", "exit_code"} of one offline run file."""
    from wandb.proto import wandb_internal_pb2

    run = {"id": None, "config": {}, "history": [], "summary": {}, "exit_code": None}
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"].update(_items(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    run["config"] = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in run["config"].items()}
    return run


def run_files(run_dir: Path, run_id: str) -> list[Path]:
    """The files of one W&B run id under RUN/wandb, oldest first (each resume writes a new one)."""
    files = Path(run_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.parent.name))


def finished_runs(run_dir: Path, run_id: str, count: int = 1, timeout: float = 60.0) -> list[dict]:
    """read_run of the `count` files of a W&B run id once each holds its exit record. wandb-core writes a run file
    in its own process: run.finish() may return before the file of a second run in one process is complete."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        runs = [read_run(f) for f in run_files(run_dir, run_id)]
        if len(runs) >= count and all(r["exit_code"] is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)
