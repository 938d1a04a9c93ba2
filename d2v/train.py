"""`d2v pretrain`: the one training loop of every modality and both recipes.

One optimizer update is grad_accum micro-batches through the data2vec objective (d2v.objective), the gradient
scaled to the mean over the global batch's masked positions, clipping, the optimizer step and the EMA teacher update
(Trainer.update). Around it, the loop (train) calls named pieces: set-up (setup, begin), the metrics log
(d2v.runtime.metrics), health checks (Health), the k-NN monitor (d2v.monitor), the agreement of all processes on
stopping and saving (d2v.runtime.distributed.agree) and the checkpointer (d2v.runtime.checkpointer)."""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d2v.core.config import PretrainConfig, from_dict, set_by_path
from d2v.core.device import free_bytes, local, resolve_device, resolve_precision
from d2v.core.errors import CheckpointError, ConfigError, UserError
from d2v.core.files import atomic_write_bytes, atomic_write_json
from d2v.core.presets import default_recipe, preset_config
from d2v.data.loader import batch_loader
from d2v.data.pipeline import Pipeline, build_pipeline, resolve_source
from d2v.data.sources import skipped_summary, write_skipped_files
from d2v.encoders.init import adopt_layout, init_from, layout_conflicts, source_recipe
from d2v.models.common import set_activation_checkpointing
from d2v.monitor import KnnMonitor
from d2v.objective import Data2Vec, build_objective
from d2v.ops import backends
from d2v.plot import plot_run
from d2v.runtime import checkpoint as ckpt
from d2v.runtime import cost, distributed, rundir
from d2v.runtime.checkpointer import Checkpointer, finite
from d2v.runtime.metrics import METRICS, MetricsLog, last_logged
from d2v.runtime.params import no_decay_rule, param_groups
from d2v.runtime.progress import progress_bar
from d2v.runtime.schedule import lr_at, set_lr
from d2v.validation import check_modality_fields, field_name, validate_config

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# --compile auto compiles a CUDA run of at least this many updates: compiling the forward takes about a minute
# there, so the few percent a step saves must be repaid over many steps. Never on the CPU: on the 2-core test machine
# compiling took 552 s and made the tiny preset's step 9% faster (break-even after ~5000 steps; bench/RESULTS.md).
COMPILE_MIN_STEPS = 2000
# A run whose typical (median) logged window ran below this fraction of its own best window was slowed by something
# outside it (mostly another busy process on the same CPUs); the summary says so.
SLOW_FRACTION = 0.5
SLOW_MIN_WINDOWS = 4
# Where a run executes, not what it computes (the micro-batch split and sharding change only float rounding),
# and where it logs (a tracker added on --resume first gets the rows of metrics.jsonl).
RESUME_MAY_CHANGE = ("run.device", "run.kernels", "run.compile", "data.num_workers", "run.grad_accum",
                     "run.strategy", "run.checkpoint_minutes", "run.log",
                     "run.activation_checkpointing", "run.fused_adamw")
# Extending a run: `--resume --steps N` with N above the saved total continues it (optimizer, teacher, data position
# kept) to N updates. The rule for the schedules: from the update it resumes at, the run follows exactly the schedules
# of the same config planned for N updates from the start. The learning rate's warm-up and cosine (or tri-stage)
# are fractions of run.steps, so they are recomputed over N (as fairseq's schedulers do when --max-update is raised
# on resume): a finished cosine run at its final lr resumes at the N-update cosine's value there and decays again to
# the final lr at N. The EMA's anneal is a count of updates (ema.anneal_steps), not a fraction, so it is unchanged:
# past it, tau stays at ema.end_decay. The updates already done are not touched; a total can only grow.
RESUME_MAY_EXTEND = "run.steps"


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
    slow_warning: str = ""  # throughput_drop's sentence, when the run was far slower than its own best
    skipped_text: str = ""  # the count and the first few files left out, and where all are listed
    drawn: tuple[int, ...] = ()  # a mixture: samples drawn from each data.sources entry over the whole run


