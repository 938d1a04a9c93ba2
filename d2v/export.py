"""Export a run's encoder: a self-contained d2v directory (safetensors + JSON config) that load_encoder reads,
and a Hugging Face transformers directory (Data2Vec*Model layout)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from d2v import checkpoint as ckpt
from d2v.config import MODEL_CONFIGS, from_dict
from d2v.errors import CheckpointError
from d2v.models import build_encoder

ENCODER_FORMAT = "d2v-encoder"
TOKENIZER = "tokenizer.json"  # text: the run's byte-level BPE, kept beside the weights


def encoder_state_from_run(run_dir: Path, weights: str = "student") -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(model config dict, encoder tensors, provenance) from a run directory's newest checkpoint."""
    if weights not in ("student", "teacher"):
        raise CheckpointError(f"--weights must be 'student' or 'teacher', got {weights!r}")
    cfg = ckpt.read_run_config(run_dir)
    path, tensors, _, state = ckpt.read_latest(run_dir)
    prefix = f"{weights}."
    enc = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not enc:
        raise CheckpointError(f"checkpoint {path} holds no {weights} weights")
    return cfg["model"], enc, {"run": str(Path(run_dir).resolve()), "step": state["step"], "weights": weights,
                              "preset": cfg.get("preset")}


def export_checkpoint(run_dir: Path, out: Path, weights: str = "student", hf: bool = True,
                      force: bool = False) -> dict[str, Path]:
    """Write OUT/{config.json, model.safetensors} (d2v) and, with hf, OUT/hf/ (transformers). Returns the paths;
    when the encoder has no transformers equivalent (data2vec 2.0 images and speech), no OUT/hf and the reason
    under "hf_skipped".

    The directory is written whole under a temporary name and renamed into place, so OUT is either the complete
    new export or untouched. An existing non-empty OUT is replaced only with force, and only if it is an export."""
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    _check_export_target(run_dir, out, force)
    model_cfg, tensors, source = encoder_state_from_run(run_dir, weights)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"the {weights} weights of {source['run']} (step {source['step']}) are not finite "
                              f"({len(bad)} tensors, e.g. {bad[0]}): the run diverged; export an earlier checkpoint")
    encoder = _build(model_cfg)
    try:
        encoder.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match the run's model config: {str(exc).splitlines()[0]}") from None
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    tokenizer = _run_file(run_dir, TOKENIZER)
    from d2v import hf_export

    hf_skipped = hf_export.unmappable(model_cfg) if hf else ""
    hf = hf and not hf_skipped
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_safetensors(tmp / "model.safetensors", state)
        ckpt.atomic_write_json(tmp / "config.json", {"format": ENCODER_FORMAT, "version": 1, "model": model_cfg,
                                                     "source": source})
        if tokenizer is not None:
            ckpt.atomic_write_bytes(tmp / TOKENIZER, tokenizer.read_bytes())
        if hf:
            hf_dir = tmp / "hf"
            hf_dir.mkdir()
            hf_config, hf_tensors, extra_files = hf_export.convert(model_cfg, state)
            _write_safetensors(hf_dir / "model.safetensors", hf_tensors, {"format": "pt"})
            ckpt.atomic_write_json(hf_dir / "config.json", hf_config)
            for name, content in extra_files.items():
                ckpt.atomic_write_json(hf_dir / name, content)
            if tokenizer is not None:
                ckpt.atomic_write_bytes(hf_dir / TOKENIZER, tokenizer.read_bytes())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    paths = {"d2v": out}
    if hf:
        paths["hf"] = out / "hf"
    if hf_skipped:
        paths["hf_skipped"] = hf_skipped
    return paths


def _check_export_target(run_dir: Path, out: Path, force: bool) -> None:
    """OUT must be new, empty, or (with force) an earlier export: never a run directory or anything inside one."""
    from d2v.rundir import check_writable_dir, enclosing_run

    inside = enclosing_run(out)
    if inside is not None:
        where = "is" if inside == out.resolve() else "lies inside"
        raise CheckpointError(f"--out {out} {where} the run directory {inside}; export to a directory outside runs "
                              "(exporting there would overwrite the run's files)")
    if out.resolve() in (run_dir.resolve(), *run_dir.resolve().parents) and out.exists():
        raise CheckpointError(f"--out {out} contains the run being exported; choose a new directory")
    check_writable_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        if not _is_export(out):
            raise CheckpointError(f"--out {out} is a non-empty directory that is not a d2v export; choose a new "
                                  "or empty directory")
        if not force:
            raise CheckpointError(f"--out {out} already holds an export; pass --force to replace it")


