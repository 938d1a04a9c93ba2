"""Supervised fine-tuning of a pretrained encoder for classification: the encoder's pooled last layer -> a head
(d2v.encoders.classifier: data2vec's head per modality, which transformers' classification models share), AdamW
with layer-wise learning-rate decay, warm-up + cosine, label smoothing, and for images random resized crops. Every
modality; the labelled sets are the probe's.

Training runs in two phases (LP-FT, Kumar et al. 2022; data2vec's speech fine-tuning likewise trains only the head
for its first updates): `head_epochs` passes train the head alone on the frozen encoder's embeddings of the
un-augmented training split (computed once, in eval mode: a linear probe), then `epochs` passes fine-tune
everything. Each phase has its own warm-up + cosine schedule; one step counter runs through both. Starting the
encoder's updates from a trained head keeps the large early gradients of a random head from distorting the
pretrained features, which on small labelled sets otherwise leaves fine-tuning below the probe.

A fine-tuning run directory follows pretrain's conventions: config.json, metrics.jsonl, checkpoints/ (with
manifests, written atomically), a lock, Ctrl-C / SIGTERM save and exit 130 / 143, --resume continues exactly.
Its checkpoints hold the encoder as `student.*` and the head beside it, and config.json names the labels, so
`d2v export checkpoint` turns a fine-tuned run into an encoder directory with its classifier (and a transformers
Data2Vec...For...Classification directory), which `d2v predict` runs."""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from d2v.core.config import OptimConfig, from_dict
from d2v.core.device import resolve_device
from d2v.core.errors import CheckpointError, ConfigError, DataError, check_count
from d2v.core.files import atomic_write_bytes, atomic_write_json
from d2v.data.augment import random_resized_crop
from d2v.data.labelled import load_labelled, skipped_files
from d2v.data.sampling import SampleOrder, split_indices
from d2v.data.sources import skipped_summary, write_skipped_files
from d2v.encoders.classifier import HEADS, Classifier
from d2v.encoders.features import features
from d2v.encoders.load import encoder_from
from d2v.models.vision import as_unit_images
from d2v.runtime import checkpoint as ckpt
from d2v.runtime.checkpointer import finite
from d2v.runtime.distributed import StopSignals
from d2v.runtime.metrics import METRICS, MetricsLog, last_logged
from d2v.runtime.trackers import check_installed, parse_log
from d2v.runtime.params import param_groups as runtime_param_groups
from d2v.runtime.progress import progress_bar
from d2v.runtime.rundir import open_run
from d2v.runtime.schedule import lr_at as schedule_lr
from d2v.runtime.schedule import set_lr

# Fine-tuning rates per modality. The post-LN speech and text encoders (wav2vec 2.0 / RoBERTa layout) are
# fine-tuned far more gently than the pre-LN ViT in data2vec's recipes (speech 3e-5..5e-5, text 1e-5..2e-5, images
# 4e-3 at batch 1024). Measured here: after the head-only phase (87.5% test), the warm-up towards 3e-3 took the
# speech loss from 0.79 to 3.24, above chance, within three updates (lr 8e-4; bench/RESULTS.md).
DEFAULT_LR = {"vision": 3e-3, "speech": 1e-4, "text": 1e-4}
# A fine-tune of fewer updates than this is a gentler one: its peak lr is scaled by updates / FULL_STRENGTH_STEPS.
# AdamW moves every weight by about the lr per update however short the run, and a short run has no time to recover:
# issue 25 saw 60 updates at 3e-3 end at 0.3618 after a 0.6586 head-only phase. At 6e-4 (this scaling), on the
# README's digits encoder: head-only 0.6122 / 0.6197, final 0.6679 / 0.6364 (seeds 0 / 1); 300 updates keep the
# full 3e-3 and end at 0.8163 (bench/RESULTS.md, "Short fine-tunes").
FULL_STRENGTH_STEPS = 300
# Random resized crops pay off only in long runs: the head-only phase fits un-cropped embeddings, and a short run
# ends before it learns the crops. Below this many fine-tuning updates images are not cropped (the 60-epoch default,
# 1179 updates on digits, keeps them).
CROP_MIN_STEPS = 1000
WARMUP_START = 0.01  # the full phase's warm-up starts at this fraction of its peak lr


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
    eval_every: int = 0  # updates between evaluations (0: five per run); always at the end of each phase
    val_fraction: float = 0.1  # of the training split, held out to choose the exported model (0: the last one)
    seed: int = 0
    skip_bad_files: bool = False  # unreadable files left out (listed in RUN/skipped_files.tsv) instead of stopping
    random_init: bool = False  # the same architecture untrained: the baseline fine-tuning must beat
    # "data2vec": each modality's data2vec fine-tuning head, as transformers' Data2Vec...For...Classification
    # computes it (an export loads there with the same logits); "mean": encoder.embed -> Linear (runs made before
    # "data2vec" existed). d2v.encoders.classifier says what each pools.
    head: str = "data2vec"
    device: str = "auto"
    keep_checkpoints: int = 2
    log: str = ""  # experiment trackers beside metrics.jsonl, as pretrain's --log (d2v.runtime.trackers)