def throughput_drop(rates: list[float]) -> str:
    """The summary's warning when the median of the logged samples/s windows is below SLOW_FRACTION of the best
    window (at least SLOW_MIN_WINDOWS windows); "" otherwise. The median ignores the odd slow window (a k-NN
    evaluation, a checkpoint save, the first steps' warm-up)."""
    rates = [r for r in rates if math.isfinite(r) and r > 0]
    if len(rates) < SLOW_MIN_WINDOWS:
        return ""
    best, typical = max(rates), sorted(rates)[len(rates) // 2]
    if typical >= SLOW_FRACTION * best:
        return ""
    return (f"throughput was typically {typical:.0f} samples/s, under {SLOW_FRACTION:.0%} of this run's best "
            f"window ({best:.0f} samples/s): other processes were probably busy on the same CPUs")


def use_compile(mode: str, device_type: str, steps: int) -> bool:
    """Whether run.compile = mode compiles the forward of a run of `steps` updates on `device_type`."""
    if mode in ("on", "off"):
        return mode == "on"
    return device_type == "cuda" and steps >= COMPILE_MIN_STEPS


def use_fused_adamw(mode: str, device_type: str) -> bool:
    """Whether run.fused_adamw = mode makes AdamW one fused kernel on `device_type` (auto: on CUDA, where the
    foreach version launches several kernels per parameter group and step)."""
    if mode in ("on", "off"):
        return mode == "on"
    return device_type == "cuda"


def compile_forward(model) -> None:
    """torch.compile the student's path (encoder + head or decoder) and the teacher's encoder; the weights, the EMA
    and the checkpoints are the uncompiled modules' own (the hot ops are custom ops that compile as one node)."""
    for attr in ("_predict_v1", "_predict_v2"):
        if hasattr(model, attr):
            setattr(model, attr, torch.compile(getattr(model, attr)))
    model.teacher.encode = torch.compile(model.teacher.encode)


class NoTimes:
    """The step timer of a normal run: times nothing (d2v.bench.pretrain.StepTimes is the real one)."""

    def attach(self, model) -> None:
        pass

    def phase(self, name: str):
        return contextlib.nullcontext()

    def step_done(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- the run's config
def validate(cfg: PretrainConfig, data_ready: bool = False, memory: bool = True) -> None:
    """Every check of the config (see d2v.validation); data_ready once the data has filled its fields."""
    validate_config(cfg, data_ready, memory)


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


def run_config(given: dict, resume: bool, out: Path | None, preset: str | None = None, modality: str | None = None,
               recipe: str | None = None) -> PretrainConfig:
    """The config of a `d2v pretrain` command: the preset of (modality, recipe) with `given` (dotted key -> value)
    applied, data paths made absolute; with resume, the saved run's config, with the options not given taken from
    the run and only where it runs (RESUME_MAY_CHANGE) allowed to change."""
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR naming the run to continue")
        cfg = load_run_config(out)
        check_modality_fields(given, modality or cfg.modality)
        apply_resume_overrides(cfg, given, preset, modality)
        if recipe is not None and recipe != cfg.recipe:
            raise ConfigError(f"--recipe cannot change when resuming (the run uses {cfg.recipe}); start a new run "
                              "instead")
        return cfg
    modality = modality or "vision"
    check_modality_fields(given, modality)
    if recipe is None:  # the modality's default, unless --init-from's encoder can only train under the other
        recipe = default_recipe(modality)
        if given.get("run.init_from"):
            recipe = source_recipe(resolve_source(given["run.init_from"]), modality, recipe)
    cfg = preset_config(modality, preset, recipe)
    for key, value in given.items():
        set_by_path(cfg, key, value)
    cfg.data.source = resolve_source(cfg.data.source) if cfg.data.source else ""
    cfg.data.sources = [resolve_source(s) for s in cfg.data.sources]
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).expanduser().resolve())
    cfg.run.eval_data = resolve_source(cfg.run.eval_data) if cfg.run.eval_data else ""
    cfg.run.init_from = resolve_source(cfg.run.init_from) if cfg.run.init_from else ""
    if cfg.run.init_from:
        refuse_layout_overrides(cfg, set(given))
    return cfg


def refuse_layout_overrides(cfg: PretrainConfig, given: set[str]) -> None:
    """--init-from keeps its encoder's layout; an option the user gave that it would override is an error naming
    both values, never silently dropped."""
    for key, mine, theirs in layout_conflicts(cfg, given)[:1]:
        raise ConfigError(f"{field_name(key)} {mine!r} conflicts with --init-from {cfg.run.init_from}, whose encoder "
                          f"has {theirs!r}: --init-from keeps the encoder's layout (vision data is resized to its "
                          f"image size); leave the option out, or start a new model without --init-from")


def apply_resume_overrides(saved: PretrainConfig, given: dict, preset: str | None, modality: str | None) -> None:
    """Resuming continues the saved run exactly: options not given come from the run; options that would change
    it are refused; only where it runs (device, workers) may change."""
    if preset is not None and preset != saved.preset:
        raise ConfigError(f"--preset cannot change when resuming (the run uses {saved.preset!r}); start a new run instead")
    if modality is not None and modality != saved.modality:
        raise ConfigError(f"--modality cannot change when resuming (the run is {saved.modality}); start a new run instead")
    changed = from_dict(PretrainConfig, saved.to_dict())
    for key, value in given.items():
        set_by_path(changed, key, value)
    if "data.source" in given:
        changed.data.source = resolve_source(changed.data.source) if changed.data.source else ""
    if "data.sources" in given:
        changed.data.sources = [resolve_source(s) for s in changed.data.sources]
    allowed = set(RESUME_MAY_CHANGE)
    for key in sorted(given.keys() - allowed):
        section, name = key.split(".", 1)
        before, after = getattr(getattr(saved, section), name), getattr(getattr(changed, section), name)
        if key == RESUME_MAY_EXTEND and after != before:
            if after < before:
                raise ConfigError(f"--steps {after} is below the run's total of {before} updates: resuming can "
                                  "extend a run, not shorten it (export an earlier checkpoint instead)")
            continue
        if before != after and not (key == "model.image_size" and after == 0):
            raise ConfigError(f"{key} cannot change when resuming (saved: {before!r}); start a new run instead")
    for key in given.keys() & allowed:
        set_by_path(saved, key, given[key])
    saved.run.steps = max(saved.run.steps, changed.run.steps)


