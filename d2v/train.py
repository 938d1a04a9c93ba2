"""The training loop, shared by every modality: one optimizer step = grad_accum micro-batches through the
data2vec objective, clipping, the optimizer, then the EMA teacher update."""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from d2v import checkpoint as ckpt
from d2v import distributed, rundir
from d2v.config import PretrainConfig, from_dict
from d2v.data.loader import batch_loader
from d2v.data.pipeline import build_pipeline, torch_seed
from d2v.errors import CheckpointError, ConfigError, UserError
from d2v.objective import Data2Vec, build_objective
from d2v.ops import backends

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch.device that exists here; otherwise a ConfigError saying why."""
    name = name.strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} was asked for, but no CUDA device is visible to torch")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name} was asked for, but only {torch.cuda.device_count()} CUDA device(s) "
                              "are visible")
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


def param_groups(model: Data2Vec, weight_decay: float, exempt: list[str] | tuple[str, ...] = ("1d", "bias")) -> list[dict]:
    """AdamW groups: weight decay on every trainable parameter except those `exempt` names (optim.no_decay):
    "1d" (at most one dimension), "bias" (names ending in .bias), or a named student parameter (NO_DECAY_NAMES)."""
    from d2v.config import NO_DECAY_NAMES

    prefixes = tuple(f"student.{NO_DECAY_NAMES[r]}" for r in exempt if r in NO_DECAY_NAMES)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (("1d" in exempt and p.ndim <= 1) or ("bias" in exempt and name.endswith(".bias"))
                or (bool(prefixes) and name.startswith(prefixes)))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validate(cfg: PretrainConfig, data_ready: bool = False, memory: bool = True) -> None:
    """Every check of the config (see d2v.validation); data_ready once the data has filled its fields."""
    from d2v.validation import validate_config

    validate_config(cfg, data_ready, memory)


class DivergedError(UserError):
    """The loss or the weights became non-finite; no checkpoint was written after it."""

    exit_code = 3


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
    signal: int = 0  # the signal that stopped the run (SIGINT, SIGTERM), 0 if none
    complete: bool = False  # resumed a run that had already finished: nothing was done


_StopFlag = distributed.StopSignals  # Ctrl-C / SIGTERM / SIGUSR1 -> save and stop (d2v.finetune uses it too)

# Where a run executes, not what it computes (the micro-batch split and sharding change only float rounding).
RESUME_MAY_CHANGE = ("run.device", "run.kernels", "data.num_workers", "run.grad_accum", "run.strategy",
                     "run.checkpoint_minutes")


def resolve_run_dir(cfg: PretrainConfig, out: Path | None, when: float | None = None) -> Path:
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
        recipe = "" if cfg.recipe == "v1" else f"{cfg.recipe}-"
        out = Path("runs") / f"{cfg.modality}-{recipe}{cfg.preset}-{stamp}"
    return Path(out).expanduser()


def load_run_config(run_dir: Path) -> PretrainConfig:
    """The saved config of the run in `run_dir`, checked like a new one (a hand-edited file may be wrong)."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(f"there is no run to resume in {run_dir} (the directory does not exist)")
    if not rundir.is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a d2v run directory (no run config.json); nothing to resume")
    try:
        cfg = from_dict(PretrainConfig, ckpt.read_run_config(run_dir))
    except ConfigError as exc:
        raise ConfigError(f"{run_dir / 'config.json'}: {exc}") from None
    return cfg


def _open_run(cfg: PretrainConfig, run_dir: Path, resume: bool, say) -> tuple[rundir.RunLock, bool]:
    """Create/lock the run directory; returns (lock, whether to start from scratch)."""
    if not resume:
        rundir.check_new_run_target(run_dir)
    else:
        rundir.check_writable_dir(run_dir, "--out")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = rundir.RunLock(run_dir).acquire()
    try:
        for p in ckpt.remove_partial(run_dir):
            say(f"Removed {p.name}, a partial checkpoint left by a process that was killed while saving.")
        saved = rundir.has_checkpoint(run_dir)
        if resume and not saved:
            say(f"{run_dir} has no checkpoint yet: starting the run again from scratch with its saved config.")
        elif not resume and rundir.is_run_dir(run_dir):
            if saved:
                raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
            say(f"{run_dir} holds a run that stopped before its first checkpoint: starting it again from scratch.")
    except BaseException:
        lock.release()
        raise
    return lock, not (resume and saved)