def _is_export(path: Path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("format") == ENCODER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`; an earlier `out` is swapped out first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    ckpt._fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, ckpt.FILE_MODE)
    tmp.replace(path)


def _run_file(run_dir: Path, name: str) -> Path | None:
    """A file kept beside a run's config (the run directory, or two levels above one of its checkpoints)."""
    run_dir = Path(run_dir)
    return next((d / name for d in (run_dir, run_dir.parent.parent) if (d / name).exists()), None)


def _attach_tokenizer(encoder: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Text encoders tokenize strings themselves, with the tokenizer saved beside their weights."""
    if encoder.cfg.modality != "text":
        return encoder
    from d2v.data.text import load_tokenizer, tokenizer_sha256

    file = _run_file(path, TOKENIZER)
    if file is None:
        return encoder  # ids still work; strings raise a clear error
    tokenizer = load_tokenizer(file)
    if encoder.cfg.tokenizer_sha256 and tokenizer_sha256(tokenizer) != encoder.cfg.tokenizer_sha256:
        raise CheckpointError(f"{file} is not the tokenizer this encoder was trained with")
    encoder.tokenizer = tokenizer
    return encoder


def _build(model_cfg: dict) -> torch.nn.Module:
    cls = MODEL_CONFIGS.get(model_cfg.get("modality"))
    if cls is None:
        raise CheckpointError(f"unknown modality {model_cfg.get('modality')!r} in the model config")
    return build_encoder(from_dict(cls, model_cfg))


def read_encoder(path: str | Path, weights: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, encoder tensors) of a d2v export, a d2v run directory (its student) or a transformers
    Data2Vec*Model directory; with weights=False only the config is read (tensors empty)."""
    from d2v import hf_import

    path = Path(path).expanduser()
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path} is not an exported encoder, a run directory or a transformers model "
                              "(no config.json)")
    try:
        meta = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"cannot parse {config_path}: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path} is not a d2v encoder config")
    if hf_import.is_hf_dir(path):
        if not weights:
            return hf_import.model_config(meta, hf_import._read_json(path / "preprocessor_config.json")), {}
        return hf_import.load_hf(path)
    if meta.get("format") == ENCODER_FORMAT:
        if not weights:
            return meta["model"], {}
        try:
            return meta["model"], load_file(str(path / "model.safetensors"))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file to the user
            raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {exc}") from None
    if "modality" in meta and "model" in meta:  # a run directory
        if not weights:
            return meta["model"], {}
        model_cfg, tensors, _ = encoder_state_from_run(path)
        return model_cfg, tensors
    raise CheckpointError(f"{config_path} is not a d2v encoder config")


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An exported encoder, a run directory's student or a transformers Data2Vec*Model directory, as an nn.Module
    in eval mode.

    Vision: enc(images) takes float (B, C, H, W) in [0, 1] (or uint8) and returns the last hidden states
    (B, 1 + N, D); enc.embed(images) returns the mean-pooled patch representation (B, D).
    Text: enc(list_of_strings) tokenizes with the saved tokenizer.json and returns (hidden (B, T, D), attention mask
    (B, T)); token ids (B, T) work too; enc.embed(...) returns the mean over real tokens (B, D).
    """
    from d2v.train import resolve_device

    path = Path(path).expanduser()
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    model_cfg, tensors = read_encoder(path)
    encoder = _build(model_cfg)
    try:
        encoder.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not match its config: {str(exc).splitlines()[0]}") from None
    return _attach_tokenizer(encoder, path).to(device).eval()


def random_encoder(path: str | Path, seed: int = 0) -> torch.nn.Module:
    """The untrained architecture of an exported encoder or run (for baselines), in eval mode."""
    path = Path(path).expanduser()
    model_cfg, _ = read_encoder(path, weights=False)
    torch.manual_seed(seed)
    return _attach_tokenizer(_build(model_cfg), path).eval()