def prepare(cfg: PretrainConfig, run_dir: Path | None = None, resume: bool = False, memory: bool = True) -> Pipeline:
    """What a run needs before its first step, in order: the --init-from encoder's layout (a new run), the data
    pipeline, which fills the data-dependent model fields (a resumed run reads its saved file list from run_dir), and
    the checks that need those fields."""
    if cfg.run.init_from and not resume:
        adopt_layout(cfg)
    pipeline = build_pipeline(cfg, run_dir if resume else None)
    validate(cfg, data_ready=True, memory=memory)
    return pipeline


# ---------------------------------------------------------------------------------------------- entry point
def pretrain(cfg: PretrainConfig, out: Path | None = None, resume: bool = False, console=None,
             progress: bool = True, step_times=None) -> Summary:
    """Pretrain per `cfg`, writing a run directory; returns what the run did. With resume the run's saved config
    is used, except for the fields in RESUME_MAY_CHANGE (where it runs), which come from `cfg`, and run.steps when
    `cfg`'s is larger: the run is extended to it (RESUME_MAY_EXTEND says how its schedules continue).

    Under torchrun every process calls this; they join one process group and train one run (d2v.runtime.distributed).
    step_times: an object timing the step's phases (d2v.bench.pretrain.StepTimes), or None."""
    from rich.console import Console

    if resume and out is None:
        raise ConfigError("--resume needs --out RUN_DIR naming the run to continue")
    if resume:
        saved = load_run_config(resolve_run_dir(cfg, out))
        for key in RESUME_MAY_CHANGE:
            section, name = key.split(".")
            setattr(getattr(saved, section), name, getattr(getattr(cfg, section), name))
        saved.run.steps = max(saved.run.steps, cfg.run.steps)  # an extension (RESUME_MAY_EXTEND)
        cfg = saved
    validate(cfg)
    distributed.batch_plan(cfg.run.batch_size, cfg.run.grad_accum, distributed.env_world_size())
    if distributed.launched():
        distributed.check_strategy(cfg)
    device = resolve_device(cfg.run.device)
    cfg.run.precision = resolve_precision(cfg.run.precision, device)  # saved resolved: a resume keeps it
    backends.resolve(cfg.run.kernels, device.type)  # an unavailable backend fails before any work
    dist = distributed.init(device)
    try:
        console = console or Console()
        if not dist.is_main:
            console, progress = Console(quiet=True), False  # one progress display and one log: rank 0's
        summary = _pretrain(cfg, out, resume, console, progress, dist, step_times or NoTimes())
        distributed.barrier(dist)  # no process tears the group down while another still finishes (rank 0 plots)
        return summary
    finally:
        distributed.shutdown(dist)