def pretrain(cfg: PretrainConfig, out: Path | None = None, resume: bool = False, console=None,
             progress: bool = True) -> Summary:
    """Pretrain per `cfg`, writing a run directory; returns what the run did. With resume the run's saved config
    is used, except for the fields in RESUME_MAY_CHANGE (where it runs), which come from `cfg`.

    Under torchrun every process calls this; they join one process group and train one run (d2v.distributed)."""
    from rich.console import Console

    if resume and out is None:
        raise ConfigError("--resume needs --out RUN_DIR naming the run to continue")
    if resume:
        saved = load_run_config(resolve_run_dir(cfg, out))
        for key in RESUME_MAY_CHANGE:
            section, name = key.split(".")
            setattr(getattr(saved, section), name, getattr(getattr(cfg, section), name))
        cfg = saved
    validate(cfg)
    distributed.batch_plan(cfg.run.batch_size, cfg.run.grad_accum, distributed.env_world_size())
    if distributed.launched():
        distributed.check_strategy(cfg)
    device = resolve_device(cfg.run.device)
    backends.resolve(cfg.run.kernels, device.type)  # an unavailable backend fails before any work
    dist = distributed.init(device)
    try:
        console = console or Console()
        if not dist.is_main:
            console, progress = Console(quiet=True), False  # one progress display and one log: rank 0's
        return _pretrain(cfg, out, resume, console, progress, dist)
    finally:
        distributed.shutdown(dist)


