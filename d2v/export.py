"""`d2v export checkpoint`: a run's encoder as a self-contained d2v directory (safetensors + JSON config) that
d2v.load_encoder reads, and a Hugging Face transformers directory (Data2Vec*Model layout). `d2v export onnx`: an
encoder as one ONNX file (d2v.encoders.onnx_export says what the graph computes), checked in onnxruntime before it
is written."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2v.core.errors import CheckpointError, ConfigError
from d2v.core.files import FILE_MODE, atomic_write_bytes, atomic_write_json, fsync_dir
from d2v.encoders import hf_export, onnx_export
from d2v.encoders.classifier import HEAD_FILE
from d2v.encoders.load import (ENCODER_FORMAT, TOKENIZER, encoder_from, is_export, read_encoder, run_file,
                               run_state)
from d2v.models import build_encoder
from d2v.runtime.rundir import check_writable_dir, enclosing_run


def export_checkpoint(run_dir: Path, out: Path, weights: str = "student", hf: bool = True,
                      force: bool = False) -> dict[str, Path]:
    """Write OUT/{config.json, model.safetensors} (d2v) and, with hf, OUT/hf/ (transformers). Returns the paths;
    when the encoder has no transformers equivalent (data2vec 2.0 images and speech), no OUT/hf and the reason
    under "hf_skipped". A fine-tuning run also gets its classifier: OUT/head.safetensors with the label names in
    OUT/config.json (d2v.load_classifier, d2v predict), and OUT/hf is then the transformers
    Data2Vec...For...Classification model with id2label (or, where none computes the same logits, the encoder
    alone and the reason under "hf_head_skipped").

    The directory is written whole under a temporary name and renamed into place, so OUT is either the complete
    new export or untouched. An existing non-empty OUT is replaced only with force, and only if it is an export."""
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    _check_export_target(run_dir, out, force)
    model_cfg, tensors, source, classifier = run_state(run_dir, weights)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"the {weights} weights of {source['run']} (step {source['step']}) are not finite "
                              f"({len(bad)} tensors, e.g. {bad[0]}): the run diverged; export an earlier checkpoint")
    encoder = build_encoder(model_cfg)
    try:
        encoder.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match the run's model config: {str(exc).splitlines()[0]}") from None
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    tokenizer = run_file(run_dir, TOKENIZER)
    hf_skipped = hf_export.unmappable(model_cfg) if hf else ""
    hf = hf and not hf_skipped
    head_skipped = hf_export.classifier_unmappable(model_cfg, classifier[0]["head"]) if hf and classifier else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", state)
        meta = {"format": ENCODER_FORMAT, "version": 1, "model": model_cfg, "source": source}
        if classifier is not None:
            write_safetensors(tmp / HEAD_FILE, classifier[1])
            meta["classifier"] = classifier[0]
        atomic_write_json(tmp / "config.json", meta)
        if tokenizer is not None:
            atomic_write_bytes(tmp / TOKENIZER, tokenizer.read_bytes())
        if hf:
            hf_dir = tmp / "hf"
            hf_dir.mkdir()
            if classifier is not None and not head_skipped:
                hf_config, hf_tensors, extra_files = hf_export.convert_classifier(model_cfg, state, *classifier)
            else:
                hf_config, hf_tensors, extra_files = hf_export.convert(model_cfg, state)
            write_safetensors(hf_dir / "model.safetensors", hf_tensors, {"format": "pt"})
            hf_class = hf_config["architectures"][0]
            atomic_write_json(hf_dir / "config.json", hf_config)
            for name, content in extra_files.items():
                atomic_write_json(hf_dir / name, content)
            if tokenizer is not None:
                atomic_write_bytes(hf_dir / TOKENIZER, tokenizer.read_bytes())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {"d2v": out}
    if hf:
        paths["hf"], paths["hf_class"] = out / "hf", hf_class
    if hf_skipped:
        paths["hf_skipped"] = hf_skipped
    if head_skipped:
        paths["hf_head_skipped"] = head_skipped
    if classifier is not None:
        paths["labels"] = classifier[0]["labels"]
    return paths


def _check_export_target(run_dir: Path, out: Path, force: bool) -> None:
    """OUT must be new, empty, or (with force) an earlier export: never a run directory or anything inside one."""
    inside = enclosing_run(out)
    if inside is not None:
        where = "is" if inside == out.resolve() else "lies inside"
        raise CheckpointError(f"--out {out} {where} the run directory {inside}; export to a directory outside runs "
                              "(exporting there would overwrite the run's files)")
    if out.resolve() in (run_dir.resolve(), *run_dir.resolve().parents) and out.exists():
        raise CheckpointError(f"--out {out} contains the run being exported; choose a new directory")
    check_writable_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        if not is_export(out):
            raise CheckpointError(f"--out {out} is a non-empty directory that is not a d2v export; choose a new "
                                  "or empty directory")
        if not force:
            raise CheckpointError(f"--out {out} already holds an export; pass --force to replace it")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`; an earlier `out` is swapped out first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, FILE_MODE)
    tmp.replace(path)


ONNX_TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| accepted, fp32 (measured: 1e-6 .. 6e-6 for the presets)


def onnx_tokenizer_path(out: Path) -> Path:
    """Where a text graph's tokenizer goes: enc.onnx -> enc.tokenizer.json."""
    return out.with_name(out.stem + ".tokenizer.json")


