"""Export a run's encoder: a self-contained d2v directory (safetensors + JSON config) that load_encoder reads,
and a Hugging Face transformers directory (Data2Vec*Model layout)."""
from __future__ import annotations

import json
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


def export_checkpoint(run_dir: Path, out: Path, weights: str = "student", hf: bool = True) -> dict[str, Path]:
    """Write OUT/{config.json, model.safetensors} (d2v) and, with hf, OUT/hf/ (transformers). Returns the paths."""
    model_cfg, tensors, source = encoder_state_from_run(run_dir, weights)
    encoder = _build(model_cfg)
    try:
        encoder.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match the run's model config: {str(exc).splitlines()[0]}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    _write_safetensors(out / "model.safetensors", state)
    ckpt.atomic_write_json(out / "config.json", {"format": ENCODER_FORMAT, "version": 1, "model": model_cfg,
                                                 "source": source})
    tokenizer = _run_file(run_dir, TOKENIZER)
    if tokenizer is not None:
        ckpt.atomic_write_bytes(out / TOKENIZER, tokenizer.read_bytes())
    paths = {"d2v": out}
    if hf:
        from d2v import hf_export

        hf_dir = out / "hf"
        hf_dir.mkdir(exist_ok=True)
        hf_config, hf_tensors, extra_files = hf_export.convert(model_cfg, state)
        _write_safetensors(hf_dir / "model.safetensors", hf_tensors, {"format": "pt"})
        ckpt.atomic_write_json(hf_dir / "config.json", hf_config)
        for name, content in extra_files.items():
            ckpt.atomic_write_json(hf_dir / name, content)
        if tokenizer is not None:
            ckpt.atomic_write_bytes(hf_dir / TOKENIZER, tokenizer.read_bytes())
        paths["hf"] = hf_dir
    return paths


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
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


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An exported encoder (or a run directory's student) as an nn.Module in eval mode.

    Vision: enc(images) takes float (B, C, H, W) in [0, 1] and returns the last hidden states (B, 1 + N, D);
    enc.embed(images) returns the mean-pooled patch representation (B, D).
    Text: enc(list_of_strings) tokenizes with the saved tokenizer.json and returns (hidden (B, T, D), attention mask
    (B, T)); token ids (B, T) work too; enc.embed(...) returns the mean over real tokens (B, D).
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path} is not an exported encoder or a run directory (no config.json)")
    try:
        meta = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"cannot parse {config_path}: {exc}") from None
    if meta.get("format") == ENCODER_FORMAT:
        model_cfg = meta["model"]
        try:
            tensors = load_file(str(path / "model.safetensors"))
        except Exception as exc:
            raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {exc}") from None
    elif "modality" in meta and "model" in meta:  # a run directory
        model_cfg, tensors, _ = encoder_state_from_run(path)
    else:
        raise CheckpointError(f"{config_path} is not a d2v encoder config")
    encoder = _build(model_cfg)
    try:
        encoder.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not match its config: {str(exc).splitlines()[0]}") from None
    return _attach_tokenizer(encoder, path).to(device).eval()


def random_encoder(path: str | Path, seed: int = 0) -> torch.nn.Module:
    """The untrained architecture of an exported encoder or run (for baselines), in eval mode."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    if meta is None:
        raise CheckpointError(f"{path} is not an exported encoder or a run directory (no config.json)")
    torch.manual_seed(seed)
    return _attach_tokenizer(_build(meta["model"]), path).eval()
