"""The same weights bit for bit: a short fp32 pretraining run per modality and recipe, through the real CLI, against
the sha256 of its weights recorded before the redesign (tests/data/weight_hashes.json). A refactoring that moves code
must leave these unchanged; a change that means to alter training records the new hashes in the same commit and
says why.

Bits depend on the CPU code paths and the thread count, so the runs pin both: one thread, and AVX2 kernels in
PyTorch's own code, MKL and oneDNN (any x86-64 CPU with AVX2 then computes the same bits)."""
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RECORDED = json.loads((Path(__file__).parent / "data" / "weight_hashes.json").read_text())["sha256"]
BATCH = {"vision-v1": 16, "vision-v2": 8, "speech-v1": 4, "speech-v2": 2, "text-v1": 8, "text-v2": 4}
PINNED = {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def weights_sha256(checkpoint: Path) -> str:
    """sha256 over every tensor of a checkpoint's weights: name, dtype, shape and bytes, in name order."""
    tensors = load_file(str(checkpoint / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _avx2() -> bool:
    try:
        return platform.machine() in ("x86_64", "AMD64") and " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _avx2(), reason="the recorded bits are those of x86-64 AVX2 code paths")
@pytest.mark.parametrize("name", sorted(BATCH))
def test_weights_match_the_recorded_sha256(name, tmp_path):
    modality, recipe = name.split("-")
    out = tmp_path / "run"
    env = {**os.environ, **PINNED, "D2V_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "d2v", "pretrain", "--modality", modality, "--recipe", recipe, "--steps", "3",
           "--seed", "0", "--precision", "fp32", "--kernels", "torch", "--device", "cpu", "--batch-size",
           str(BATCH[name]), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoint = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert weights_sha256(checkpoint) == RECORDED[name]
