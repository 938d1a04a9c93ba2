"""The training loop, shared by every modality: one optimizer step = grad_accum micro-batches through the
data2vec objective, clipping, the optimizer, then the EMA teacher update."""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from d2v import checkpoint as ckpt
from d2v.config import PretrainConfig, from_dict
from d2v.data.loader import batch_loader
from d2v.data.pipeline import build_pipeline
from d2v.errors import CheckpointError, ConfigError
from d2v.models import build_encoder
from d2v.objective import Data2Vec
from d2v.ops import backends

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for, but no CUDA device is visible to torch")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def lr_at(cfg, step: int, total: int) -> float:
    """Learning rate of optimizer update `step` (0-based) of `total`."""
    o = cfg
    warmup = int(round(o.warmup_fraction * total))
    if step < warmup:
        start = 0.01 if o.schedule == "tri_stage" else 0.0
        return o.lr * (start + (1 - start) * (step + 1) / warmup)
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return o.lr * (o.final_lr_ratio + (1 - o.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if o.schedule == "tri_stage":
        hold = int(round(o.hold_fraction * total))
        if step < warmup + hold:
            return o.lr
        progress = (step - warmup - hold) / max(1, total - warmup - hold)
        return o.lr * math.exp(math.log(max(o.final_lr_ratio, 1e-8)) * progress)
    raise ConfigError(f"unknown lr schedule {o.schedule!r}; use cosine, tri_stage or constant")


def param_groups(model: Data2Vec, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, 1-D parameters and the encoder's named exceptions."""
    skip = {f"student.{n}" for n in model.student.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validate(cfg: PretrainConfig) -> None:
    r = cfg.run
    if r.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {r.steps}")
    if r.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {r.batch_size}")
    if r.grad_accum < 1:
        raise ConfigError(f"grad_accum must be at least 1, got {r.grad_accum}")
    if r.precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {r.precision!r}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.optim.lr}")
    if not 0 < cfg.mask.ratio < 1:
        raise ConfigError(f"mask ratio must be between 0 and 1, got {cfg.mask.ratio}")
    if r.collapse not in ("warn", "stop"):
        raise ConfigError(f"run.collapse must be 'warn' or 'stop', got {r.collapse!r}")


@dataclass
class Summary:
    run_dir: Path
    checkpoint: Path | None
    steps: int
    final_loss: float
    samples_per_s: float
    wall_s: float
    interrupted: bool
    skipped_files: int
    collapsed: bool


class _StopFlag:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one interrupts at once."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def prepare_run(cfg: PretrainConfig, out: Path | None, resume: bool) -> tuple[PretrainConfig, Path]:
    """The config and run directory to train with: a fresh one, or the saved one of a run being resumed."""
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR naming the run to continue")
        saved = from_dict(PretrainConfig, ckpt.read_run_config(out))
        ckpt.latest_checkpoint(out)  # fails clearly if there is nothing to resume
        return saved, Path(out)
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{cfg.modality}-{cfg.preset}-{stamp}"
    out = Path(out)
    if out.exists() and (out / "config.json").exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return cfg, out


def pretrain(cfg: PretrainConfig, out: Path | None = None, resume: bool = False, console=None,
             progress: bool = True) -> Summary:
    """Pretrain per `cfg`, writing a run directory; returns what the run did."""
    from rich.console import Console

    console = console or Console()
    cfg, run_dir = prepare_run(cfg, out, resume)
    validate(cfg)
    device = resolve_device(cfg.run.device)
    backends.resolve(cfg.run.kernels, device.type)  # an unavailable backend fails before any work
    wall0 = time.perf_counter()

    # fills data-dependent model fields (image size, channels, pixel stats); a resumed run reads its saved data list
    pipeline = build_pipeline(cfg, run_dir if resume else None)
    torch.manual_seed(cfg.run.seed)
    model = Data2Vec(build_encoder(cfg.model), cfg.targets, cfg.ema, backend=cfg.run.kernels).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    amp_dtype = PRECISIONS[cfg.run.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    start = 0
    if resume:
        start = _restore(run_dir, model, optimizer, scaler)
        console.print(f"Resuming {run_dir} at step {start}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_json(run_dir / "config.json", cfg.to_dict())
        for name, data in getattr(pipeline, "run_files", dict)().items():  # data-made files, e.g. a tokenizer
            ckpt.atomic_write_bytes(run_dir / name, data)
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start)

    total, accum, B = cfg.run.steps, cfg.run.grad_accum, cfg.run.batch_size
    batches = batch_loader(pipeline, start * accum, total * accum, cfg.data.num_workers, device.type == "cuda")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    model.train()

    last_loss, window_loss, window_n = float("nan"), 0.0, 0
    collapsed, interrupted, pred_rose = False, False, False
    saved_path: Path | None = None
    step = start
    t_train = time.perf_counter()
    with _StopFlag() as stop, _progress_bar(console, progress, total, start) as bar, \
            open(metrics_path, "a") as metrics:
        t_log, samples_since = time.perf_counter(), 0
        while step < total:
            lr = lr_at(cfg.optim, step, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            torch.manual_seed(cfg.run.seed * 1_000_003 + step)  # dropout / drop-path: reproducible per step
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                k = step * accum + micro
                batch = pipeline.on_device(next(batches).to(device), k)
                with autocast:
                    loss, stats = model(batch)
                scaler.scale(loss / accum).backward()
                loss_sum += loss.detach() / accum
            if cfg.optim.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            tau = model.ema_step(step + 1)
            step += 1
            samples_since += B * accum

            if step % cfg.run.log_every == 0 or step == total:
                last_loss = loss_sum.item()
                window_loss, window_n = window_loss + last_loss, window_n + 1
                now = time.perf_counter()
                rate = samples_since / max(now - t_log, 1e-9)
                t_log, samples_since = now, 0
                record = {"step": step, "loss": last_loss, "lr": lr, "tau": tau,
                          "target_std": stats["target_std"].item(), "pred_std": stats["pred_std"].item(),
                          "samples_per_s": rate}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if not math.isfinite(last_loss):
                    console.print(f"[red]Loss became {last_loss} at step {step}; stopping (checkpoint kept).[/red]")
                    interrupted = True
                    break
                # At init every masked position looks alike, so predictions start near constant: only a
                # fall of the prediction std below 0.01 after having risen above it counts as collapse.
                pred_rose = pred_rose or record["pred_std"] >= 0.01
                if step >= cfg.run.collapse_after * total and not collapsed and (
                        record["target_std"] < 0.1 or (pred_rose and record["pred_std"] < 0.01)):
                    collapsed = True
                    msg = (f"representation collapse suspected at step {step}: target std "
                           f"{record['target_std']:.4f} (< 0.1) or prediction std {record['pred_std']:.4f} (< 0.01)")
                    warnings.warn(msg)
                    console.print(f"[yellow]Warning: {msg}[/yellow]")
                    if cfg.run.collapse == "stop":
                        interrupted = True
                        break
                bar.update(step, loss=last_loss, lr=lr, tau=tau, rate=rate)
            else:
                bar.update(step)
            if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and step < total:
                saved_path = _save(run_dir, step, model, optimizer, scaler, cfg)
            if stop.set:
                interrupted = True
                console.print(f"Interrupted: saving a checkpoint at step {step}.")
                break
    train_s = time.perf_counter() - t_train
    if step > start and (saved_path is None or saved_path.name != f"step_{step:08d}"):
        saved_path = _save(run_dir, step, model, optimizer, scaler, cfg)
    return Summary(run_dir=run_dir, checkpoint=saved_path, steps=step, final_loss=last_loss,
                   samples_per_s=(step - start) * B * accum / max(train_s, 1e-9),
                   wall_s=time.perf_counter() - wall0, interrupted=interrupted,
                   skipped_files=pipeline.skipped, collapsed=collapsed)


def _save(run_dir, step, model, optimizer, scaler, cfg) -> Path:
    extra = {"scaler": scaler.state_dict() if scaler.is_enabled() else None}
    return ckpt.save_checkpoint(run_dir, step, model, optimizer, extra, keep=cfg.run.keep_checkpoints)


def _restore(run_dir: Path, model: Data2Vec, optimizer, scaler) -> int:
    path = ckpt.latest_checkpoint(run_dir)
    weights, opt_tensors, state = ckpt.read_checkpoint(path)
    try:
        model.load_state_dict(weights)
        ckpt.load_optimizer_state(optimizer, opt_tensors, state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match the run's model: {str(exc).splitlines()[0]}") from None
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (left by a run that stopped after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    ckpt.atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


@contextlib.contextmanager
def _progress_bar(console, enabled: bool, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class _Bar:
        def __init__(self, progress, task):
            self.progress, self.task = progress, task

        def update(self, step, **fields):
            if self.progress is not None:
                self.progress.update(self.task, completed=step, **fields)

    if not enabled:
        yield _Bar(None, None)
        return
    columns = [
        TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  tau {task.fields[tau]:.5f}  "
                   "{task.fields[rate]:.0f} samples/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("pretrain", total=total, completed=start, loss=float("nan"), lr=0.0, tau=0.0,
                                 rate=0.0)
        yield _Bar(progress, task)
