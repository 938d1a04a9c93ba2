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
layer norm. samples/s counts images, not clones, for both."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .pretrain import command, samples_per_s

CONFIG = {"image_size": 32, "in_chans": 3, "patch_size": 4, "dim": 192, "depth": 6, "heads": 3, "batch": 64,
          "top_k": 3, "mask_ratio": 0.6}
# data2vec 2.0 on the same backbone (birder's train_data2vec2 defaults; see the module docstring)
CONFIG_V2 = {**CONFIG, "mask_ratio": 0.8, "clones": 8, "block_size": 3, "mask_adjust": 0.07, "decoder_dim": 768,
             "decoder_layers": 6, "decoder_kernel": 3, "decoder_groups": 16, "cls_loss": 0.01}


def config(recipe: str) -> dict:
    return CONFIG_V2 if recipe == "v2" else CONFIG


def d2v_args(steps: int, data: Path, recipe: str = "v1") -> list[str]:
    c = config(recipe)
    sets = {"model.patch_size": c["patch_size"], "model.dim": c["dim"], "model.depth": c["depth"],
            "model.num_heads": c["heads"], "targets.top_k": c["top_k"], "mask.ratio": c["mask_ratio"],
            "run.log_every": max(1, steps // 6), "run.checkpoint_minutes": 0}
    if recipe == "v2":
        sets.update({"mask.clones": c["clones"], "mask.block_size": c["block_size"],
                     "mask.adjust": c["mask_adjust"], "decoder.dim": c["decoder_dim"],
                     "decoder.depth": c["decoder_layers"], "decoder.kernel": c["decoder_kernel"],
                     "decoder.groups": c["decoder_groups"], "targets.cls_loss": c["cls_loss"],
                     "targets.layer": "block"})
    args = ["--modality", "vision", "--data", str(data), "--steps", str(steps), "--batch-size", str(c["batch"])]
    if recipe == "v2":
        args += ["--recipe", "v2"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def write_images(path: Path, n: int = 2048, seed: int = 0) -> Path:
    """n random 32 x 32 RGB images (uint8, N H W C) as .npy: d2v reads it as an image array."""
    import numpy as np

    rng = np.random.default_rng(seed)
    np.save(path, rng.integers(0, 256, size=(n, CONFIG["image_size"], CONFIG["image_size"], 3), dtype=np.uint8))
    return path


# Runs inside the peer's environment: prints one JSON line {"samples_per_s": ...}.
BIRDER_STEP = r'''
import json, sys, time, importlib.util, os
import torch
steps, warmup, c = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
spec = importlib.util.find_spec("torchvision")
if spec is not None:  # a torchvision wheel built for CUDA torch has ops this CPU torch cannot load: declare them
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
    except (OSError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        T, I = "Tensor", "SymInt"
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
import warnings
warnings.filterwarnings("ignore")
from birder.common.masking import BlockMasking, FixedSizeBlockMasking
from birder.net.ssl.data2vec import Data2Vec
from birder.net.ssl.data2vec2 import Data2Vec2
from birder.net.vit import ViT

recipe = sys.argv[4] if len(sys.argv) > 4 else "v1"
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
net.ema_backbone.eval()
for p in net.ema_backbone.parameters():
    p.requires_grad_(False)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
x = torch.rand(c["batch"], c["in_chans"], *size)
masks = [masking(n_masks) for _ in range(4)]
net.train()
t0 = None
for i in range(warmup + steps):
    if i == warmup:
        t0 = time.perf_counter()
    loss = net(x, masks[i % 4])
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        torch._foreach_lerp_(list(net.ema_backbone.parameters()), list(net.backbone.parameters()), weight=1e-3)
print(json.dumps({"samples_per_s": steps * c["batch"] / (time.perf_counter() - t0), "loss": float(loss)}))
'''


def birder_available(python: str) -> str:
    """'' when `python` can import birder, else why not (one line)."""
    proc = subprocess.run([python, "-c", "import importlib.util as u; import sys; "
                           "sys.exit(0 if u.find_spec('birder') else 3)"], capture_output=True, text=True)
    if proc.returncode == 0:
        return ""
    return "birder is not installed there" if proc.returncode == 3 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def run_birder(python: str, steps: int, warmup: int, env: dict, recipe: str = "v1") -> float:
    proc = subprocess.run([python, "-c", BIRDER_STEP, str(steps), str(warmup), json.dumps(config(recipe)), recipe],
                          env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError("the birder run failed: " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"]


def run(peer_python: str | None, steps: int = 30, repeats: int = 3, warmup: int = 1, recipe: str = "v1",
        on_row=None) -> dict:
    """Alternate d2v and birder runs `repeats` times; medians and their ratio (d2v / birder)."""
    why = birder_available(peer_python) if peer_python else "no --peer-python given"
    if recipe not in ("v1", "v2"):
        raise ValueError(f"recipe must be v1 or v2, got {recipe!r}")
    env = dict(os.environ)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "images32.npy")
        for rep in range(repeats):
            out = Path(tmp) / f"d2v-{rep}"
            args = [*d2v_args(steps, data, recipe), "--out", str(out), "--no-progress"]
            proc = subprocess.run(command(1, args), env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise RuntimeError("the d2v run failed: " + " | ".join(tail))
            rate, _ = samples_per_s(out / "metrics.jsonl", warmup)
            rows.append({"impl": "d2v", "repeat": rep, "samples_per_s": rate})
            if on_row:
                on_row(rows[-1])
            if not why:
                rows.append({"impl": "birder", "repeat": rep,
                             "samples_per_s": run_birder(peer_python, steps, max(2, steps // 6), env, recipe)})
                if on_row:
                    on_row(rows[-1])
    med = {impl: statistics.median(r["samples_per_s"] for r in rows if r["impl"] == impl)
           for impl in ("d2v", "birder") if any(r["impl"] == impl for r in rows)}
    ratio = med["d2v"] / med["birder"] if "birder" in med else None
    meta = {"config": config(recipe), "recipe": recipe, "steps": steps, "repeats": repeats, "cpu_count": os.cpu_count(),
            "peer": "birder" if not why else None, "peer_missing": why or None, "date": time.strftime("%Y-%m-%d"),
            "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}}
    return {"meta": meta, "rows": rows, "median_samples_per_s": med, "ratio_d2v_over_birder": ratio}


if __name__ == "__main__":  # python -m d2v.bench.peer PEER_PYTHON
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
