"""Issue 28's GPU measurements at the sizes users train, as steps of bench/gpu_session.sh (GPU_PLAN=scale): each
step appends JSON rows ({"kind": ..., ...}) to one JSONL file as soon as each figure is measured, so that a step cut
off by the session's deadline keeps what it had.

    python -m d2v.bench.scale steps|fit|sdpa|peer|data --jsonl OUT/scale.jsonl [--dry] [--work DIR]

steps: samples/s, MFU and peak memory of the training step (bench/step.py) for ViT-B/16 v1 and v2, ViT-L/16 v2,
speech base v2 (15 s crops) and text base v2 (512 tokens) in bf16, then ViT-B v1 with each switch flipped (fp32,
fused AdamW off, torch.compile on, activation checkpointing on). fit: the largest ViT-L v2 micro-batch without and
with activation checkpointing. sdpa: which attention kernel each encoder runs. peer: d2v against birder (v1, v2) at
ViT-B/16. data: a generated folder of JPEGs through `d2v bench data` (loader samples/s), the same through `d2v
pretrain` (training samples/s with that loader), and torchvision's GPU JPEG decoder on the same files.

--dry runs every step on tiny shapes on the CPU (the tests do), so that a GPU session only has to run it."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

# (label, modality, recipe, preset, micro-batch, --set overrides); the first five are the table
STEP_PLAN = [
    ("vit-b16-v1", "vision", "v1", "base", 128, {}),
    ("vit-b16-v2", "vision", "v2", "base", 64, {}),
    ("vit-l16-v2", "vision", "v2", "large", 32, {}),
    ("speech-base-v2-15s", "speech", "v2", "base", 16, {"data.crop_seconds": 15.0, "model.layerdrop": 0.0}),
    ("text-base-v2-512", "text", "v2", "base", 32, {"model.vocab_size": 50_000}),
    ("vit-b16-v1-fp32", "vision", "v1", "base", 128, {"run.precision": "fp32"}),
    ("vit-b16-v1-unfused-adamw", "vision", "v1", "base", 128, {"run.fused_adamw": "off"}),
    ("vit-b16-v1-compile", "vision", "v1", "base", 128, {"run.compile": "on"}),
    ("vit-b16-v1-checkpointing", "vision", "v1", "base", 128, {"run.activation_checkpointing": "all"}),
    ("vit-b16-v2-compile", "vision", "v2", "base", 64, {"run.compile": "on"}),
]
# what --dry shrinks every planned config to (the CPU presets' sizes, tiny batches)
DRY = {"preset": "tiny", "batch": 4, "device": "cpu", "steps": 2, "warmup": 1}


def emit(path: Path, row: dict) -> None:
    """Append one JSON row (with the time) to the JSONL file at once."""
    row = {**row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "flops_parts"}), flush=True)


def failed(path: Path, kind: str, label: str, exc: BaseException) -> None:
    emit(path, {"kind": kind, "label": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    traceback.print_exc()


def _dry_sets(modality: str, sets: dict) -> dict:
    """A planned config's overrides that still make sense at tiny shapes."""
    keep = {k: v for k, v in sets.items() if k.startswith("run.")}
    if modality == "speech":
        keep["data.crop_seconds"] = 1.0
    return keep


def steps(out: Path, dry: bool) -> None:
    from .step import config, measure

    for label, modality, recipe, preset, batch, sets in STEP_PLAN:
        if dry and sets.get("run.compile") == "on":
            continue  # compiling takes minutes on a CPU
        try:
            cfg = config(modality, DRY["preset"] if dry else preset, recipe, DRY["batch"] if dry else batch,
                         DRY["device"] if dry else "cuda", None if dry else "bf16",
                         _dry_sets(modality, sets) if dry else sets)
            n, warm = (DRY["steps"], DRY["warmup"]) if dry else (10, 8 if sets.get("run.compile") == "on" else 3)
            emit(out, {"kind": "step", "label": label, **measure(cfg, n, warm)})
        except Exception as exc:  # noqa: BLE001 - an out-of-memory config must not stop the rest
            failed(out, "step", label, exc)
        _free()


def fit(out: Path, dry: bool) -> None:
    from .step import config, largest_batch

    for setting in ("off", "all"):
        label = f"vit-l16-v2-checkpointing-{setting}"
        try:
            cfg = config("vision", DRY["preset"] if dry else "large", "v2", 8, DRY["device"] if dry else "cuda",
                         None if dry else "bf16", {"run.activation_checkpointing": setting})
            if dry:  # the search's logic on a pretend device of 3x the tiny batch-16 footprint
                from .step import trainer, update_peak

                t = trainer(cfg)
                result = largest_batch(cfg, (2, 4), limit_bytes=3 * 2**30, max_tries=2,
                                       attempt=lambda n: update_peak(t, cfg, min(n, 8)))
            else:
                result = largest_batch(cfg, (8, 16), max_tries=4)
            emit(out, {"kind": "fit", "label": label, **result})
        except Exception as exc:  # noqa: BLE001
            failed(out, "fit", label, exc)
        _free()