def _layer_id(name: str, depth: int, norm_on_top: bool = True) -> int:
    """0 for everything before the first block, i + 1 for block i, depth + 1 for what follows (the head, and the
    encoder's `norm` when it follows the blocks, as in the pre-LN v1 ViT; speech and v2 images norm before them)."""
    if name.startswith("student.blocks."):
        return int(name.split(".")[2]) + 1
    if not name.startswith("student.") or (norm_on_top and name.startswith("student.norm.")):
        return depth + 1
    return 0


def _exempt(name: str, p: torch.Tensor) -> bool:
    """No weight decay on biases, norms and other 1-D tensors, and the encoder's tokens and mask embedding."""
    return p.ndim <= 1 or name.endswith(".bias") or "token" in name or name.endswith("mask_emb")


def param_groups(model: Classifier, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups: lr x layer_decay^(depth + 1 - layer), no weight decay on biases, norms and 1-D tensors."""
    depth = len(model.student.blocks)
    norm_on_top = getattr(model.student, "norm_on_top", False)
    return runtime_param_groups(model.named_parameters(), cfg.weight_decay, _exempt,
                                layer_of=lambda name: _layer_id(name, depth, norm_on_top),
                                layer_decay=cfg.layer_decay, top_layer=depth + 1)


def phase_steps(cfg: FinetuneConfig, n_train: int) -> tuple[int, int]:
    """(head-only updates, fine-tuning updates) for a training split of `n_train` items."""
    per_epoch = n_train / cfg.batch_size
    return int(round(cfg.head_epochs * per_epoch)), cfg.steps or max(1, int(round(cfg.epochs * per_epoch)))


def strength(tuned: int) -> float:
    """How much of the configured peak lr and crop range a fine-tuning phase of `tuned` updates uses."""
    return min(1.0, tuned / FULL_STRENGTH_STEPS)


def lr_at(cfg: FinetuneConfig, step: int, total: int, frozen: int = 0) -> float:
    """Warm-up + cosine over the phase that `step` is in: the `frozen` head-only updates (peak `cfg.head_lr`), then
    the rest of the `total` (peak `cfg.lr` x strength(updates)), whose warm-up starts at WARMUP_START of its peak:
    the encoder's first AdamW updates move every weight by about the lr."""
    if step < frozen:
        phase = OptimConfig(lr=cfg.head_lr, schedule="cosine", warmup_fraction=cfg.warmup_fraction, final_lr_ratio=0.0)
        return schedule_lr(phase, step, frozen)
    step, tuned = step - frozen, total - frozen
    peak = cfg.lr * strength(tuned)
    warmup = max(1, int(round(cfg.warmup_fraction * tuned))) if cfg.warmup_fraction > 0 else 0
    if step < warmup:
        return peak * (WARMUP_START + (1 - WARMUP_START) * step / warmup)
    progress = (step - warmup) / max(1, tuned - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def crop_range(cfg: FinetuneConfig, tuned: int) -> tuple[float, float]:
    """The random resized crop's area range of a fine-tuning phase of `tuned` updates: cfg.crop_scale, or (1, 1)
    (no crop) below CROP_MIN_STEPS updates."""
    return tuple(cfg.crop_scale) if tuned >= CROP_MIN_STEPS else (1.0, 1.0)


def validate(cfg: FinetuneConfig) -> None:
    check_count("--steps", cfg.steps, 0, 10**9, zero="from --epochs")  # counts: ranged as every command's
    check_count("--batch-size", cfg.batch_size, 1, 1 << 16)
    check_count("--seed", cfg.seed, 0, 2**32 - 1)
    check_count("eval_every", cfg.eval_every, 0, 10**9, zero="five per run")
    checks = [
        (cfg.epochs > 0 and math.isfinite(cfg.epochs) and cfg.epochs <= 10**6, "--epochs must be a positive number "
         "of at most 1000000"),
        (math.isfinite(cfg.lr) and 0 <= cfg.lr <= 10, "--lr must be a positive number of at most 10 (0: the "
         "modality's default)"),
        (math.isfinite(cfg.head_lr) and 0 < cfg.head_lr <= 10, "--head-lr must be a positive number of at most 10"),
        (math.isfinite(cfg.layer_decay) and 0 < cfg.layer_decay <= 1, "--layer-decay must be in (0, 1]"),
        (math.isfinite(cfg.weight_decay) and 0 <= cfg.weight_decay <= 10, "--weight-decay must be from 0 to 10"),
        (math.isfinite(cfg.warmup_fraction) and 0 <= cfg.warmup_fraction < 1, "--warmup-fraction must be in [0, 1)"),
        (math.isfinite(cfg.head_epochs) and 0 <= cfg.head_epochs <= 10**4, "--head-epochs must be from 0 to 10000"),
        (math.isfinite(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (math.isfinite(cfg.val_fraction) and 0 <= cfg.val_fraction <= 0.5, "val_fraction must be from 0 to 0.5"),
        (len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1,
         "crop scale must be two area fractions 0 < min <= max <= 1"),
        (cfg.head in HEADS, f"--head must be {' or '.join(HEADS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    parse_log(cfg.log)  # an unknown tracker, then a missing client: one sentence each
    check_installed(cfg.log)


def _build(cfg: FinetuneConfig):
    """(classifier, train split, test split) for the config."""
    encoder = encoder_from(cfg.encoder, weights=not cfg.random_init, seed=cfg.seed)
    holdout = [p for p in cfg.holdout.split(",") if p]
    train = load_labelled(cfg.data, encoder, "train", holdout, cfg.skip_bad_files)
    test = load_labelled(cfg.data, encoder, "test", holdout, cfg.skip_bad_files)
    if train.labels is None or len(np.unique(train.labels.numpy())) < 2:
        raise DataError(f"{cfg.data} needs labels with at least two classes in its training split to fine-tune")
    if len(test) == 0:
        raise DataError(f"{cfg.data} has no test split to score the fine-tuned model on")
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    fit, val = train, None
    if cfg.val_fraction > 0:  # stratified, fixed by the seed: the items that choose the exported model
        labels = train.labels.numpy()
        held = split_indices(labels, len(train), "test", cfg.val_fraction, seed=cfg.seed)
        if len(held) and len(np.unique(labels[np.setdiff1d(np.arange(len(train)), held)])) >= 2:
            fit = train.subset(split_indices(labels, len(train), "train", cfg.val_fraction, seed=cfg.seed))
            val = train.subset(held)
    return Classifier(encoder, classes, cfg.head, label_names(train, classes)), fit, val, test


def label_names(dataset, classes: int) -> list[str]:
    """The class names of a labelled set (its class folders, fortune files), or "0", "1", ... where it has none."""
    names = list(getattr(dataset, "classes", None) or [])
    return [str(n) for n in names] if len(names) == classes else [str(i) for i in range(classes)]


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


def _train_inputs(cfg: FinetuneConfig, train, idx: torch.Tensor, step: int, crop: tuple | None, device) -> tuple:
    """The encoder inputs of training batch `idx` at `step`: images randomly cropped to `crop` (an area range)
    unless it is None."""
    if crop and hasattr(train, "train_batch"):  # image files: crop the original, then resize
        rngs = [np.random.default_rng([cfg.seed, 11, step, i]) for i in range(len(idx))]
        return (train.train_batch(idx, crop, False, rngs).to(device).float() / 255.0,)
    inputs = _inputs(train, idx, device)
    if crop:  # arrays: they are held at the encoder's size
        rng = np.random.default_rng([cfg.seed, 11, step])
        inputs = (random_resized_crop(as_unit_images(inputs[0]), crop, False, rng),)
    return inputs


@dataclass
class FinetuneSummary:
    run_dir: Path
    steps: int
    test_accuracy: float  # of the exported model (the final checkpoint's weights)
    train_accuracy: float
    wall_s: float
    signal: int
    complete: bool = False
    exported_step: int = 0  # the step whose weights the final checkpoint holds: the best on the validation split
    evaluations: int = 0
    head_only_accuracy: float = float("nan")  # test accuracy at the end of the head-only phase
    last_accuracy: float = float("nan")  # test accuracy of the last step's weights
    warning: str = ""  # the exported model is below the head-only phase's test accuracy
    skipped_text: str = ""  # the files left out under --skip-bad-files: count, first few, where all are listed


def finetune(cfg: FinetuneConfig, out: Path, resume: bool = False, console=None, progress: bool = True):
    """Fine-tune per `cfg` into the run directory `out` (with resume: its saved config, continued exactly)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    say = lambda msg: console.print(escape(msg), highlight=False, soft_wrap=True)  # noqa: E731
    out = Path(out).expanduser()
    if resume:  # the saved run, continued exactly; only where it logs may change
        cfg = dataclasses.replace(load_config(out), **({"log": cfg.log} if cfg.log else {}))
    validate(cfg)
    device = resolve_device(cfg.device)
    model, train, val, test = _build(cfg)
    model = model.to(device)
    if not cfg.lr:  # resolved before config.json is written, so a resumed run keeps it
        cfg = dataclasses.replace(cfg, lr=DEFAULT_LR[model.student.cfg.modality])
    lock, fresh = open_run(out, resume, say)  # pretrain's rules: locked, partial saves removed, no overwrite
    try:
        return _loop(cfg, model, (train, val, test), device, out, not fresh, say, console, progress)
    finally:
        lock.release()


def load_config(run_dir: Path) -> FinetuneConfig:
    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"there is no fine-tuning run to resume in {run_dir}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("finetune"), dict):
        raise CheckpointError(f"{run_dir} is not a fine-tuning run directory")
    saved["finetune"].setdefault("head_epochs", 0.0)  # runs started before the head-only phase existed
    saved["finetune"].setdefault("head_lr", 1e-2)
    saved["finetune"].setdefault("val_fraction", 0.0)  # runs started before the exported model was chosen
    saved["finetune"].setdefault("skip_bad_files", False)
    saved["finetune"].setdefault("head", "mean")  # runs started before the data2vec head existed
    return from_dict(FinetuneConfig, saved["finetune"], "finetune.")


def _run_config(cfg: FinetuneConfig, model: Classifier) -> dict:
    """config.json: the fine-tuning settings, plus the encoder's model config where export looks for it."""
    return {"modality": model.student.cfg.modality, "kind": "finetune", "model": dataclasses.asdict(model.student.cfg),
            "run": {}, "finetune": dataclasses.asdict(cfg), "labels": model.labels}


class Evaluations:
    """The evaluated models of a run: the head-only phase's and the best so far on the validation split (later
    steps win ties), whose weights are kept in RUN/best/ (written atomically) so that a resumed run still knows
    them; without a validation split, the last evaluated one."""

    def __init__(self, out: Path, restore: bool):
        self.dir = out / "best"
        path = self.dir / "best.json"
        self.info = json.loads(path.read_text()) if restore and path.exists() else {}
        self.count = int(self.info.get("evaluations", 0))

    def record(self, model: Classifier, step: int, val_acc: float, test_acc: float, head_only: bool) -> None:
        self.count += 1
        self.dir.mkdir(exist_ok=True)
        entry = {"step": step, "val_accuracy": val_acc, "test_accuracy": test_acc}
        if head_only:
            self.info["head_only"] = entry
        best = self.info.get("best")
        if best is None or not math.isfinite(val_acc) or val_acc >= best["val_accuracy"]:
            from safetensors.torch import save

            state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            atomic_write_bytes(self.dir / "model.safetensors", save(state))
            self.info["best"] = entry
        self.info["evaluations"] = self.count
        atomic_write_json(self.dir / "best.json", self.info)

    def restore_best(self, model: Classifier) -> int:
        """Load the best evaluated weights into `model`; the step they come from."""
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(self.dir / "model.safetensors")))  # copied onto the model's device
        return int(self.info["best"]["step"])


def _loop(cfg, model, splits, device, out: Path, restore: bool, say, console, progress) -> FinetuneSummary:
    train, val, test = splits
    t0 = time.perf_counter()
    frozen, tuned = phase_steps(cfg, len(train))
    total = frozen + tuned
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    step = _restore(out, model, optimizer) if restore else 0
    evals = Evaluations(out, restore)
    if step >= total:
        acc = accuracy(model, test, device)
        say(f"{out} is complete: it ran all {total} steps; test accuracy {acc:.4f}.")
        return FinetuneSummary(out, step, acc, float("nan"), time.perf_counter() - t0, 0, complete=True)
    if restore:
        say(f"Resuming {out} at step {step}")
    else:
        atomic_write_json(out / "config.json", _run_config(cfg, model))
    model.train()
    frozen_features = _frozen_features(model, train, device, restore) if not restore or step < frozen else None
    step_ = _Step(cfg, model, optimizer, train, device, frozen, total, frozen_features)
    run = _Phases(cfg, model, (val, test), device, evals, frozen, total)
    log = MetricsLog(out, step, cfg.log, config=_run_config(cfg, model), warn=lambda msg: say(f"Warning: {msg}"))
    with log:  # closes the tracker runs: FINISHED, or KILLED / FAILED
        with StopSignals() as stop:
            for label, start, end in (("head only", 0, frozen), ("fine-tune", frozen, total)):
                if step < end:
                    with progress_bar(console, progress, end - start, step - start, label=label) as bar:
                        step = run.phase(step_, step, start, end, log, bar, stop)
                if stop.set:
                    say(f"Interrupted ({signal.Signals(stop.signum).name}): saving a checkpoint at step {step}.")
                    break
        if not finite(model):
            raise CheckpointError(f"fine-tuning diverged by step {step}: the weights are not finite; lower --lr")
        summary = _finish(cfg, model, optimizer, out, evals, step, total, run.test_acc, splits, t0, stop.signum)
        log.summary({k: v if not isinstance(v, float) or math.isfinite(v) else None
                     for k, v in dataclasses.asdict(summary).items() if isinstance(v, (int, float))
                     and k != "complete"})
        if stop.signum:
            log.close("KILLED")
    return summary


def _finish(cfg, model, optimizer, out: Path, evals, step: int, total: int, last_acc: float, splits, t0: float,
            signum: int) -> FinetuneSummary:
    """The final checkpoint, holding the exported model (the best evaluated one at the end of a complete run), the
    list of skipped files, and the summary."""
    summary = FinetuneSummary(out, step, last_acc, last_logged(out / METRICS, "train_accuracy"),
                              time.perf_counter() - t0, signum, exported_step=step, evaluations=evals.count,
                              last_accuracy=last_acc)
    if step == total and "best" in evals.info:
        if evals.info["best"]["step"] != step:
            evals.restore_best(model)
        choice = exported_choice(evals.info)
        summary.exported_step, summary.test_accuracy, summary.head_only_accuracy, summary.warning = choice
    ckpt.save_checkpoint(out, step, model, optimizer, {"kind": "finetune", "exported_step": summary.exported_step},
                         keep=cfg.keep_checkpoints)
    skipped = skipped_files(*splits)
    if skipped:
        summary.skipped_text = skipped_summary(skipped, write_skipped_files(out, skipped))
    return summary


def exported_choice(info: dict) -> tuple[int, float, float, str]:
    """(step of the exported model, its test accuracy, the head-only phase's test accuracy or nan, a warning when
    the first is below the second, else "") from an Evaluations record."""
    best, head = info["best"], info.get("head_only")
    warning = ""
    if head and best["test_accuracy"] < head["test_accuracy"]:
        warning = (f"the exported model's test accuracy {best['test_accuracy']:.4f} is below the head-only phase's "
                   f"{head['test_accuracy']:.4f} (step {head['step']}); it was the best on the validation split")
    return best["step"], best["test_accuracy"], head["test_accuracy"] if head else float("nan"), warning


class _Phases:
    """Runs the updates of a phase, logging each and evaluating at the phase's end and every eval_every updates
    (default: five times in the fine-tuning phase)."""

    def __init__(self, cfg, model, eval_splits, device, evals: Evaluations, frozen: int, total: int):
        self.cfg, self.model, self.device, self.evals = cfg, model, device, evals
        self.val, self.test = eval_splits
        self.frozen, self.total = frozen, total
        self.test_acc = float("nan")

    def due(self, step: int, start: int, end: int) -> bool:
        if step == end or (self.cfg.eval_every and step % self.cfg.eval_every == 0):
            return True
        return not self.cfg.eval_every and start == self.frozen and (step - start) % max(1, (end - start) // 5) == 0

    def phase(self, step_, step: int, start: int, end: int, log, bar, stop) -> int:
        correct = seen = 0
        while step < end:
            loss, right, count, lr = step_.run(step)
            step, correct, seen = step + 1, correct + right, seen + count
            record = {"step": step, "loss": loss, "lr": lr}
            if self.due(step, start, end):
                record.update(self.evaluate(step, end), train_accuracy=correct / max(seen, 1))
                correct = seen = 0
                note = f"step {step}: test accuracy {record['test_accuracy']:.4f}"
                bar.note(note + (f" (validation {record['val_accuracy']:.4f})" if "val_accuracy" in record else ""))
            log.log(record)
            if not math.isfinite(loss):
                raise CheckpointError(f"fine-tuning diverged: the loss became {loss} at step {step}; lower --lr")
            bar.update(step - start, loss=loss, lr=lr)
            if stop.set:
                break
        return step

    def evaluate(self, step: int, end: int) -> dict:
        self.test_acc = accuracy(self.model, self.test, self.device)
        val_acc = accuracy(self.model, self.val, self.device) if self.val is not None else float("nan")
        self.evals.record(self.model, step, val_acc, self.test_acc, head_only=step == end == self.frozen)
        return {"test_accuracy": self.test_acc, **({"val_accuracy": val_acc} if self.val is not None else {})}


def _restore(out: Path, model: Classifier, optimizer) -> int:
    """The step of the newest checkpoint of a fine-tuning run, loaded into model and optimizer."""
    path, weights, opt_tensors, state = ckpt.read_latest(out)
    for name in ("feature_mean", "feature_std"):  # runs from before the standardization: identity
        weights.setdefault(name, getattr(model, name))
    try:
        model.load_state_dict(weights)
        ckpt.load_optimizer_state(optimizer, opt_tensors, state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match this fine-tuning run: {exc}") from None
    return int(state["step"])


def _frozen_features(model: Classifier, train, device, restore: bool) -> torch.Tensor:
    """The frozen encoder's pooled features of the un-augmented training split, computed once; a new run also fixes
    the head's feature standardization from them."""
    model.student.eval()
    embedded = torch.from_numpy(features(model, train, device=device))  # (N, D) float64
    if not restore:
        model.standardize_from(embedded)
    return embedded.float().to(device)


class _Step:
    """One supervised update: the head alone on the frozen embeddings during the first `frozen` updates, then the
    whole model on (augmented) inputs."""

    def __init__(self, cfg, model, optimizer, train, device, frozen: int, total: int, frozen_features):
        self.cfg, self.model, self.optimizer, self.train, self.device = cfg, model, optimizer, train, device
        self.frozen, self.total, self.frozen_features = frozen, total, frozen_features
        self.order = SampleOrder(len(train), cfg.seed)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        crop = crop_range(cfg, total - frozen)
        self.crop = crop if model.student.cfg.modality == "vision" and crop != (1.0, 1.0) else None

    def run(self, step: int) -> tuple[float, int, int, float]:
        """(loss, correct predictions, items, lr) of update `step`."""
        cfg, model, B = self.cfg, self.model, self.cfg.batch_size
        lr = lr_at(cfg, step, self.total, self.frozen)
        set_lr(self.optimizer, lr)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout / drop-path: reproducible per step
        idx = self.order.indices(step * B, min(B, len(self.train)))
        labels = self.train.labels[idx].to(self.device)
        if step < self.frozen:  # the head alone, on the frozen encoder's embeddings: no encoder gradients or updates
            logits = model.classify(self.frozen_features[idx.to(self.device)])
        else:
            self.frozen_features = None
            model.student.train()
            logits = model(_train_inputs(cfg, self.train, idx, step, self.crop, self.device))
        loss = self.loss_fn(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        self.optimizer.step()
        return float(loss.detach()), int((logits.argmax(1) == labels).sum()), len(idx), lr
