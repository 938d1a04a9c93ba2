"""Supervised fine-tuning of a pretrained encoder for classification: the encoder's mean-pooled last layer
(`embed`) -> a linear head, AdamW with layer-wise learning-rate decay, warm-up + cosine, label smoothing, and for
images random resized crops. Every modality; the labelled sets are the probe's.

Training runs in two phases (LP-FT, Kumar et al. 2022; data2vec's speech fine-tuning likewise trains only the head
for its first updates): `head_epochs` passes train the head alone on the frozen encoder's embeddings of the
un-augmented training split (computed once, in eval mode: a linear probe), then `epochs` passes fine-tune
everything. Each phase has its own warm-up + cosine schedule; one step counter runs through both. Starting the
encoder's updates from a trained head keeps the large early gradients of a random head from distorting the
pretrained features, which on small labelled sets otherwise leaves fine-tuning below the probe.

A fine-tuning run directory follows pretrain's conventions: config.json, metrics.jsonl, checkpoints/ (with
manifests, written atomically), a lock, Ctrl-C / SIGTERM save and exit 130 / 143, --resume continues exactly.
Its checkpoints hold the encoder as `student.*` (and the head as `head.*`), so `d2v export checkpoint` turns a
fine-tuned run into an encoder directory like any other."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from d2v import checkpoint as ckpt
from d2v import rundir
from d2v.errors import CheckpointError, ConfigError, DataError


# Fine-tuning rates per modality. The post-LN speech and text encoders (wav2vec 2.0 / RoBERTa layout) are
# fine-tuned far more gently than the pre-LN ViT in data2vec's recipes (speech 3e-5..5e-5, text 1e-5..2e-5, images
# 4e-3 at batch 1024). Measured here: after the head-only phase (87.5% test), the warm-up towards 3e-3 took the
# speech loss from 0.79 to 3.24, above chance, within three updates (lr 8e-4; bench/RESULTS.md).
DEFAULT_LR = {"vision": 3e-3, "speech": 1e-4, "text": 1e-4}


@dataclass
class FinetuneConfig:
    encoder: str = ""  # a d2v export or run, or a transformers Data2Vec*Model directory
    data: str = "digits"  # a labelled set, as `d2v probe --data` takes it
    holdout: str = ""  # speech: comma-separated globs of the files to test on
    epochs: float = 60.0  # passes that fine-tune everything
    steps: int = 0  # fine-tuning updates; 0: epochs x (train items / batch size)
    head_epochs: float = 50.0  # passes that first train the head alone on the frozen encoder's embeddings
    batch_size: int = 64
    lr: float = 0.0  # peak lr of fine-tuning (top block and head); 0: the modality's (DEFAULT_LR)
    head_lr: float = 1e-2  # peak lr of the head-only phase (a linear model on standardized features)
    layer_decay: float = 0.9  # lr scale per block below the top (BEiT / data2vec ViT-B use 0.65 over 12 blocks)
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1  # of each phase
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.6, 1.0)  # images: random resized crop area; (1, 1): none
    eval_every: int = 0  # updates between test evaluations (0: five per run); always at the end
    seed: int = 0
    random_init: bool = False  # the same architecture untrained: the baseline fine-tuning must beat
    device: str = "auto"
    keep_checkpoints: int = 2


class Classifier(nn.Module):
    """encoder.embed(inputs) (B, D) -> standardize -> Linear -> logits (B, classes).

    The standardization is fixed: the mean and std of the training split's embeddings under the encoder as
    fine-tuning starts (the probe's StandardScaler), so the head sees unit-scale features whatever the encoder's
    output scale; it is saved with the head (0 and 1 in runs from before it existed: no change)."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.student = encoder
        self.head = nn.Linear(encoder.dim, classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("feature_mean", torch.zeros(encoder.dim))
        self.register_buffer("feature_std", torch.ones(encoder.dim))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings -> (B, classes) logits."""
        return self.head((features - self.feature_mean) / self.feature_std)

    def forward(self, inputs: tuple) -> torch.Tensor:
        return self.classify(self.student.embed(*inputs))


def _layer_id(name: str, depth: int, norm_on_top: bool = True) -> int:
    """0 for everything before the first block, i + 1 for block i, depth + 1 for what follows (the head, and the
    encoder's `norm` when it follows the blocks, as in the pre-LN v1 ViT; speech and v2 images norm before them)."""
    if name.startswith("student.blocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith("head.") or (norm_on_top and name.startswith("student.norm.")):
        return depth + 1
    return 0


def param_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups: lr x layer_decay^(depth + 1 - layer), no weight decay on biases, norms and 1-D tensors."""
    depth = len(model.student.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        layer = _layer_id(name, depth, getattr(model.student, "norm_on_top", False))
        decay = not (p.ndim <= 1 or name.endswith(".bias") or "token" in name or name.endswith("mask_emb"))
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                                   "lr_scale": cfg.layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def phase_steps(cfg: FinetuneConfig, n_train: int) -> tuple[int, int]:
    """(head-only updates, fine-tuning updates) for a training split of `n_train` items."""
    per_epoch = n_train / cfg.batch_size
    return int(round(cfg.head_epochs * per_epoch)), cfg.steps or max(1, int(round(cfg.epochs * per_epoch)))


def lr_at(cfg: FinetuneConfig, step: int, total: int, frozen: int = 0) -> float:
    """Warm-up + cosine over the phase that `step` is in: the `frozen` head-only updates (peak `cfg.head_lr`), then
    the rest of the `total` (peak `cfg.lr`)."""
    if step < frozen:
        total, peak = frozen, cfg.head_lr
    else:
        step, total, peak = step - frozen, total - frozen, cfg.lr
    warmup = int(round(cfg.warmup_fraction * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def validate(cfg: FinetuneConfig) -> None:
    checks = [
        (cfg.epochs > 0 and math.isfinite(cfg.epochs), "--epochs must be a positive number"),
        (0 <= cfg.steps <= 10**9, "--steps must be 0 (from --epochs) or a positive integer"),
        (1 <= cfg.batch_size <= 1 << 16, "--batch-size must be from 1 to 65536"),
        (math.isfinite(cfg.lr) and 0 <= cfg.lr <= 10, "--lr must be a positive number of at most 10 (0: the "
         "modality's default)"),
        (math.isfinite(cfg.head_lr) and 0 < cfg.head_lr <= 10, "--head-lr must be a positive number of at most 10"),
        (math.isfinite(cfg.layer_decay) and 0 < cfg.layer_decay <= 1, "--layer-decay must be in (0, 1]"),
        (math.isfinite(cfg.weight_decay) and 0 <= cfg.weight_decay <= 10, "--weight-decay must be from 0 to 10"),
        (math.isfinite(cfg.warmup_fraction) and 0 <= cfg.warmup_fraction < 1, "--warmup-fraction must be in [0, 1)"),
        (math.isfinite(cfg.head_epochs) and 0 <= cfg.head_epochs <= 10**4, "--head-epochs must be from 0 to 10000"),
        (math.isfinite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1,
         "crop scale must be two area fractions 0 < min <= max <= 1"),
        (cfg.eval_every >= 0, "--eval-every must be at least 0"),
        (0 <= cfg.seed < 2**32, "--seed must be from 0 to 2^32 - 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _build(cfg: FinetuneConfig):
    """(classifier, train split, test split) for the config."""
    from d2v.export import _attach_tokenizer, _build as build_encoder, read_encoder
    from d2v.probe import load_labelled

    model_cfg, tensors = read_encoder(cfg.encoder)
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(model_cfg)
    if not cfg.random_init:
        try:
            encoder.load_state_dict(tensors)
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {cfg.encoder} do not match its config: {str(exc).splitlines()[0]}") from None
    encoder = _attach_tokenizer(encoder, Path(cfg.encoder))
    holdout = [p for p in cfg.holdout.split(",") if p]
    train, test = load_labelled(cfg.data, encoder, "train", holdout), load_labelled(cfg.data, encoder, "test", holdout)
    if train.labels is None or len(np.unique(train.labels.numpy())) < 2:
        raise DataError(f"{cfg.data} needs labels with at least two classes in its training split to fine-tune")
    if len(test) == 0:
        raise DataError(f"{cfg.data} has no test split to score the fine-tuned model on")
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    return Classifier(encoder, classes), train, test


def _inputs(dataset, idx: torch.Tensor, device) -> tuple:
    x = dataset.get_batch(idx)
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else (x.to(device),)


@torch.no_grad()
def accuracy(model: Classifier, dataset, device, batch_size: int = 256) -> float:
    was = model.training
    model.eval()
    correct = 0
    batch_size = min(batch_size, getattr(dataset, "max_batch", batch_size))
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        correct += int((model(_inputs(dataset, idx, device)).argmax(1).cpu() == dataset.labels[idx]).sum())
    model.train(was)
    return correct / len(dataset)


def _train_inputs(cfg: FinetuneConfig, train, idx: torch.Tensor, step: int, crop: bool, device) -> tuple:
    """The encoder inputs of training batch `idx` at `step`: images randomly cropped when `crop`."""
    from d2v.data.pipeline import random_resized_crop

    if crop and hasattr(train, "train_batch"):  # image files: crop the original, then resize
        rngs = [np.random.default_rng([cfg.seed, 11, step, i]) for i in range(len(idx))]
        return (train.train_batch(idx, tuple(cfg.crop_scale), False, rngs).to(device).float() / 255.0,)
    inputs = _inputs(train, idx, device)
    if crop:  # arrays: they are held at the encoder's size
        from d2v.models.vision import as_unit_images

        rng = np.random.default_rng([cfg.seed, 11, step])
        inputs = (random_resized_crop(as_unit_images(inputs[0]), cfg.crop_scale, False, rng),)
    return inputs


def _order(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Training items at sample positions start .. start + count - 1: one fresh permutation per epoch."""
    pos = np.arange(start, start + count)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(pos // n):
        sel = pos // n == epoch
        out[sel] = np.random.default_rng([seed, 7, int(epoch)]).permutation(n)[pos[sel] % n]
    return torch.from_numpy(out)


@dataclass
class FinetuneSummary:
    run_dir: Path
    steps: int
    test_accuracy: float
    train_accuracy: float
    wall_s: float
    signal: int
    complete: bool = False


def finetune(cfg: FinetuneConfig, out: Path, resume: bool = False, console=None, progress: bool = True):
    """Fine-tune per `cfg` into the run directory `out` (with resume: its saved config, continued exactly)."""
    from rich.console import Console
    from rich.markup import escape

    from d2v.train import resolve_device

    console = console or Console()
    say = lambda msg: console.print(escape(msg), highlight=False, soft_wrap=True)  # noqa: E731
    out = Path(out).expanduser()
    if resume:
        cfg = load_config(out)
    validate(cfg)
    device = resolve_device(cfg.device)
    model, train, test = _build(cfg)
    model = model.to(device)
    if not cfg.lr:  # resolved before config.json is written, so a resumed run keeps it
        cfg = dataclasses.replace(cfg, lr=DEFAULT_LR[model.student.cfg.modality])
    from d2v.train import _open_run

    lock, fresh = _open_run(cfg, out, resume, say)  # pretrain's rules: locked, partial saves removed, no overwrite
    try:
        return _loop(cfg, model, train, test, device, out, not fresh, say, console, progress)
    finally:
        lock.release()


def load_config(run_dir: Path) -> FinetuneConfig:
    from d2v.config import from_dict

    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"there is no fine-tuning run to resume in {run_dir}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("finetune"), dict):
        raise CheckpointError(f"{run_dir} is not a fine-tuning run directory")
    saved["finetune"].setdefault("head_epochs", 0.0)  # runs started before the head-only phase existed
    saved["finetune"].setdefault("head_lr", 1e-2)
    return from_dict(FinetuneConfig, saved["finetune"], "finetune.")


def _run_config(cfg: FinetuneConfig, model: Classifier) -> dict:
    """config.json: the fine-tuning settings, plus the encoder's model config where export looks for it."""
    return {"modality": model.student.cfg.modality, "kind": "finetune", "model": dataclasses.asdict(model.student.cfg),
            "run": {}, "finetune": dataclasses.asdict(cfg)}


def _loop(cfg, model, train, test, device, out: Path, restore: bool, say, console, progress) -> FinetuneSummary:
    import signal as signals

    from d2v.train import _finite, _progress, _StopFlag

    t0 = time.perf_counter()
    B = cfg.batch_size
    frozen, tuned = phase_steps(cfg, len(train))
    total = frozen + tuned
    eval_every = cfg.eval_every or max(1, total // 5)
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    step = 0
    if restore:
        path, weights, opt_tensors, state = ckpt.read_latest(out)
        for name in ("feature_mean", "feature_std"):  # runs from before the standardization: identity
            weights.setdefault(name, getattr(model, name))
        try:
            model.load_state_dict(weights)
            ckpt.load_optimizer_state(optimizer, opt_tensors, state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this fine-tuning run: {exc}") from None
        step = int(state["step"])
        if step >= total:
            acc = accuracy(model, test, device)
            say(f"{out} is complete: it ran all {total} steps; test accuracy {acc:.4f}.")
            return FinetuneSummary(out, step, acc, float("nan"), time.perf_counter() - t0, 0, complete=True)
        say(f"Resuming {out} at step {step}")
    else:
        ckpt.atomic_write_json(out / "config.json", _run_config(cfg, model))
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        keep = [r for r in rundir.read_metrics(metrics_path) if r["step"] <= step]
        ckpt.atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in keep).encode())
    crop = model.student.cfg.modality == "vision" and tuple(cfg.crop_scale) != (1.0, 1.0)
    model.train()
    frozen_features = None
    if not restore or step < frozen:  # the frozen encoder's embeddings of the un-augmented split, computed once
        from d2v.probe import features as embed_all

        model.student.eval()
        embedded = embed_all(model.student, train, device=device)  # (N, D) float64
        if not restore:
            model.feature_mean.copy_(torch.from_numpy(embedded.mean(0)))
            model.feature_std.copy_(torch.from_numpy(embedded.std(0)).clamp_min(1e-6))
        frozen_features = torch.from_numpy(embedded).float().to(device)
    test_acc, train_correct, train_seen = float("nan"), 0, 0

    def save():
        if not _finite(model):
            raise CheckpointError(f"fine-tuning diverged by step {step}: the weights are not finite; lower --lr")
        return ckpt.save_checkpoint(out, step, model, optimizer, {"kind": "finetune"}, keep=cfg.keep_checkpoints)

    with _StopFlag() as stop, _progress(console, progress, total, step) as bar, open(metrics_path, "a") as metrics:
        while step < total:
            lr = lr_at(cfg, step, total, frozen)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout / drop-path: reproducible per step
            idx = _order(len(train), cfg.seed, step * B, min(B, len(train)))
            labels = train.labels[idx].to(device)
            if step < frozen:  # the head alone, on the frozen encoder's embeddings: no encoder gradients or updates
                logits = model.classify(frozen_features[idx.to(device)])
            else:
                frozen_features = None
                model.student.train()
                logits = model(_train_inputs(cfg, train, idx, step, crop, device))
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            step += 1
            train_correct += int((logits.argmax(1) == labels).sum())
            train_seen += len(idx)
            record = {"step": step, "loss": float(loss.detach()), "lr": lr}
            if step % eval_every == 0 or step == total:
                test_acc = accuracy(model, test, device)
                record.update(test_accuracy=test_acc, train_accuracy=train_correct / max(train_seen, 1))
                train_correct = train_seen = 0
                bar.note(f"step {step}: test accuracy {test_acc:.4f}")
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if not math.isfinite(record["loss"]):
                raise CheckpointError(f"fine-tuning diverged: the loss became {record['loss']} at step {step}; "
                                      "lower --lr")
            bar.update(step, loss=record["loss"], lr=lr)
            if stop.set:
                say(f"Interrupted ({signals.Signals(stop.signum).name}): saving a checkpoint at step {step}.")
                break
    save()
    if step == total and not math.isfinite(test_acc):
        test_acc = accuracy(model, test, device)
    last_train = [r["train_accuracy"] for r in rundir.read_metrics(metrics_path) if "train_accuracy" in r]
    return FinetuneSummary(out, step, test_acc, last_train[-1] if last_train else float("nan"),
                           time.perf_counter() - t0, stop.signum)