def sdpa(out: Path, dry: bool) -> None:
    from .sdpa import run

    for precision in (("fp32",) if dry else ("bf16", "fp32")):
        for row in run("cpu" if dry else "cuda", precision, "tiny" if dry else "base", 1.0 if dry else 15.0):
            emit(out, {"kind": "sdpa", **row})


def peer(out: Path, dry: bool) -> None:
    from .peer import run

    for recipe in (("v1",) if dry else ("v1", "v2")):  # (v2 at birder's CPU config takes minutes on a CPU)
        try:
            result = run(None, steps=2 if dry else 30, repeats=1 if dry else 2, recipe=recipe,
                         device="cpu" if dry else "cuda", warmup=1 if dry else 2)
            emit(out, {"kind": "peer", "label": f"vit-b16-{recipe}", **result})
        except Exception as exc:  # noqa: BLE001
            failed(out, "peer", recipe, exc)


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """n JPEGs of smooth random content (quality 90) in `folder`, sized about as ImageNet's photos (w x h)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        coarse = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        img.save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def data(out: Path, dry: bool, work: Path) -> None:
    """Loader samples/s of a JPEG folder beside the training samples/s that loader feeds, and GPU JPEG decoding."""
    from .data import run as loader_run
    from .harness import run_pretrain, samples_per_s

    n, size, batch = (48, (80, 64), 8) if dry else (2048, (500, 375), 128)
    folder = write_jpegs(work / "jpegs", n, size)
    device = "cpu" if dry else "cuda"
    for workers in ((-1,) if dry else (-1, (os.cpu_count() or 2) - 1)):  # automatic, then every spare core
        try:
            row = loader_run("vision", str(folder), "tiny" if dry else "base", 4 if dry else 40, batch, workers,
                             32 if dry else 224, 0, device)
            emit(out, {"kind": "loader", "label": f"jpeg-folder-workers-{row['num_workers']}", **row})
        except Exception as exc:  # noqa: BLE001
            failed(out, "loader", f"jpeg-folder-workers-{workers}", exc)
    args = ["--data", str(folder), "--preset", "tiny" if dry else "base", "--steps", "4" if dry else "60",
            "--batch-size", str(batch), "--device", device, "--set", "run.log_every=1" if dry else "run.log_every=5",
            "--set", "run.checkpoint_minutes=0"] + (["--image-size", "32"] if dry else ["--precision", "bf16"])
    try:
        run_pretrain(args, work / "pretrain-jpegs", what="d2v pretrain on the JPEG folder")
        rate, used = samples_per_s(work / "pretrain-jpegs", 1 if dry else 3)
        emit(out, {"kind": "train-from-jpegs", "label": "vit-b16-v1", "samples_per_s": rate, "windows": used})
    except Exception as exc:  # noqa: BLE001
        failed(out, "train-from-jpegs", "vit-b16-v1", exc)
    emit(out, {"kind": "gpu-decode", "label": "torchvision.io.decode_jpeg", **gpu_decode(folder, device, batch)})


def gpu_decode(folder: Path, device: str, batch: int, rounds: int = 5) -> dict:
    """Images/s of torchvision's batched JPEG decode on `device` (nvJPEG on a GPU) plus a 224 px resize, over the
    folder's files read into memory once; {"skipped": why} without torchvision."""
    try:
        import torch
        import torch.nn.functional as F
        from torchvision.io import decode_jpeg, read_file
    except Exception as exc:  # noqa: BLE001 - any import failure means the measurement cannot run here
        return {"skipped": f"torchvision unavailable: {exc}"}
    files = sorted(folder.glob("*.jpg"))
    data = [read_file(str(p)) for p in files]
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def one_round():
        for i in range(0, len(data), batch):
            imgs = decode_jpeg(data[i:i + batch], device=dev)
            for img in imgs:  # sizes differ: each resized to the crop the model takes
                F.interpolate(img[None].float(), size=(224, 224), mode="bilinear", antialias=False)

    one_round()
    sync()
    t0 = time.perf_counter()
    for _ in range(rounds):
        one_round()
    sync()
    return {"images_per_s": rounds * len(data) / (time.perf_counter() - t0), "images": len(data), "device": device}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m d2v.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("steps", "fit", "sdpa", "peer", "data"))
    p.add_argument("--jsonl", type=Path, required=True)
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "d2v-scale")
    a = p.parse_args(argv)
    a.jsonl.parent.mkdir(parents=True, exist_ok=True)
    emit(a.jsonl, {"kind": "meta", "step": a.what, "dry": a.dry, "argv": sys.argv, **_env()})
    if a.what == "data":
        data(a.jsonl, a.dry, a.work)
    else:
        {"steps": steps, "fit": fit, "sdpa": sdpa, "peer": peer}[a.what](a.jsonl, a.dry)
    return 0


def _env() -> dict:
    import torch

    gpu = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if gpu
            else "cpu", "cpus": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