def _pretrain(cfg, out, resume: bool, console, progress: bool, dist, times) -> Summary:
    from rich.markup import escape

    say = lambda msg: console.print(escape(msg), highlight=False, soft_wrap=True)  # noqa: E731
    run_dir = resolve_run_dir(cfg, out, when=distributed.broadcast_int(int(time.time()), dist))
    if dist.device.type == "cpu" and cfg.run.precision == "fp16":
        say("Warning: fp16 on a CPU is emulated and about 14x slower than fp32; --precision bf16 is fast here.")
    wall0 = time.perf_counter()
    pipeline = prepare(cfg, run_dir, resume)
    distributed.check_same(cfg.to_json(), "configs (data-dependent fields differ)", dist)
    lock, fresh, error = None, True, None
    if dist.is_main:  # rank 0 owns the run directory
        try:
            lock, fresh = rundir.open_run(run_dir, resume, say)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
    failed, fresh = distributed.agree([int(error is not None), int(fresh) if dist.is_main else 0], dist)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"rank 0 could not open the run directory {run_dir} (its error is shown above)")
    try:
        return train(cfg, run_dir, bool(fresh), pipeline, console, say, progress, wall0, dist, times)
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------------------------- one update
@dataclass
class Trainer:
    """What one update touches, built once by setup()."""

    cfg: PretrainConfig
    pipeline: Pipeline
    model: Data2Vec
    engine: torch.nn.Module  # the model itself, DDP around it, or the FSDP-sharded model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plan: distributed.BatchPlan
    dist: distributed.Dist
    strategy: str  # "single", "ddp" or "fsdp"
    times: object
    in_update: bool = False  # between optimizer.step and the EMA update: a checkpoint now would be inconsistent

    def __post_init__(self):
        self.device = self.dist.device
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        amp_dtype = PRECISIONS[self.cfg.run.precision]
        # FSDP2 gathers bf16 parameters (its mixed-precision policy); autocast still picks each op's precision
        self.autocast = (torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype is not None
                         else contextlib.nullcontext())

    def update(self, step: int, total: int, batches) -> tuple[torch.Tensor, bool, float | None, float]:
        """Optimizer update `step` of `total`: its micro-batches forward and backward, then clipping, the optimizer
        step and the EMA update. Returns (sums over micro-batches and ranks of loss x masked count, masked count,
        target std and prediction std; whether the update happened (fp16 skips overflowing ones); tau; lr)."""
        cfg, times = self.cfg, self.times
        lr = lr_at(cfg.optim, step, total)
        set_lr(self.optimizer, lr)
        sums = torch.zeros(4, device=self.device)
        for micro in range(self.plan.accum):
            with times.phase("data"):
                first, batch = next(batches)  # dropout, drop-path, LayerDrop: keyed by batch.first (the objective)
                batch = self.pipeline.on_device(batch.to(self.device), first)
            with distributed.no_sync(self.engine, last=micro == self.plan.accum - 1):
                with self.autocast, times.phase("loss"):  # the forward's other parts are timed inside it
                    loss, stats = self.engine(batch)
                # The loss summed over masked positions; the gradient is divided by the global count below, so every
                # masked position weighs the same however the batch is split over ranks and micro-batches (speech
                # and text masks differ in size from sample to sample).
                with times.phase("backward"):
                    self.scaler.scale(loss * stats["masked"]).backward()
            sums += torch.stack([loss.detach() * stats["masked"], stats["masked"], stats["target_std"],
                                 stats["pred_std"]]).float()
        distributed.all_sum_(sums, self.dist)
        self.in_update = True
        advanced = self._step(sums[1])
        tau = None
        if advanced:
            with times.phase("ema"):
                tau = self.model.ema_step(step + 1)
            times.step_done()
        self.in_update = False
        return sums, advanced, tau, lr

    def _step(self, masked: torch.Tensor) -> bool:
        """Gradients to the mean over the global masked count, clipped, one optimizer step. False when the grad
        scaler lowered its scale: the gradients overflowed, the optimizer did not step, and so neither do the step
        count, the LR schedule or the EMA (as fairseq does)."""
        with self.times.phase("optimizer"):
            # DDP / FSDP averaged the gradients over ranks: times world / (global masked count) makes the mean
            grads = [local(p.grad) for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, self.dist.world / masked.clamp_min(1.0))
            if self.cfg.optim.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad)
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 0.0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return not (self.scaler.is_enabled() and self.scaler.get_scale() < scale_before)


def setup(cfg: PretrainConfig, pipeline: Pipeline, dist, fresh: bool, say, times) -> Trainer:
    """The objective (seeded), compiled where it pays, --init-from weights, the process wrapper, the optimizer."""
    torch.manual_seed(cfg.run.seed)
    model = build_objective(cfg).to(dist.device)
    set_activation_checkpointing(model.student, cfg.run.activation_checkpointing)  # the teacher keeps no activations
    if use_compile(cfg.run.compile, dist.device.type, cfg.run.steps):
        compile_forward(model)
    times.attach(model)
    if fresh and cfg.run.init_from:
        init_from(model, cfg.run.init_from, say)  # before sharding: every rank loads the same full weights
    cfg.run.precision = resolve_precision(cfg.run.precision, dist.device)  # pretrain resolved it already; an
    amp_dtype = PRECISIONS[cfg.run.precision]  # estimate or a test may hand over "auto"
    strategy = cfg.run.strategy if dist.enabled else "single"
    engine = distributed.wrap(model, dist, cfg.run.strategy, mp_dtype=amp_dtype)  # LayerDrop leaves no block unused
    groups = param_groups(model.named_parameters(), cfg.optim.weight_decay, no_decay_rule(cfg.optim.no_decay))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=use_fused_adamw(cfg.run.fused_adamw, dist.device.type) or None)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype is torch.float16)
    plan = distributed.batch_plan(cfg.run.batch_size, cfg.run.grad_accum, dist.world, dist.rank,
                                  getattr(pipeline, "budget", None))
    return Trainer(cfg, pipeline, model, engine, optimizer, scaler, plan, dist, strategy, times)


