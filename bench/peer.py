"""d2v against a peer implementation at the peer's own data2vec config, in alternating runs on this machine.

The peer is birder (https://github.com/birder-project/birder), an optional, bench-only dependency that is never
required: give the Python interpreter of an environment that has it (--peer-python; birder pulls a CUDA torch, so
it usually lives in its own throwaway venv, see bench/RESULTS.md). Its config, from birder's data2vec training
script: 32 px RGB images, patch 4 (8 x 8 patches), ViT dim 192, depth 6, 3 heads, MLP 768, batch 64, targets the
mean of the top 3 layers, block masks of up to 60% of the patches, AdamW, EMA by lerp.

d2v runs as `d2v pretrain` on random 32 px RGB images (its figure includes data loading and masking); birder runs
its model's training step (forward, backward, AdamW, EMA) on random tensors and pre-made masks, without loading or
masking, as in the issue's first measurement. Each figure is samples/s over the steps after a warm-up.

--recipe v2 compares d2v's data2vec 2.0 with birder's data2vec2 on the same backbone and batch, with the values of
birder's train_data2vec2 script: 8 masked clones per image, inverse block masks (80% masked, blocks of 3 x 3
kept, ratio adjust 0.07), decoder of 6 grouped 3 x 3 convs (16 groups) of width 768, CLS loss weight 0.01, targets
the instance-normed, averaged end-of-block outputs of the top 3 layers (birder's 10 exceeds the depth of 6), then
layer norm. samples/s counts images, not clones, for both.

--device cuda compares the two on one GPU at ViT-B/16, 224 px (CONFIG_GPU, CONFIG_GPU_V2), bf16 autocast for both,
birder in this same interpreter by default (the GPU machine has torch and torchvision; birder itself is installed
with `pip install --no-deps birder==0.8.4`). BIRDER_IMPORT loads only birder's model and training-step modules: it
skips the package __init__ files (birder/__init__.py pulls webdataset, polars and the rest of birder's data stack;
birder/net/__init__.py imports every network), so torch and torchvision suffice. birder's ViT needs torchvision
(torchvision.ops.StochasticDepth): with only torch present nothing of birder's model path imports."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from d2v.core.errors import ConfigError

from .harness import RunFailed, run_pretrain, samples_per_s

CONFIG = {"image_size": 32, "in_chans": 3, "patch_size": 4, "dim": 192, "depth": 6, "heads": 3, "batch": 64,
          "top_k": 3, "mask_ratio": 0.6}
# data2vec 2.0 on the same backbone (birder's train_data2vec2 defaults; see the module docstring)
CONFIG_V2 = {**CONFIG, "mask_ratio": 0.8, "clones": 8, "block_size": 3, "mask_adjust": 0.07, "decoder_dim": 768,
             "decoder_layers": 6, "decoder_kernel": 3, "decoder_groups": 16, "cls_loss": 0.01}


# ViT-B/16 at 224 px on a GPU: d2v's base presets' backbone; top 6 layers for v1 (d2v's base preset), birder's
# data2vec2 default of 10 for v2; birder's data2vec2 masks and decoder as above; batches that keep a GPU busy
CONFIG_GPU = {"image_size": 224, "in_chans": 3, "patch_size": 16, "dim": 768, "depth": 12, "heads": 12, "batch": 128,
              "top_k": 6, "mask_ratio": 0.6}
CONFIG_GPU_V2 = {**CONFIG_V2, **{k: CONFIG_GPU[k] for k in ("image_size", "patch_size", "dim", "depth", "heads")},
                 "batch": 64, "top_k": 10}


def config(recipe: str, device: str = "cpu") -> dict:
    if device.startswith("cuda"):
        return CONFIG_GPU_V2 if recipe == "v2" else CONFIG_GPU
    return CONFIG_V2 if recipe == "v2" else CONFIG


def d2v_args(steps: int, data: Path, recipe: str = "v1", device: str = "cpu") -> list[str]:
    c = config(recipe, device)
    sets = {"model.patch_size": c["patch_size"], "model.dim": c["dim"], "model.depth": c["depth"],
            "model.num_heads": c["heads"], "targets.top_k": c["top_k"], "mask.ratio": c["mask_ratio"],
            "run.log_every": max(1, steps // 6), "run.checkpoint_minutes": 0}
    gpu = device.startswith("cuda")
    if gpu:  # the base preset's ViT-B/16 without what birder's step leaves out (drop-path, attention dropout, jitter)
        sets.update({"model.drop_path": 0.0, "model.attention_dropout": 0.0, "data.color_jitter": 0.0})
    if recipe == "v2":
        sets.update({"mask.clones": c["clones"], "mask.block_size": c["block_size"],
                     "mask.adjust": c["mask_adjust"], "decoder.dim": c["decoder_dim"],
                     "decoder.depth": c["decoder_layers"], "decoder.kernel": c["decoder_kernel"],
                     "decoder.groups": c["decoder_groups"], "targets.cls_loss": c["cls_loss"],
                     "targets.layer": "block"})
    args = ["--modality", "vision", "--data", str(data), "--steps", str(steps), "--batch-size", str(c["batch"])]
    if gpu:
        args += ["--preset", "base", "--device", device, "--precision", "bf16"]
    args += ["--recipe", recipe]  # always named: d2v pretrain's default recipe differs per modality
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def write_images(path: Path, n: int = 2048, seed: int = 0, size: int = CONFIG["image_size"]) -> Path:
    """n random size x size RGB images (uint8, N H W C) as .npy: d2v reads it as an image array."""
    import numpy as np

    rng = np.random.default_rng(seed)
    np.save(path, rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8))
    return path


# Imports birder's model and training-step modules only (see the module docstring). Used by BIRDER_STEP.
BIRDER_IMPORT = r"""
import importlib.util, os, sys, types
import torch
spec = importlib.util.find_spec("torchvision")
if spec is not None:  # a torchvision wheel built for another torch has ops this torch cannot load: declare them
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
    except (OSError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        for name, args in {"nms": "Tensor a, Tensor b, float c", "qnms": "Tensor a, Tensor b, float c",
                           "roi_align": "Tensor a, Tensor b, float c, SymInt d, SymInt e, int f, bool g",
                           "_roi_align_backward": "Tensor a, Tensor b, float c, SymInt d, SymInt e, SymInt f, SymInt g, SymInt h, SymInt i, int j, bool k",
                           "ps_roi_align": "Tensor a, Tensor b, float c, SymInt d, SymInt e, int f",
                           "_ps_roi_align_backward": "Tensor a, Tensor b, Tensor c, float d, SymInt e, SymInt f, int g, SymInt h, SymInt i, SymInt j, SymInt k",
                           "roi_pool": "Tensor a, Tensor b, float c, SymInt d, SymInt e",
                           "_roi_pool_backward": "Tensor a, Tensor b, Tensor c, float d, SymInt e, SymInt f, SymInt g, SymInt h, SymInt i, SymInt j",
                           "ps_roi_pool": "Tensor a, Tensor b, float c, SymInt d, SymInt e",
                           "_ps_roi_pool_backward": "Tensor a, Tensor b, Tensor c, float d, SymInt e, SymInt f, SymInt g, SymInt h, SymInt i, SymInt j",
                           "qroi_align": "Tensor a, Tensor b, float c, SymInt d, SymInt e, int f, bool g",
                           "deform_conv2d": "Tensor a, Tensor b, Tensor c, Tensor d, Tensor e, SymInt f, SymInt g, SymInt h, SymInt i, SymInt j, SymInt k, SymInt l, SymInt m, bool n",
                           "_deform_conv2d_backward": "Tensor a, Tensor b, Tensor c, Tensor d, Tensor e, Tensor f, SymInt g, SymInt h, SymInt i, SymInt j, SymInt k, SymInt l, SymInt m, SymInt n, bool o"}.items():
            outs = {"ps_roi_align": "(Tensor, Tensor)", "roi_pool": "(Tensor, Tensor)", "ps_roi_pool": "(Tensor, Tensor)",
                    "_deform_conv2d_backward": "(Tensor, Tensor, Tensor, Tensor, Tensor)"}.get(name, "Tensor")
            lib.define(f"{name}({args}) -> {outs}")
for pkg in ("birder", "birder.net", "birder.net.ssl"):  # their __init__ files import the data stack / every net
    found = importlib.util.find_spec(pkg)
    if found is None:
        raise SystemExit("birder is not installed (pip install --no-deps birder==0.8.4)")
    module = types.ModuleType(pkg)
    module.__path__, module.__spec__ = list(found.submodule_search_locations), found
    sys.modules[pkg] = module
import warnings
warnings.filterwarnings("ignore")
from birder.common.masking import BlockMasking, FixedSizeBlockMasking
from birder.net.ssl.data2vec import Data2Vec
from birder.net.ssl.data2vec2 import Data2Vec2
from birder.net.vit import ViT
"""

# Runs inside the peer's environment: prints one JSON line {"samples_per_s": ...}.
BIRDER_STEP = BIRDER_IMPORT + r"""
import json, time
steps, warmup, c = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
recipe = sys.argv[4] if len(sys.argv) > 4 else "v1"
device = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
torch.manual_seed(0)
size = (c["image_size"], c["image_size"])
vit = ViT(c["in_chans"], 0, size=size, config={"patch_size": c["patch_size"], "num_layers": c["depth"],
          "num_heads": c["heads"], "hidden_dim": c["dim"], "mlp_dim": 4 * c["dim"], "drop_path_rate": 0.0})
grid = c["image_size"] // c["patch_size"]
if recipe == "v2":
    net = Data2Vec2(vit, config={"average_top_k_layers": c["top_k"], "decoder_dim": c["decoder_dim"],
                                 "decoder_kernel_size": c["decoder_kernel"], "decoder_layers": c["decoder_layers"],
                                 "clone_batch": c["clones"], "cls_loss_weight": c["cls_loss"]}, size=size)
    masking = FixedSizeBlockMasking((grid, grid), mask_ratio=c["mask_ratio"], block_size=c["block_size"],
                                    mask_ratio_adjust=c["mask_adjust"], inverse_mask=True)
    n_masks = c["batch"] * c["clones"]  # one mask per clone, as birder's TrainTransform makes them
else:
    net = Data2Vec(vit, config={"normalize_targets": True, "average_top_k_layers": c["top_k"], "loss_beta": 2.0},
                   size=size)
    masking = BlockMasking((grid, grid), min_num_patches=16, max_num_patches=int(grid * grid * c["mask_ratio"]),
                           min_aspect=0.33, max_aspect=3.33)
    n_masks = c["batch"]
net = net.to(device)
net.ema_backbone.eval()
for p in net.ema_backbone.parameters():
    p.requires_grad_(False)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
x = torch.rand(c["batch"], c["in_chans"], *size, device=device)
masks = [masking(n_masks).to(device) for _ in range(4)]
bf16 = device.type == "cuda"  # as d2v's GPU runs: bf16 autocast over fp32 weights
net.train()
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
t0 = None
for i in range(warmup + steps):
    if i == warmup:
        sync()
        t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = net(x, masks[i % 4])
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        torch._foreach_lerp_(list(net.ema_backbone.parameters()), list(net.backbone.parameters()), weight=1e-3)
sync()
print(json.dumps({"samples_per_s": steps * c["batch"] / (time.perf_counter() - t0), "loss": float(loss)}))
"""


def birder_available(python: str) -> str:
    """'' when `python` can import birder's model and training-step modules (BIRDER_IMPORT), else why not."""
    proc = subprocess.run([python, "-c", "import importlib.util as u; import sys; "
                           "sys.exit(0 if u.find_spec('birder') else 3)"], capture_output=True, text=True)
    if proc.returncode == 3:
        return "birder is not installed there"
    if proc.returncode == 0:
        proc = subprocess.run([python, "-c", BIRDER_IMPORT], capture_output=True, text=True)
    return "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def run_birder(python: str, steps: int, warmup: int, env: dict, recipe: str = "v1", device: str = "cpu") -> float:
    proc = subprocess.run([python, "-c", BIRDER_STEP, str(steps), str(warmup), json.dumps(config(recipe, device)),
                           recipe, device], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RunFailed("the birder run failed: " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"]


def run(peer_python: str | None, steps: int = 30, repeats: int = 3, warmup: int = 1, recipe: str = "v1",
        on_row=None, device: str = "cpu") -> dict:
    """Alternate d2v and birder runs `repeats` times; medians and their ratio (d2v / birder). On a GPU
    (device cuda) birder runs in this interpreter unless `peer_python` names another."""
    gpu = device.startswith("cuda")
    peer_python = peer_python or (sys.executable if gpu else None)
    if peer_python and not (shutil.which(peer_python) or os.access(peer_python, os.X_OK)):
        raise ConfigError(f"--peer-python {peer_python}: no such Python interpreter (give the python of the "
                          "environment where birder is installed)")
    why = birder_available(peer_python) if peer_python else "no --peer-python given"
    if recipe not in ("v1", "v2"):
        raise ConfigError(f"--recipe must be v1 or v2, got {recipe!r}")
    env = dict(os.environ)
    rows = []
    c = config(recipe, device)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "images.npy", n=512 if gpu else 2048, size=c["image_size"])
        for rep in range(repeats):
            out = Path(tmp) / f"d2v-{rep}"
            run_pretrain(d2v_args(steps, data, recipe, device), out, env=env, what="the d2v run")
            rate, _ = samples_per_s(out, warmup)
            rows.append({"impl": "d2v", "repeat": rep, "samples_per_s": rate})
            if on_row:
                on_row(rows[-1])
            if not why:
                rows.append({"impl": "birder", "repeat": rep, "samples_per_s": run_birder(
                    peer_python, steps, max(2, steps // 6), env, recipe, device)})
                if on_row:
                    on_row(rows[-1])
    med = {impl: statistics.median(r["samples_per_s"] for r in rows if r["impl"] == impl)
           for impl in ("d2v", "birder") if any(r["impl"] == impl for r in rows)}
    ratio = med["d2v"] / med["birder"] if "birder" in med else None
    meta = {"config": c, "recipe": recipe, "device": device, "steps": steps, "repeats": repeats, "cpu_count": os.cpu_count(),
            "peer": "birder" if not why else None, "peer_missing": why or None, "date": time.strftime("%Y-%m-%d"),
            "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}}
    return {"meta": meta, "rows": rows, "median_samples_per_s": med, "ratio_d2v_over_birder": ratio}


if __name__ == "__main__":  # python -m d2v.bench.peer PEER_PYTHON
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
