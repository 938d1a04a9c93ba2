"""The `d2v` command line: pretrain, export, probe, env, bench."""
from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="data2vec self-supervised pretraining for vision, speech and text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: readable at 80 columns, no truncated option names
)
export_app = typer.Typer(help="Export a run's encoder.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(export_app, name="export")
console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn errors a user can cause into one red sentence and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from d2v.errors import UserError
        from d2v.ops.backends import BackendUnavailable

        try:
            return fn(*args, **kwargs)
        except (UserError, BackendUnavailable) as exc:
            _error(str(exc))
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
        except OSError as exc:  # the machine said no: a full disk, a vanished file, a permission
            where = f" ({exc.filename})" if exc.filename else ""
            _error(f"{exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper


def _error(message: str) -> None:
    """One red line on stderr; the message is user text, so rich markup in it is shown, not interpreted."""
    from rich.markup import escape

    err_console.print(f"[red]Error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


class Modality(str, Enum):
    vision = "vision"
    text = "text"
    speech = "speech"


class Recipe(str, Enum):
    v1 = "v1"
    v2 = "v2"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Compile(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Kernels(str, Enum):
    auto = "auto"
    torch = "torch"
    triton = "triton"
    cuda = "cuda"
    cpu = "cpu"


@app.command()
@user_errors
def pretrain(
    modality: Optional[Modality] = typer.Option(None, help="Which data2vec modality to pretrain. Default: vision "
                                                "(on --resume: the run's own)."),
    data: Optional[str] = typer.Option(None, help="Built-in dataset name (vision: digits, fashion-mnist; speech: "
                                       "default, asterisk; text: pydoc, fortunes) or a path: a folder of images or "
                                       "a .npy/.npz array (vision), a folder of .wav/.flac files (speech), a .txt "
                                       "file or a folder of .txt files (text). Default: the modality's embedded "
                                       "set (vision: digits, speech: default, text: pydoc)."),
    preset: Optional[str] = typer.Option(None, help="Named preset: tiny, small (CPU-sized), base, large. Default: tiny."),
    recipe: Optional[Recipe] = typer.Option(None, help="v1: data2vec 1.0 (the student encodes the whole masked "
                                            "input); v2: data2vec 2.0 (the student encodes only kept tokens of "
                                            "several masked clones per sample, a conv decoder predicts; much less "
                                            "compute per sample). Default: v1 (on --resume: the run's own)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer updates to run."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per optimizer update, all processes together (the "
                                             "global batch; each process takes batch / (processes x grad-accum))."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches each process accumulates per optimizer update."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    image_size: Optional[int] = typer.Option(None, help="Resize images to this size (vision)."),
    vocab_size: Optional[int] = typer.Option(None, help="Byte-level BPE vocabulary trained on the corpus (text)."),
    doc_per_line: bool = typer.Option(False, "--doc-per-line", help="One document per line, else one per file (text)."),
    tokenizer: Optional[str] = typer.Option(None, help="A tokenizer.json to use instead of training a BPE (text)."),
    out: Optional[Path] = typer.Option(None, help="Run directory. Default: runs/<modality>-[v2-]<preset>-<time>."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint; "
                                "options not given come from the run."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    precision: Optional[Precision] = typer.Option(None, help="Autocast precision; fp16 uses a gradient scaler."),
    kernels: Optional[Kernels] = typer.Option(None, help="Implementation of the hot ops (auto picks the fastest)."),
    compile_: Optional[Compile] = typer.Option(None, "--compile", help="torch.compile the student and teacher "
                                               "forward; auto: only where the compile time pays off (CUDA runs of "
                                               "at least 2000 updates; never on the CPU, where compiling takes "
                                               "minutes for a ~10% faster step)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (data order, masks, init)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Save a checkpoint every N updates (0: only at the end)."),
    num_workers: Optional[int] = typer.Option(None, min=0, help="DataLoader worker processes decoding batches (default: one "
                                              "per spare core, up to 8, for files; none for in-memory sets)."),
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="Skip unreadable files (counted) instead of stopping."),
    set_: List[str] = typer.Option([], "--set", help="Override any config field: --set optim.weight_decay=0.01 (repeatable)."),
    eval_data: Optional[str] = typer.Option(None, help="Labelled set for a live k-NN monitor of the student and "
                                            "the teacher (built-ins: their test split), logged to metrics.jsonl."),
    eval_every: Optional[int] = typer.Option(None, help="Updates between k-NN evaluations (default: ten per run)."),
    log: Optional[str] = typer.Option(None, help="'tensorboard': also write TensorBoard events to RUN/tb."),
    init_from: Optional[str] = typer.Option(None, help="Start from an encoder: a d2v export or run, or a "
                                            "transformers Data2Vec*Model directory (its layout is kept)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the fully resolved config and exit."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress (a bar on a terminal, "
                                  "plain lines otherwise)."),
):
    """Pretrain an encoder with data2vec and write a run directory (config, metrics, checkpoints).

    Ctrl-C or SIGTERM saves a checkpoint and exits with 130 / 143; --resume continues bit for bit."""
    from d2v.config import set_by_path
    from d2v.errors import ConfigError
    from d2v.presets import preset_config
    from d2v.train import load_run_config, pretrain as run_pretrain, validate

    overrides = {
        "data.source": data, "run.steps": steps, "run.batch_size": batch_size, "run.grad_accum": grad_accum,
        "optim.lr": lr, "data.image_size": image_size, "run.device": device,
        "run.precision": precision.value if precision else None, "run.kernels": kernels.value if kernels else None,
        "run.compile": compile_.value if compile_ else None,
        "run.seed": seed, "run.checkpoint_every": checkpoint_every, "data.num_workers": num_workers,
        "data.skip_bad_files": True if skip_bad_files else None,
        "data.vocab_size": vocab_size, "data.doc_per_line": True if doc_per_line else None,
        "data.tokenizer": tokenizer,
        "run.eval_data": eval_data, "run.eval_every": eval_every, "run.log": log, "run.init_from": init_from,
    }
    for item in set_:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    if image_size is not None:
        overrides["model.image_size"] = 0  # resize the data; the model follows it
    given = {k: v for k, v in overrides.items() if v is not None}
    if resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR naming the run to continue")
        cfg = load_run_config(out)
        _apply_resume_overrides(cfg, given, preset, modality.value if modality else None)
        if recipe is not None and recipe.value != cfg.recipe:
            raise ConfigError(f"--recipe cannot change when resuming (the run uses {cfg.recipe}); start a new run "
                              "instead")
    else:
        cfg = preset_config((modality or Modality.vision).value, preset, recipe.value if recipe else "v1")
        for key, value in given.items():
            set_by_path(cfg, key, value)
        cfg.data.source = _resolve_source(cfg.data.source)
        if cfg.data.tokenizer:
            cfg.data.tokenizer = str(Path(cfg.data.tokenizer).expanduser().resolve())
        cfg.run.eval_data = _resolve_source(cfg.run.eval_data) if cfg.run.eval_data else ""
        cfg.run.init_from = _resolve_source(cfg.run.init_from) if cfg.run.init_from else ""
    validate(cfg, memory=not dry_run)
    if dry_run:
        from d2v.data.pipeline import build_pipeline
        from d2v.distributed import batch_plan, env_world_size
        from d2v.validation import memory_problem

        if cfg.run.init_from:
            from d2v.train import adopt_layout

            adopt_layout(cfg)
        build_pipeline(cfg)  # resolves data-dependent fields
        validate(cfg, data_ready=True, memory=False)
        plan = batch_plan(cfg.run.batch_size, cfg.run.grad_accum, env_world_size())
        err_console.print(f"Batch: {plan.describe()} (under torchrun the process count is its world size)",
                          highlight=False, soft_wrap=True)
        console.print_json(cfg.to_json())
        if memory_problem(cfg):  # a dry run shows big configs on small machines, and says what a run would do
            err_console.print(f"Warning: {escape(memory_problem(cfg))}", highlight=False, soft_wrap=True)
        return
    from d2v.distributed import env_rank

    console.quiet = env_rank() > 0  # under torchrun, rank 0 reports for the run
    summary = run_pretrain(cfg, out=out, resume=resume, console=console, progress=progress)
    if summary.complete:
        return
    table = Table(title="pretrain summary", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths whole, folded if long: never cut with an ellipsis
    table.add_row("steps", f"{summary.steps} / {cfg.run.steps}" + ("  (stopped early)" if summary.interrupted else ""))
    table.add_row("final loss", f"{summary.final_loss:.4f}")
    table.add_row("throughput", f"{summary.samples_per_s:.1f} samples/s")
    table.add_row("wall time", f"{summary.wall_s:.1f} s")
    if summary.skipped_files:
        table.add_row("skipped files", str(summary.skipped_files))
    if summary.collapsed:
        table.add_row("warning", "representation collapse suspected (see metrics.jsonl)")
    if summary.slow_warning:
        table.add_row("warning", escape(summary.slow_warning))
    table.add_row("run directory", escape(str(summary.run_dir)))
    table.add_row("checkpoint", escape(str(summary.checkpoint)))
    console.print(table)
    if summary.interrupted and summary.steps < cfg.run.steps:
        console.print(f"Next: d2v pretrain --out {_quote(summary.run_dir)} --resume", soft_wrap=True,
                      highlight=False, markup=False)
    else:
        encoder_dir = summary.run_dir.with_name(summary.run_dir.name + "-encoder")
        console.print(f"Next: d2v export checkpoint {_quote(summary.run_dir)} --out {_quote(encoder_dir)}",
                      soft_wrap=True, highlight=False, markup=False)
    if summary.signal:
        raise typer.Exit(128 + summary.signal)


def _quote(path) -> str:
    import shlex

    return shlex.quote(str(path))


def _resolve_source(source: str) -> str:
    """A data path as an absolute path (so that --resume works from any directory); built-in names unchanged."""
    import os

    from d2v.validation import _is_builtin

    expanded = os.path.expanduser(source)
    if os.path.exists(expanded) and (os.sep in source or source.startswith((".", "~")) or not _is_builtin(source)):
        return str(Path(expanded).resolve())
    return expanded if source.startswith("~") else source


def _apply_resume_overrides(saved, given: dict, preset: Optional[str], modality: Optional[str]) -> None:
    """Resuming continues the saved run exactly: options not given come from the run; options that would change
    it are refused; only where it runs (device, workers) may change."""
    from d2v.config import PretrainConfig, from_dict, set_by_path
    from d2v.errors import ConfigError

    from d2v.train import RESUME_MAY_CHANGE

    allowed = set(RESUME_MAY_CHANGE)
    if preset is not None and preset != saved.preset:
        raise ConfigError(f"--preset cannot change when resuming (the run uses {saved.preset!r}); start a new run instead")
    if modality is not None and modality != saved.modality:
        raise ConfigError(f"--modality cannot change when resuming (the run is {saved.modality}); start a new run instead")
    changed = from_dict(PretrainConfig, saved.to_dict())
    for key, value in given.items():
        set_by_path(changed, key, value)
    if "data.source" in given:
        changed.data.source = _resolve_source(changed.data.source)
    for key in sorted(given.keys() - allowed):
        section, name = key.split(".", 1)
        before, after = getattr(getattr(saved, section), name), getattr(getattr(changed, section), name)
        if before != after and not (key == "model.image_size" and after == 0):
            raise ConfigError(f"{key} cannot change when resuming (saved: {before!r}); start a new run instead")
    for key in given.keys() & allowed:
        set_by_path(saved, key, given[key])


@export_app.command("checkpoint")
@user_errors
def export_checkpoint(
    run_dir: Path = typer.Argument(..., help="A run directory written by d2v pretrain (or one of its checkpoints)."),
    out: Path = typer.Option(..., help="New directory to write the encoder to (outside the run directory)."),
    weights: str = typer.Option("student", help="Which network to export: student or teacher (EMA)."),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="Also write OUT/hf, loadable by Hugging Face transformers "
                            "(v1 encoders and v2 text; transformers has no data2vec 2.0 image or speech class)."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export in OUT (written whole, then swapped)."),
):
    """Write a self-contained encoder directory (safetensors + config) and a transformers directory."""
    from d2v.export import export_checkpoint as run_export

    paths = run_export(run_dir, out, weights=weights, hf=hf, force=force)
    console.print(f"Encoder written to {escape(str(paths['d2v']))} (load with d2v.load_encoder)", highlight=False,
                  soft_wrap=True)
    if "hf" in paths:
        console.print(f"Hugging Face directory written to {escape(str(paths['hf']))} (load with transformers' "
                      "from_pretrained)", highlight=False, soft_wrap=True)
    if "hf_skipped" in paths:
        console.print(f"No Hugging Face directory: {escape(paths['hf_skipped'])}.", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def probe(
    path: Path = typer.Argument(..., help="An exported encoder directory or a run directory."),
    data: str = typer.Option("digits", help="Labelled data: a built-in name (text: fortunes, by category), a "
                             "folder with one sub-folder per class, or an .npz with images and labels."),
    random_init: bool = typer.Option(False, "--random-init", help="Probe the untrained architecture instead."),
    max_train: int = typer.Option(0, help="Use at most this many training items (0: all)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed for the random init and the subsample."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
    holdout: Optional[str] = typer.Option(None, help="Speech: test on the files whose path inside their class "
                                          "folder matches these comma-separated globs (e.g. 'en-sc_*' to hold out "
                                          "a voice) and train on the rest. Default: a stratified 80/20 split."),
):
    """Linear probe: logistic regression on frozen mean-pooled features; prints test accuracy."""
    from dataclasses import asdict

    from d2v.probe import probe_path
    from d2v.train import resolve_device

    dev = resolve_device(device)
    if json_out is not None:
        _check_writable_file(json_out, "--json")
    with console.status("Extracting features and fitting the probe..."):
        result = probe_path(path, data, random_init=random_init, max_train=max_train, device=dev, seed=seed,
                            holdout=[p for p in (holdout or "").split(",") if p])
    kind = "random-init" if random_init else "pretrained"
    console.print(f"Linear probe on {escape(data)} ({kind}): test accuracy {result.accuracy:.4f} "
                  f"(train {result.train_accuracy:.4f}; {result.n_train} train / {result.n_test} test, "
                  f"{result.n_classes} classes, {result.feature_dim}-dim features)")
    if json_out:
        from d2v.checkpoint import atomic_write_json

        atomic_write_json(json_out, {"data": data, "path": str(path), **asdict(result)})


def _check_writable_file(path: Path, what: str) -> None:
    """Fail before any work unless `path` can be written (its directory exists and is writable; not a directory)."""
    import os

    from d2v.errors import ConfigError

    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{what} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{what} {path} is not writable")


@app.command()
@user_errors
def finetune(
    encoder: Path = typer.Argument(..., help="The pretrained encoder: a d2v export or run, or a transformers "
                                   "Data2Vec*Model directory."),
    data: str = typer.Option("digits", help="Labelled data, as d2v probe takes it (built-in, class folders, .npz)."),
    out: Optional[Path] = typer.Option(None, help="Run directory. Default: runs/finetune-<time>."),
    resume: bool = typer.Option(False, "--resume", help="Continue the fine-tuning run in --out."),
    epochs: float = typer.Option(60.0, help="Passes that fine-tune the whole model (ignored with --steps)."),
    steps: int = typer.Option(0, help="Fine-tuning updates after the head-only ones (0: from --epochs)."),
    batch_size: int = typer.Option(64, help="Samples per update."),
    lr: float = typer.Option(0.0, help="Peak fine-tuning learning rate of the top block and the head (0: the "
                             "modality's: vision 3e-3, speech and text 1e-4)."),
    head_lr: float = typer.Option(1e-2, help="Peak learning rate of the head-only phase (--head-epochs)."),
    layer_decay: float = typer.Option(0.9, help="Learning-rate factor per block below the top (1: none; "
                                      "BEiT/data2vec ViT-B fine-tuning: 0.65 over 12 blocks)."),
    weight_decay: float = typer.Option(0.05, help="AdamW weight decay (not on biases, norms, tokens)."),
    label_smoothing: float = typer.Option(0.1, help="Cross-entropy label smoothing."),
    head_epochs: float = typer.Option(50.0, help="Passes that first train the head alone on the frozen encoder's "
                                      "embeddings (computed once, un-augmented) before --epochs fine-tune all of it "
                                      "(LP-FT; 0: fine-tune all from the start)."),
    holdout: Optional[str] = typer.Option(None, help="Speech: globs of the files to test on, as d2v probe."),
    random_init: bool = typer.Option(False, "--random-init", help="Fine-tune the untrained architecture (baseline)."),
    seed: int = typer.Option(0, help="Seed for the head, the order and the crops."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
):
    """Fine-tune an encoder for classification (mean-pooled last layer -> linear head); prints test accuracy.

    Ctrl-C or SIGTERM saves a checkpoint and exits with 130 / 143; --resume continues exactly."""
    import time

    from d2v.errors import ConfigError
    from d2v.finetune import FinetuneConfig, finetune as run_finetune

    if resume and out is None:
        raise ConfigError("--resume needs --out RUN_DIR naming the fine-tuning run to continue")
    out = out or Path("runs") / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = FinetuneConfig(encoder=str(encoder.expanduser().resolve()), data=_resolve_source(data), holdout=holdout or "",
                         epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, layer_decay=layer_decay,
                         weight_decay=weight_decay, label_smoothing=label_smoothing,
                         head_epochs=head_epochs, head_lr=head_lr, seed=seed,
                         random_init=random_init, device=device)
    summary = run_finetune(cfg, out, resume=resume, console=console, progress=progress)
    if summary.complete:
        return
    kind = "random-init" if random_init else "pretrained"
    console.print(f"Fine-tuned ({kind}) on {escape(data)}: test accuracy {summary.test_accuracy:.4f} after "
                  f"{summary.steps} steps ({summary.wall_s:.0f} s); run directory {escape(str(summary.run_dir))}",
                  highlight=False, soft_wrap=True)
    if summary.signal:
        console.print(f"Next: d2v finetune {_quote(encoder)} --out {_quote(summary.run_dir)} --resume",
                      soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(128 + summary.signal)


@app.command()
@user_errors
def plot(
    run_dir: Path = typer.Argument(..., help="A run directory written by d2v pretrain."),
    out: Optional[Path] = typer.Option(None, help="PNG to write. Default: RUN_DIR/metrics.png."),
):
    """Draw loss, learning rate, EMA tau, target/prediction std (and logged accuracies) against steps."""
    from d2v.plot import plot_run

    path = plot_run(run_dir, out)
    console.print(f"Wrote {escape(str(path))}", highlight=False, soft_wrap=True)


@app.command()
def env():
    """Versions, devices and the available op backends."""
    import platform

    import torch

    from d2v import __version__
    from d2v.ops import backends

    table = Table(title="d2v environment", show_header=False)
    table.add_row("d2v", __version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    for name in ("triton", "numpy", "transformers"):
        mod, why = backends._import(name)
        table.add_row(name, getattr(mod, "__version__", "?") if mod else f"not available ({why})")
    if torch.cuda.is_available():
        table.add_row("device", f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})")
    else:
        table.add_row("device", "cpu only (no CUDA device visible)")
    table.add_row("cpu threads", str(torch.get_num_threads()))
    console.print(table)
    ops_table = Table(title="op backends")
    for col in ("backend", "tensors", "available", "why"):
        ops_table.add_column(col)
    for name, device_type, ok, why in backends.report():
        ops_table.add_row(name, device_type, "[green]yes[/green]" if ok else "[red]no[/red]", why)
    console.print(ops_table)
    for device_type in ("cpu", "cuda"):
        if device_type == "cpu" or torch.cuda.is_available():
            console.print(f"auto on {device_type}: {backends.resolve('auto', device_type)}")


def _mount_bench() -> None:
    try:
        from d2v.bench.cli import app as bench_app
    except ImportError:
        return
    app.add_typer(bench_app, name="bench", help="Benchmarks: the hot ops, end-to-end pretraining per process count.")


_mount_bench()


def main() -> None:
    from d2v.threads import apply_env

    apply_env()  # before anything imports torch: OpenMP reads its wait policy and thread count once, at load
    app()


if __name__ == "__main__":
    sys.exit(main())