def export_onnx(encoder_path: Path, out: Path, force: bool = False, tolerance: float = ONNX_TOLERANCE) -> dict:
    """Write the ONNX graph of the encoder at `encoder_path` (a d2v export or run, or a transformers directory) to
    `out`, and for text its tokenizer.json to onnx_tokenizer_path(out). Returns {"onnx", "tokenizer" (or None),
    "max_abs_diff", "modality", "inputs", "outputs"}.

    The graph is checked in onnxruntime against the PyTorch encoder before anything is written; a difference over
    `tolerance` is an error. Each file is written whole (temporary file, then rename); an existing file is replaced
    only with force."""
    encoder_path, out = Path(encoder_path).expanduser(), Path(out).expanduser()
    onnx_export.check_installed()
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ConfigError(f"--tolerance must be a positive number, got {tolerance}")
    _check_onnx_target(out, force)
    encoder = encoder_from(encoder_path)
    modality = encoder.cfg.modality
    tokenizer = run_file(encoder_path, TOKENIZER) if modality == "text" else None
    targets = [out] + ([onnx_tokenizer_path(out)] if tokenizer is not None else [])
    for path in targets[1:]:
        _check_onnx_target(path, force)
    model_cfg, _ = read_encoder(encoder_path, weights=False)
    model = onnx_export.export_graph(encoder, {"format": "d2v-onnx", "version": 1, "model": model_cfg,
                                               "source": str(encoder_path.resolve())})
    data = model.SerializeToString()
    diff = onnx_export.check_graph(data, encoder)
    if not diff <= tolerance:
        raise onnx_export.OnnxExportError(f"onnxruntime's outputs differ from PyTorch's by up to {diff:.3g} "
                                          f"(more than --tolerance {tolerance:g}); nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        atomic_write_bytes(onnx_tokenizer_path(out), tokenizer.read_bytes())
    atomic_write_bytes(out, data)
    graph = onnx_export.GRAPHS[modality]
    return {"onnx": out, "tokenizer": onnx_tokenizer_path(out) if tokenizer is not None else None,
            "max_abs_diff": diff, "modality": modality, "inputs": graph.input_names, "outputs": graph.output_names}


def _check_onnx_target(path: Path, force: bool) -> None:
    """A file to write: not a directory, not inside a run directory, new unless force."""
    if path.is_dir():
        raise CheckpointError(f"--out {path} is a directory; name the .onnx file to write")
    inside = enclosing_run(path.parent) if path.parent.exists() else None
    if inside is not None:
        raise CheckpointError(f"--out {path} lies inside the run directory {inside}; export outside runs")
    check_writable_dir(path.parent, "the folder of --out")
    if path.exists() and not force:
        raise CheckpointError(f"{path} already exists; pass --force to replace it")