def _pretrain(cfg, out, resume: bool, console, progress: bool, dist) -> Summary:
    from rich.markup import escape

    say = lambda msg: console.print(escape(msg), highlight=False, soft_wrap=True)  # noqa: E731
    run_dir = resolve_run_dir(cfg, out, when=distributed.broadcast_int(int(time.time()), dist))
    device = dist.device
    if device.type == "cpu" and cfg.run.precision == "fp16":
        say("Warning: fp16 on a CPU is emulated and about 14x slower than fp32; --precision bf16 is fast here.")
    wall0 = time.perf_counter()

    if cfg.run.init_from and not resume:
        adopt_layout(cfg)
    # fills data-dependent model fields (image size, channels, pixel stats); a resumed run reads its saved data list
    pipeline = build_pipeline(cfg, run_dir if resume else None)
    validate(cfg, data_ready=True)  # again, with the fields the data filled in
    distributed.check_same(cfg.to_json(), "configs (data-dependent fields differ)", dist)
    lock, fresh, error = None, True, None
    if dist.is_main:  # rank 0 owns the run directory
        try:
            lock, fresh = _open_run(cfg, run_dir, resume, say)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
    failed, fresh = distributed.agree([int(error is not None), int(fresh) if dist.is_main else 0], dist)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"rank 0 could not open the run directory {run_dir} (its error is shown above)")
    try:
        return _train(cfg, run_dir, bool(fresh), pipeline, device, console, say, progress, wall0, dist)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, run_dir: Path, fresh: bool, pipeline, device, console, say, progress: bool, wall0: float,
           dist) -> Summary:
    main = dist.is_main
    torch.manual_seed(cfg.run.seed)
    model = build_objective(cfg).to(device)
    if fresh and cfg.run.init_from:
        init_from(model, cfg.run.init_from, say)  # before sharding: every rank loads the same full weights
    amp_dtype = PRECISIONS[cfg.run.precision]
    strategy = cfg.run.strategy if dist.enabled else "single"
    find_unused = cfg.modality == "speech" and getattr(cfg.model, "layerdrop", 0) > 0  # dropped blocks get no grad
    engine = distributed.wrap(model, dist, cfg.run.strategy, find_unused=find_unused, mp_dtype=amp_dtype)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.no_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    total, B = cfg.run.steps, cfg.run.batch_size
    plan = distributed.batch_plan(B, cfg.run.grad_accum, dist.world, dist.rank)
    accum = plan.accum

    start, batches_done = 0, 0  # optimizer updates done; update-batches consumed (more when fp16 skipped some)
    if not fresh:
        start, batches_done = _restore(run_dir, model, optimizer, scaler, strategy)
        lo, hi = distributed.agree([-start, start], dist)
        if -lo != hi:
            raise CheckpointError(f"the processes read different checkpoints of {run_dir} (steps {-lo} and {hi}); "
                                  "every node must see the same run directory")
        if start >= total:
            say(f"{run_dir} is complete: it ran all {total} steps; nothing to resume. "
                f"Export it with: d2v export checkpoint {run_dir} --out {run_dir}-encoder")
            return Summary(run_dir=run_dir, checkpoint=ckpt.latest_checkpoint(run_dir), steps=start,
                           final_loss=_last_logged_loss(run_dir / "metrics.jsonl"), samples_per_s=0.0,
                           wall_s=time.perf_counter() - wall0, interrupted=False, skipped_files=0, collapsed=False,
                           complete=True)
        say(f"Resuming {run_dir} at step {start}")
    elif main:
        ckpt.atomic_write_json(run_dir / "config.json", cfg.to_dict())
        for name, data in getattr(pipeline, "run_files", dict)().items():  # data-made files, e.g. a tokenizer
            ckpt.atomic_write_bytes(run_dir / name, data)
    if dist.world > 1:
        say(f"{dist.world} processes ({strategy}, {device.type}): {plan.describe()}")
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, start)
    monitor = _monitor(cfg, model, pipeline) if main else None  # rank 0 evaluates the unsharded (DDP) model
    eval_every = cfg.run.eval_every or max(1, total // 10)
    tracker = _tracker(cfg, run_dir, start) if main else None

    # fp16 updates the grad scaler skips consume their batch without counting: the stream then runs past `total`.
    updates = (total - start) if not scaler.is_enabled() else 2**40
    batches = batch_loader(pipeline, plan, batches_done, updates, cfg.data.num_workers, device.type == "cuda")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # FSDP2 gathers bf16 parameters (its mixed-precision policy); autocast still picks each op's precision
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    model.train()

    last_loss = float("nan")
    collapsed, interrupted, pred_rose, diverged = False, False, False, ""
    saved_path: Path | None = None
    saved_step = start
    step, batches_start, skipped_updates = start, batches_done, 0
    in_update = False  # between optimizer.step and the EMA update: a checkpoint now would be inconsistent
    t_train = t_saved = time.perf_counter()
    with distributed.StopSignals() as stop, _progress(console, progress, total, start) as bar, \
            (open(metrics_path, "a") if main else contextlib.nullcontext()) as metrics:
        t_log, samples_since = time.perf_counter(), 0
        try:
            while step < total:
                lr = lr_at(cfg.optim, step, total)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                # summed over this rank's micro-batches: loss x masked count, masked count, target std, pred std
                sums = torch.zeros(4, device=device)
                for micro in range(accum):
                    first, batch = next(batches)
                    torch.manual_seed(torch_seed(cfg.run.seed, first))  # dropout / drop-path: by sample position
                    batch = pipeline.on_device(batch.to(device), first)
                    with distributed.no_sync(engine, last=micro == accum - 1):
                        with autocast:
                            loss, stats = engine(batch)
                        # The loss summed over masked positions; the gradient is divided by the global count below,
                        # so every masked position weighs the same however the batch is split over ranks and
                        # micro-batches (speech and text masks differ in size from sample to sample).
                        scaler.scale(loss * stats["masked"]).backward()
                    sums += torch.stack([loss.detach() * stats["masked"], stats["masked"], stats["target_std"],
                                         stats["pred_std"]]).float()
                distributed.all_sum_(sums, dist)
                in_update = True
                # DDP / FSDP averaged the gradients over ranks: times world / (global masked count) makes the mean
                grads = [distributed.local(p.grad) for p in params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, dist.world / sums[1].clamp_min(1.0))
                if cfg.optim.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
                scale_before = scaler.get_scale() if scaler.is_enabled() else 0.0
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                batches_done += 1
                samples_since += B
                # The scaler lowered its scale: the gradients overflowed and the optimizer did not step. The update
                # did not happen, so neither do the step count, the LR schedule or the EMA (as fairseq does).
                advanced = not (scaler.is_enabled() and scaler.get_scale() < scale_before)
                if advanced:
                    tau = model.ema_step(step + 1)
                    step += 1
                else:
                    skipped_updates += 1
                in_update = False

                diverged_here = collapse_stop = False
                if advanced and (step % cfg.run.log_every == 0 or step == total):
                    loss_v, count, t_std, p_std = sums.tolist()
                    last_loss = loss_v / max(count, 1.0)
                    now = time.perf_counter()
                    rate = samples_since / max(now - t_log, 1e-9)
                    t_log, samples_since = now, 0
                    record = {"step": step, "loss": last_loss, "lr": lr, "tau": tau,
                              "target_std": t_std / (accum * dist.world), "pred_std": p_std / (accum * dist.world),
                              "samples_per_s": rate}
                    if scaler.is_enabled():
                        record["skipped_updates"] = skipped_updates
                    _log(metrics, tracker, record)
                    if not math.isfinite(last_loss) and (amp_dtype is not torch.float16 or not _finite(model)):
                        diverged_here = True
                    # At init every masked position looks alike, so predictions start near constant: only a
                    # fall of the prediction std below 0.01 after having risen above it counts as collapse.
                    pred_rose = pred_rose or record["pred_std"] >= 0.01
                    if not diverged_here and step >= cfg.run.collapse_after * total and not collapsed and (
                            record["target_std"] < 0.1 or (pred_rose and record["pred_std"] < 0.01)):
                        collapsed = True
                        msg = (f"representation collapse suspected at step {step}: target std "
                               f"{record['target_std']:.4f} (< 0.1) or prediction std {record['pred_std']:.4f} "
                               "(< 0.01)")
                        if main:
                            warnings.warn(msg)
                        say(f"Warning: {msg}")
                        collapse_stop = cfg.run.collapse == "stop"
                    bar.update(step, loss=last_loss, lr=lr, tau=tau, rate=rate)
                elif advanced:
                    bar.update(step)
                if monitor is not None and advanced and (step == total or (step % eval_every == 0 and monitor.within_budget(
                        time.perf_counter() - t_train))):
                    knn = monitor.evaluate(model, device)
                    _log(metrics, tracker, {"step": step, **knn})
                    bar.note(f"k-NN top-1 teacher {knn['knn_teacher']:.3f} student {knn['knn_student']:.3f}")
                time_due = (main and cfg.run.checkpoint_minutes > 0
                            and time.perf_counter() - t_saved >= 60 * cfg.run.checkpoint_minutes)
                # Every decision to stop or save is taken together: one rank's signal, divergence or clock stops or
                # saves every rank at the same update, so no rank waits forever in a collective.
                signum, diverged_any, collapse_any, time_due = distributed.agree(
                    [stop.signum, int(diverged_here), int(collapse_stop), int(time_due)], dist)
                if diverged_any:
                    diverged = f"the loss became {last_loss} at step {step}"
                    break
                if collapse_any:
                    interrupted = True
                    break
                if step < total and (time_due or (advanced and cfg.run.checkpoint_every
                                                  and step % cfg.run.checkpoint_every == 0)):
                    if distributed.agree([int(not _finite(model))], dist)[0]:
                        diverged = f"the weights became non-finite by step {step}"
                        break
                    saved_path, saved_step = _save(run_dir, step, batches_done, model, optimizer, scaler, cfg,
                                                   dist, strategy), step
                    t_saved = time.perf_counter()
                if signum:
                    stop.signum = signum
                    interrupted = True
                    say(f"Interrupted ({signal.Signals(signum).name}): saving a checkpoint at step {step}.")
                    break
        except Exception:
            # An error mid-run (a file gone, a full disk): keep the updates done so far when the state is sound.
            # With several processes only a replicated (DDP) rank 0 can save alone, without the others.
            can_save_alone = strategy in ("single", "ddp") and main
            if can_save_alone and not in_update and step > saved_step and _finite(model):
                try:
                    saved_path = _save(run_dir, step, batches_done, model, optimizer, scaler, cfg, None, strategy)
                    say(f"Stopped by an error at step {step}; saved a checkpoint there. Fix the cause and continue "
                        f"with: d2v pretrain --out {run_dir} --resume")
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            raise
    train_s = time.perf_counter() - t_train
    if tracker is not None:
        tracker.close()
    if monitor is not None and train_s > 0:
        say(f"k-NN monitor on {monitor.source}: {monitor.seconds:.1f} s, {100 * monitor.seconds / train_s:.1f}% "
            "of the training time")
    if diverged:
        last = f"the last finite checkpoint is {saved_path.name}" if saved_path else (
            "no checkpoint was written before it" if saved_step == 0 else f"the last finite checkpoint is step {saved_step}")
        raise DivergedError(f"training diverged: {diverged}; {last} (lower --lr or raise optim.warmup_fraction)")
    if step > saved_step:
        if distributed.agree([int(not _finite(model))], dist)[0]:
            raise DivergedError(f"training diverged: the weights became non-finite by step {step}; "
                                f"no checkpoint was written after step {saved_step}")
        saved_path = _save(run_dir, step, batches_done, model, optimizer, scaler, cfg, dist, strategy)
    elif saved_path is None and step > 0:
        saved_path = ckpt.latest_checkpoint(run_dir)
    if main:
        _plot_if_possible(run_dir)
    return Summary(run_dir=run_dir, checkpoint=saved_path, steps=step, final_loss=last_loss,
                   samples_per_s=(batches_done - batches_start) * B / max(train_s, 1e-9),
                   wall_s=time.perf_counter() - wall0, interrupted=interrupted or bool(stop.signum),
                   skipped_files=pipeline.skipped, collapsed=collapsed, signal=stop.signum)


TRAINING_ONLY = ("drop_path", "dropout", "attention_dropout", "activation_dropout", "layerdrop")


def adopt_layout(cfg: PretrainConfig) -> None:
    """--init-from: the model's layout (sizes, vocabulary, pixel statistics) comes from the source encoder; the
    run's preset keeps the training-only fields (drop-path, dropouts)."""
    from d2v.export import read_encoder

    source_cfg, _ = read_encoder(cfg.run.init_from, weights=False)
    if source_cfg.get("modality") != cfg.modality:
        raise ConfigError(f"--init-from {cfg.run.init_from} is a {source_cfg.get('modality')} encoder but this run "
                          f"pretrains {cfg.modality}")
    for name, value in source_cfg.items():
        if hasattr(cfg.model, name) and name not in TRAINING_ONLY:
            setattr(cfg.model, name, type(getattr(cfg.model, name))(value) if isinstance(value, list) else value)
    if cfg.modality == "vision":
        cfg.data.image_size = cfg.model.image_size  # the data is resized to what the encoder was trained on
    if cfg.modality == "text":
        from d2v.export import TOKENIZER, _run_file

        tokenizer = _run_file(Path(cfg.run.init_from).expanduser(), TOKENIZER)
        if tokenizer is None or not hasattr(cfg.data, "tokenizer"):
            raise ConfigError(f"--init-from {cfg.run.init_from} has no tokenizer.json beside the weights; a text "
                              "encoder continues only with its own tokenizer")
        cfg.data.tokenizer = str(tokenizer.resolve())


def init_from(model: Data2Vec, path: str, say) -> None:
    """Load an encoder's weights into the student and the teacher (a fresh run that continues a model)."""
    from d2v.export import read_encoder

    _, tensors = read_encoder(path)
    for name, net in (("student", model.student), ("teacher", model.teacher)):
        own = net.state_dict()
        for key, value in tensors.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointError(f"--init-from {path}: tensor {key} has shape {tuple(value.shape)}, the "
                                      f"{name} expects {tuple(own[key].shape)}")
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise CheckpointError(f"--init-from {path} lacks tensor {missing[0]}")
        net.load_state_dict({k: tensors[k] for k in own})
    say(f"Initialized the student and the teacher from {path}.")


def _monitor(cfg: PretrainConfig, model: Data2Vec, pipeline):
    if not cfg.run.eval_data:
        return None
    from d2v.monitor import KnnMonitor

    tokenizer = getattr(pipeline, "tokenizer", None)
    if tokenizer is not None:  # text: the monitor tokenizes its labelled texts as the run does
        model.student.tokenizer = model.teacher.tokenizer = tokenizer
    return KnnMonitor(cfg.run.eval_data, model.student, seed=cfg.run.seed)


def _tracker(cfg: PretrainConfig, run_dir: Path, start: int):
    if cfg.run.log != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--log tensorboard needs the tensorboard package: pip install 'd2v[tensorboard]'") from None
    return SummaryWriter(str(run_dir / "tb"), purge_step=start + 1)  # a resumed run continues the same curves


def _log(metrics, tracker, record: dict) -> None:
    """One record to metrics.jsonl (the source of truth, flushed at once) and to the tracker, if any; nothing on
    ranks other than 0 (they have no metrics file)."""
    if metrics is None:
        return
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    if tracker is not None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                tracker.add_scalar(key, value, record["step"])


def _plot_if_possible(run_dir: Path) -> None:
    """metrics.png at the end of every run when matplotlib is installed (silently skipped otherwise)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from d2v.plot import plot_run

    try:
        plot_run(run_dir)
    except UserError:
        pass


def _finite(model: torch.nn.Module) -> bool:
    """All weights and buffers finite (one device reduction per tensor, one host sync)."""
    flags = [torch.isfinite(distributed.local(t)).all() for t in model.state_dict().values()
             if t.is_floating_point() and distributed.local(t).numel()]
    return bool(torch.stack(flags).all()) if flags else True


def _save(run_dir, step, batches, model, optimizer, scaler, cfg, dist, strategy) -> Path:
    """Checkpoint `step`. Replicated runs: rank 0 writes it, the others wait until it is complete, so that no rank
    exits, or is killed by torchrun, before the checkpoint exists. FSDP: every rank writes its shards (DCP)."""
    extra = {"scaler": scaler.state_dict() if scaler.is_enabled() else None, "batches": batches}
    if strategy == "fsdp":
        return ckpt.save_sharded_checkpoint(run_dir, step, model, optimizer, extra, cfg.run.keep_checkpoints,
                                            dist.is_main, lambda: distributed.barrier(dist))
    path = None
    if dist is None or dist.is_main:
        path = ckpt.save_checkpoint(run_dir, step, model, optimizer, extra, keep=cfg.run.keep_checkpoints)
    if dist is not None:
        distributed.barrier(dist)
    return path or Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def _restore(run_dir: Path, model: Data2Vec, optimizer, scaler, strategy: str) -> tuple[int, int]:
    """(step, update-batches consumed) of the newest intact checkpoint, loaded into model/optimizer/scaler.

    Either checkpoint layout loads into either strategy: single-file into a sharded (FSDP) model, sharded (DCP) into
    one process or DDP, and sharded at one world size into FSDP at another."""
    path = ckpt.latest_checkpoint(run_dir)
    if strategy == "fsdp" and ckpt.is_sharded(path):  # each rank reads only its own slices
        state = ckpt.read_checkpoint_state(path)
        template, _ = ckpt.sharded_state(model, optimizer)
        ckpt.load_sharded_into(path, template)
        ckpt.load_sharded_state(model, optimizer, template, state["optimizer"]["scalars"])
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path, weights, opt_tensors, state = ckpt.read_latest(run_dir)
        for w in caught:
            print(f"Warning: {w.message}", file=sys.stderr)
        try:
            if state.get("layout") == "dcp":  # consolidated from shards; optimizer keyed by parameter name
                model.load_state_dict(weights)
                ckpt.load_optimizer_state(optimizer, *_indexed_optimizer_state(model, optimizer, opt_tensors,
                                                                               state["optimizer"]["scalars"]))
            elif strategy == "fsdp":  # full tensors, each rank keeps its shard
                ckpt.load_full_into_sharded(model, optimizer, weights, opt_tensors, state["optimizer"])
            else:
                model.load_state_dict(weights)
                ckpt.load_optimizer_state(optimizer, opt_tensors, state["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match the run's model: "
                                  f"{str(exc).splitlines()[0]}") from None
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    return step, int(state.get("batches", step))


def _indexed_optimizer_state(model, optimizer, tensors: dict, scalars: dict) -> tuple[dict, dict]:
    """Optimizer state by parameter name (a consolidated sharded checkpoint) as load_optimizer_state takes it (by
    parameter index), for a model that is not sharded."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    pid = {n: i for i, n in enumerate(names)}
    by_index = {}
    for key, value in tensors.items():
        name, what = key[len("state."):].rsplit(".", 1)
        by_index[f"{pid[name]}.{what}"] = value
    groups, start = [], 0
    for g in optimizer.param_groups:
        first = names[start]
        group = {k.rsplit(".", 1)[1]: v for k, v in scalars.items() if k.rsplit(".", 1)[0] == f"param_groups.{first}"}
        groups.append({**group, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return by_index, {"param_groups": groups, "scalars": {}}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (later ones come from a run that stopped after its last checkpoint)."""
    if not path.exists():
        return
    keep = [r for r in rundir.read_metrics(path) if r["step"] <= step]
    ckpt.atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


def _last_logged_loss(path: Path) -> float:
    losses = [r["loss"] for r in rundir.read_metrics(path) if isinstance(r.get("loss"), (int, float))]
    return float(losses[-1]) if losses else float("nan")


class _Bar:
    """Progress: a one-line rich bar on a terminal; plain lines about every 5% of the run when stdout is not one."""

    def __init__(self, console, progress, task, total: int, start: int):
        self.console, self.progress, self.task, self.total = console, progress, task, total
        self.plain_every = max(1, total // 20)
        self.last_plain = start
        self.t0 = time.perf_counter()

    def note(self, text: str) -> None:
        """A line above the bar (or a plain line), e.g. a k-NN evaluation."""
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        elif self.console is not None:
            self.console.print(text, highlight=False)

    def update(self, step: int, **fields):
        if self.progress is not None:
            if fields:
                fields = {"stats": _stats_text(**fields)}
            self.progress.update(self.task, completed=step, **fields)
        elif self.console is not None and fields and (step - self.last_plain >= self.plain_every or step == self.total):
            self.last_plain = step
            elapsed = time.perf_counter() - self.t0
            self.console.print(f"step {step}/{self.total}  {_stats_text(**fields)}  {elapsed:.0f} s", highlight=False)


def _stats_text(loss: float, lr: float, tau: float | None = None, rate: float | None = None) -> str:
    text = f"loss {loss:.4f} lr {lr:.1e}"
    return text + (f" tau {tau:.4f}" if tau is not None else "") + (f" {rate:.0f}/s" if rate is not None else "")


@contextlib.contextmanager
def _progress(console, enabled: bool, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not enabled:
        yield _Bar(None, None, None, total, start)
        return
    if not console.is_terminal:
        yield _Bar(console, None, None, total, start)
        return
    columns = [BarColumn(bar_width=16), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeRemainingColumn(compact=True)]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("pretrain", total=total, completed=start, stats="loss - (first log pending)")
        yield _Bar(console, progress, task, total, start)