def begin(t: Trainer, run_dir: Path, fresh: bool, checkpointer: Checkpointer, say) -> tuple[int, int]:
    """(updates done, update-batches consumed): restored from the newest checkpoint, or a new run's config and data
    files written (rank 0)."""
    if fresh:
        if t.dist.is_main:
            atomic_write_json(run_dir / "config.json", t.cfg.to_dict())
            for name, data in t.pipeline.run_files().items():  # data-made files, e.g. a tokenizer
                atomic_write_bytes(run_dir / name, data)
        return 0, 0
    start, batches_done = checkpointer.restore()
    lo, hi = distributed.agree([-start, start], t.dist)
    if -lo != hi:
        raise CheckpointError(f"the processes read different checkpoints of {run_dir} (steps {-lo} and {hi}); "
                              "every node must see the same run directory")
    saved_total = load_run_config(run_dir).run.steps
    if t.cfg.run.steps > saved_total:  # an extension: the new total is the run's from now on (a later --resume too)
        if t.dist.is_main:
            atomic_write_json(run_dir / "config.json", t.cfg.to_dict())
        distributed.barrier(t.dist)
        say(f"Extending {run_dir} from {saved_total} to {t.cfg.run.steps} updates at step {start}: the learning rate "
            f"follows the schedule of a {t.cfg.run.steps}-update run from here (now "
            f"{lr_at(t.cfg.optim, start, t.cfg.run.steps):.2e}); the EMA keeps its schedule")
    elif start < t.cfg.run.steps:
        say(f"Resuming {run_dir} at step {start}")
    return start, batches_done


# ---------------------------------------------------------------------------------------------- health
class Health:
    """Checks on each logged record: a non-finite loss (divergence) and SPEC's collapse guard (target std below 0.1,
    or the prediction std falling below 0.01 after having risen above it, once collapse_after of the run is done)."""

    def __init__(self, cfg: PretrainConfig, model, say, main: bool):
        self.cfg, self.model, self.say, self.main = cfg, model, say, main
        self.pred_rose = self.collapsed = False

    def check(self, record: dict) -> tuple[bool, bool]:
        """(diverged, stop for collapse) after logging `record`."""
        cfg, step = self.cfg, record["step"]
        fp16 = cfg.run.precision == "fp16"  # a non-finite fp16 loss is a skipped update unless the weights are too
        if not math.isfinite(record["loss"]) and (not fp16 or not finite(self.model)):
            return True, False
        # At init every masked position looks alike, so predictions start near constant: only a fall of the
        # prediction std below 0.01 after having risen above it counts as collapse.
        self.pred_rose = self.pred_rose or record["pred_std"] >= 0.01
        if step < cfg.run.collapse_after * cfg.run.steps or self.collapsed or not (
                record["target_std"] < 0.1 or (self.pred_rose and record["pred_std"] < 0.01)):
            return False, False
        self.collapsed = True
        msg = (f"representation collapse suspected at step {step}: target std {record['target_std']:.4f} (< 0.1) "
               f"or prediction std {record['pred_std']:.4f} (< 0.01)")
        self.say(f"Warning: {msg}")  # once, on the console (rank 0's); not also a UserWarning with file and line
        return False, cfg.run.collapse == "stop"


def drawn_record(pipeline: Pipeline, positions: int) -> dict[str, int]:
    """A mixture's samples drawn from each source by the first `positions` sample positions, as metrics (drawn_0,
    drawn_1, ... in --data order); nothing for one source."""
    counts = pipeline.order.drawn(positions)
    return {f"drawn_{k}": n for k, n in enumerate(counts)} if len(counts) > 1 else {}


def log_record(sums: torch.Tensor, step: int, lr: float, tau: float, rate: float, t: Trainer, skipped: int) -> dict:
    """The metrics row of update `step` from its summed statistics."""
    loss_v, count, t_std, p_std = sums.tolist()
    parts = t.plan.accum * t.dist.world
    record = {"step": step, "loss": loss_v / max(count, 1.0), "lr": lr, "tau": tau, "target_std": t_std / parts,
              "pred_std": p_std / parts, "samples_per_s": rate}
    if t.scaler.is_enabled():
        record["skipped_updates"] = skipped
    if t.device.type == "cuda":  # this process's high-water mark of allocated GPU memory so far
        record["peak_memory_mb"] = torch.cuda.max_memory_allocated(t.device) / 2**20
    return record


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg, run_dir: Path, fresh: bool, pipeline: Pipeline, console, say, progress: bool, wall0: float,
          dist, times) -> Summary:
    t = setup(cfg, pipeline, dist, fresh, say, times)
    total = cfg.run.steps
    checkpointer = Checkpointer(run_dir, t.model, t.optimizer, t.scaler, dist, t.strategy, cfg.run.checkpoint_every,
                                cfg.run.checkpoint_minutes, cfg.run.keep_checkpoints)
    step, batches_done = begin(t, run_dir, fresh, checkpointer, say)
    if step >= total:
        say(f"{run_dir} is complete: it ran all {total} steps; nothing to resume. "
            f"Export it with: d2v export checkpoint {run_dir} --out {run_dir}-encoder "
            f"(or extend it: d2v pretrain --out {run_dir} --resume --steps N, N above {total})")
        return Summary(run_dir, ckpt.latest_checkpoint(run_dir), step, last_logged(run_dir / METRICS, "loss"), 0.0,
                       time.perf_counter() - wall0, False, 0, False, complete=True)
    if dist.world > 1:
        say(f"{dist.world} processes ({t.strategy}, {dist.device.type}): {t.plan.describe()}")
    log = MetricsLog(run_dir, step, cfg.run.log, enabled=dist.is_main, config=cfg.to_dict(),
                     warn=lambda msg: say(f"Warning: {msg}"))
    monitor = _monitor(cfg, t.model, pipeline) if dist.is_main else None  # rank 0 evaluates the unsharded model
    # fp16 updates the grad scaler skips consume their batch without counting: the stream then runs past `total`.
    updates = (total - step) if not t.scaler.is_enabled() else 2**40
    batches = batch_loader(pipeline, t.plan, batches_done, updates, cfg.data.num_workers, dist.device.type == "cuda")
    t.model.train()
    loop = _Loop(cfg, t, checkpointer, log, monitor, Health(cfg, t.model, say, dist.is_main), say, step, batches_done)
    with log:  # closes the tracker runs: FINISHED, or KILLED / FAILED when an exception leaves
        with distributed.StopSignals() as stop, progress_bar(console, progress, total, step) as bar:
            try:
                loop.run(batches, stop, bar)
            except Exception:
                # An error mid-run (a file gone, a full disk): keep the updates done so far when the state is sound.
                if checkpointer.save_after_error(loop.step, loop.batches_done, t.in_update):
                    say(f"Stopped by an error at step {loop.step}; saved a checkpoint there. Fix the cause and "
                        f"continue with: d2v pretrain --out {run_dir} --resume")
                raise
        summary = loop.finish(run_dir, pipeline, wall0, stop)
        log.summary(summary_values(summary, run_dir))
        if summary.interrupted:
            log.close("KILLED")
    return summary


def summary_values(summary: Summary, run_dir: Path) -> dict:
    """The run's summary as the trackers and RUN/summary.json take it (the k-NN of the last evaluation, if any)."""
    values = {"steps": summary.steps, "final_loss": summary.final_loss, "samples_per_s": summary.samples_per_s,
              "wall_s": summary.wall_s, "interrupted": summary.interrupted, "collapsed": summary.collapsed,
              "skipped_files": summary.skipped_files, "checkpoint": str(Path(summary.checkpoint).resolve()) if summary.checkpoint else ""}
    for key in ("knn_student", "knn_teacher"):
        value = last_logged(run_dir / METRICS, key)
        if math.isfinite(value):
            values[key] = value
    if summary.slow_warning:
        values["warning"] = summary.slow_warning
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}


class _Loop:
    """The loop's state and its steps (run, then finish), kept apart from train() so that each fits on a screen."""

    def __init__(self, cfg, t: Trainer, checkpointer: Checkpointer, log: MetricsLog, monitor, health: Health, say,
                 step: int, batches_done: int):
        self.cfg, self.t, self.checkpointer, self.log, self.monitor, self.health = cfg, t, checkpointer, log, monitor, health
        self.say, self.step, self.batches_done = say, step, batches_done
        self.samples_seen = 0  # samples (utterances, images, blocks) of the updates this session ran
        self.last_loss, self.interrupted, self.diverged, self.skipped = float("nan"), False, "", 0
        self.window_rates: list[float] = []  # samples/s of each logged window: the slow-run warning
        self.budget_noted = False  # the k-NN monitor's time budget skipped an evaluation (said once)

    def run(self, batches, stop, bar) -> None:
        """Updates until the last step, a stop agreed by every process, or an error."""
        cfg, t, total = self.cfg, self.t, self.cfg.run.steps
        self.t_train = self.checkpointer.t_saved = t_log = time.perf_counter()
        samples_since = 0
        while self.step < total:
            sums, advanced, tau, lr = t.update(self.step, total, batches)
            samples = t.plan.samples(self.batches_done)  # a budget of audio samples: utterances vary by update
            self.batches_done, samples_since = self.batches_done + 1, samples_since + samples
            self.samples_seen += samples
            self.step, self.skipped = self.step + advanced, self.skipped + (not advanced)
            diverged_here = collapse_stop = False
            if advanced and (self.step % cfg.run.log_every == 0 or self.step == total):
                now = time.perf_counter()
                record = log_record(sums, self.step, lr, tau, samples_since / max(now - t_log, 1e-9), t, self.skipped)
                record.update(drawn_record(t.pipeline, t.plan.start(self.batches_done)))
                t_log, samples_since, self.last_loss = now, 0, record["loss"]
                self.window_rates.append(record["samples_per_s"])
                self.log.log(record)
                diverged_here, collapse_stop = self.health.check(record)
                bar.update(self.step, loss=record["loss"], lr=lr, tau=tau, rate=record["samples_per_s"])
            elif advanced:
                bar.update(self.step)
            if advanced:
                self._evaluate(bar)
            # Every decision to stop or save is taken together: one rank's signal, divergence or clock stops or
            # saves every rank at the same update, so no rank waits forever in a collective.
            signum, diverged_any, collapse_any, time_due = distributed.agree(
                [stop.signum, int(diverged_here), int(collapse_stop), int(self.checkpointer.time_due())], t.dist)
            if diverged_any:
                self.diverged = f"the loss became {self.last_loss} at step {self.step}"
                return
            if collapse_any:
                self.interrupted = True
                return
            if self.checkpointer.due(self.step, total, advanced, time_due):
                if distributed.agree([int(not finite(t.model))], t.dist)[0]:
                    self.diverged = f"the weights became non-finite by step {self.step}"
                    return
                self.checkpointer.save(self.step, self.batches_done)
            if signum:
                stop.signum, self.interrupted = signum, True
                self.say(f"Interrupted ({signal.Signals(signum).name}): saving a checkpoint at step {self.step}.")
                return

    def _evaluate(self, bar) -> None:
        """The k-NN monitor: every run.eval_every updates when the user set it; by default about ten times per run
        within the monitor's time budget (a line says when the budget first skips one); always at the last step."""
        m, total, explicit = self.monitor, self.cfg.run.steps, self.cfg.run.eval_every
        if m is None or not (self.step == total or self.step % (explicit or max(1, total // 10)) == 0):
            return
        if not explicit and self.step != total and not m.within_budget(time.perf_counter() - self.t_train):
            if not self.budget_noted:
                self.budget_noted = True
                bar.note(f"k-NN evaluation at step {self.step} skipped (and later ones while evaluating would take "
                         f"over {m.BUDGET:.0%} of the training time); --eval-every N evaluates every N steps")
            return
        knn = m.evaluate(self.t.model, self.t.device)
        self.log.log({"step": self.step, **knn})
        bar.note(f"k-NN top-1 teacher {knn['knn_teacher']:.3f} student {knn['knn_student']:.3f}")

    def finish(self, run_dir: Path, pipeline: Pipeline, wall0: float, stop) -> Summary:
        """The final checkpoint (unless diverged), the plot, and the summary."""
        t, checkpointer, step = self.t, self.checkpointer, self.step
        train_s = time.perf_counter() - self.t_train
        if self.monitor is not None and train_s > 0:
            self.say(f"k-NN monitor on {self.monitor.source}: {self.monitor.seconds:.1f} s, "
                     f"{100 * self.monitor.seconds / train_s:.1f}% of the training time")
        saved_step, saved_path = checkpointer.saved_step, checkpointer.saved_path
        if self.diverged:
            last = f"the last finite checkpoint is {saved_path.name}" if saved_path else (
                "no checkpoint was written before it" if saved_step == 0 else
                f"the last finite checkpoint is step {saved_step}")
            raise DivergedError(f"training diverged: {self.diverged}; {last} (lower --lr or raise "
                                "optim.warmup_fraction)")
        if step > saved_step:
            if distributed.agree([int(not finite(t.model))], t.dist)[0]:
                raise DivergedError(f"training diverged: the weights became non-finite by step {step}; "
                                    f"no checkpoint was written after step {saved_step}")
            saved_path = checkpointer.save(step, self.batches_done)
        elif saved_path is None and step > 0:
            saved_path = ckpt.latest_checkpoint(run_dir)
        skipped = distributed.union_pairs(pipeline.skipped_files(), t.dist)  # every rank's finds
        listed = None
        if t.dist.is_main:
            _plot_if_possible(run_dir)
            listed = write_skipped_files(run_dir, skipped)
        return Summary(run_dir=run_dir, checkpoint=saved_path, steps=step, final_loss=self.last_loss,
                       samples_per_s=self.samples_seen / max(train_s, 1e-9), wall_s=time.perf_counter() - wall0,
                       interrupted=self.interrupted or bool(stop.signum), skipped_files=len(skipped),
                       collapsed=self.health.collapsed, signal=stop.signum,
                       slow_warning=throughput_drop(self.window_rates),
                       drawn=tuple(drawn_record(pipeline, self.t.plan.start(self.batches_done)).values()),
                       skipped_text=skipped_summary(skipped, listed) if skipped else "")


# ---------------------------------------------------------------------------------------------- cost before the run
PROBE_SAMPLES = 4  # samples of the micro-batch whose FLOPs and activations are counted (d2v.runtime.cost)
TIMED_UPDATES = 5  # timed after one untimed warm-up; their mean (not the median: on a shared machine the run meets
# the other processes' load as these updates do, and the mean keeps it)
TIME_BUDGET_S = 20.0  # the timed updates use a smaller micro-batch (and are scaled) when the run's would take longer
MEMORY_SHARE = 0.5  # the probe and the timed updates use at most this share of the free memory


class FixedClock(NoTimes):
    """Times the parts of an update that do not grow with its samples (the optimizer step, the EMA update), so that
    an update timed on fewer samples scales only the rest."""

    FIXED = ("optimizer", "ema")

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in self.FIXED:
            yield
            return
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds += time.perf_counter() - start


def estimate_cost(cfg: PretrainConfig, pipeline: Pipeline, done: int = 0, say=print) -> cost.Estimate:
    """Parameters, FLOPs per update, memory per process and time per update of the run `cfg` describes, on this
    device, from one counted micro-batch and a few timed updates of the training loop's own update (how:
    d2v.runtime.cost). `done`: updates the run already has (resuming). Nothing is written. What would not fit in
    the memory free here is not run: then only the parameters and the state's memory are known (est.missing)."""
    device = resolve_device(cfg.run.device)
    world = distributed.env_world_size()
    plan = distributed.batch_plan(cfg.run.batch_size, cfg.run.grad_accum, world,
                                  budget=getattr(pipeline, "budget", None))
    if plan.budget is not None:  # speech by audio samples: estimated at the budget's mean utterances per micro-batch
        micro = max(1, round(plan.budget.mean_count() / (plan.accum * world)))
        plan = distributed.batch_plan(micro * plan.accum * world, plan.accum, world)
    baseline = cost.process_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    setup_peak = cost.peak_bytes(device) if device.type == "cpu" else 0  # reading the data, pixel statistics
    with torch.device("meta"):  # shapes only: nothing allocated
        est = cost.unprobed(build_objective(cfg), plan.micro, baseline)
    est.steps_left = max(0, cfg.run.steps - done)
    free = free_bytes(cfg.run.device)[0] * MEMORY_SHARE
    if free and est.weights + est.gradients + est.optimizer > free:
        est.missing = "the weights and the optimizer state alone need more than half the memory free here"
        return est
    t = setup(cfg, pipeline, distributed.Dist(device=device), False, say, NoTimes())
    t.model.train()
    b = min(plan.micro, PROBE_SAMPLES)
    t.plan = distributed.batch_plan(b, 1, 1)
    with cost.counting(t.model, b) as counts:
        t.update(0, cfg.run.steps, iter([(0, pipeline.micro_batch(0, b))]))
    est = cost.estimate(t.model, counts, plan.micro, plan.accum, world, baseline, est.steps_left)
    cost.reset_peak(device)
    start = time.perf_counter()  # one plain micro-batch of the probe's size: how long a sample takes here
    t.update(0, cfg.run.steps, iter([(b, pipeline.micro_batch(b, b))]))
    _sync(device)
    per_sample, small = (time.perf_counter() - start) / b, (b, cost.peak_bytes(device))
    budget = TIME_BUDGET_S / (TIMED_UPDATES + 1)  # per timed update
    fits = int((free - est.weights - est.gradients - est.optimizer) / max(est.activations / est.micro, 1)) if free \
        else plan.micro
    # at least twice the probe's samples: the growth of the peak between the two carries it to the run's micro-batch
    timed = min(plan.micro, max(2 * b, min(fits, int(budget / max(per_sample, 1e-9)))))
    exact = timed == plan.micro and per_sample * plan.micro * plan.accum <= budget
    t.plan = plan if exact else distributed.batch_plan(timed, 1, 1)  # else: micro-batches timed alone, scaled
    batches = batch_loader(pipeline, t.plan, 1, TIMED_UPDATES + 1, cfg.data.num_workers, device.type == "cuda")
    cost.reset_peak(device)
    seconds, fixed = [], []
    for k in range(TIMED_UPDATES + 1):
        t.times = clock = FixedClock(device)
        begin = time.perf_counter()
        t.update(k, cfg.run.steps, batches)
        _sync(device)
        if k:  # the first is a warm-up (workers starting, allocator growing)
            seconds.append(time.perf_counter() - begin)
            fixed.append(clock.seconds)
    mean, mean_fixed = sum(seconds) / len(seconds), sum(fixed) / len(fixed)
    est.timed_updates, est.timed_micro, est.timed_whole = seconds, timed, exact
    # scaled: the optimizer step and the EMA once per update, the rest per sample
    est.seconds_per_update = mean if exact else mean_fixed + (mean - mean_fixed) * plan.micro * plan.accum / timed
    est.peak = max(setup_peak, cost.scaled_peak(small, (timed, cost.peak_bytes(device)), plan.micro))
    return est


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _monitor(cfg: PretrainConfig, model: Data2Vec, pipeline: Pipeline):
    if not cfg.run.eval_data:
        return None
    tokenizer = getattr(pipeline, "tokenizer", None)
    if tokenizer is not None:  # text: the monitor tokenizes its labelled texts as the run does
        model.student.tokenizer = model.teacher.tokenizer = tokenizer
    return KnnMonitor(cfg.run.eval_data, model.student, seed=cfg.run.seed, skip_bad_files=cfg.data.skip_bad_files)


def _plot_if_possible(run_dir: Path) -> None:
    """metrics.png at the end of every run when matplotlib is installed (silently skipped otherwise)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    try:
        plot_run(run_dir)
    except UserError:
        pass
