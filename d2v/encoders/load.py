"""Encoders on disk: a d2v encoder directory (config.json + model.safetensors, and the tokenizer of a text encoder),
a run directory read as its student (or teacher), or a transformers Data2Vec*Model directory; read without ever
unpickling, built, and loaded as an nn.Module."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from d2v.core.device import resolve_device
from d2v.core.errors import CheckpointError
from d2v.core.tokenizer import load_tokenizer, tokenizer_sha256
from d2v.encoders import hf_import
from d2v.encoders.classifier import Classifier, build_classifier, read_head
from d2v.models import build_encoder
from d2v.runtime import checkpoint as ckpt

ENCODER_FORMAT = "d2v-encoder"
TOKENIZER = "tokenizer.json"  # text: the run's byte-level BPE, kept beside the weights


def encoder_state_from_run(run_dir: Path, weights: str = "student") -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(model config dict, encoder tensors, provenance) from a run directory's newest checkpoint."""
    model_cfg, enc, source, _ = run_state(run_dir, weights)
    return model_cfg, enc, source


def run_state(run_dir: Path, weights: str = "student") -> tuple[dict, dict[str, torch.Tensor], dict, tuple | None]:
    """encoder_state_from_run's (model config dict, encoder tensors, provenance), and for a fine-tuning run its
    classifier as (description {"head", "labels"}, head tensors) from the same checkpoint (else None)."""
    if weights not in ("student", "teacher"):
        raise CheckpointError(f"--weights must be 'student' or 'teacher', got {weights!r}")
    cfg = ckpt.read_run_config(run_dir)
    path, tensors, _, state = ckpt.read_latest(run_dir)
    prefix = f"{weights}."
    enc = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not enc:
        raise CheckpointError(f"checkpoint {path} holds no {weights} weights")
    source = {"run": str(Path(run_dir).resolve()), "step": state["step"], "weights": weights,
              "preset": cfg.get("preset")}
    head = None
    if cfg.get("kind") == "finetune":
        rest = {k: v for k, v in tensors.items() if not k.startswith("student.")}
        if "head.weight" not in rest:
            raise CheckpointError(f"checkpoint {path} of a fine-tuning run holds no head weights")
        classes = rest["head.weight"].shape[0]
        labels = cfg.get("labels") or [str(i) for i in range(classes)]  # runs from before the labels were saved
        head = ({"head": cfg.get("finetune", {}).get("head", "mean"), "labels": labels}, rest)
    return cfg["model"], enc, source, head


def is_export(path: Path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("format") == ENCODER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def run_file(run_dir: Path, name: str) -> Path | None:
    """A file kept beside a run's config (the run directory, or two levels above one of its checkpoints)."""
    run_dir = Path(run_dir)
    return next((d / name for d in (run_dir, run_dir.parent.parent) if (d / name).exists()), None)


def attach_tokenizer(encoder: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Text encoders tokenize strings themselves, with the tokenizer saved beside their weights."""
    if encoder.cfg.modality != "text":
        return encoder
    file = run_file(path, TOKENIZER)
    if file is None:
        return encoder  # ids still work; strings raise a clear error
    tokenizer = load_tokenizer(file)
    if encoder.cfg.tokenizer_sha256 and tokenizer_sha256(tokenizer) != encoder.cfg.tokenizer_sha256:
        raise CheckpointError(f"{file} is not the tokenizer this encoder was trained with")
    encoder.tokenizer = tokenizer
    return encoder


def read_encoder(path: str | Path, weights: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, encoder tensors) of a d2v export, a d2v run directory (its student) or a transformers
    Data2Vec*Model directory; with weights=False only the config is read (tensors empty)."""
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
            return hf_import.model_config(meta, hf_import.read_json(path / "preprocessor_config.json")), {}
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


def encoder_from(path: str | Path, weights: bool = True, seed: int | None = None) -> torch.nn.Module:
    """The encoder of an export, a run or a transformers directory, built (after torch.manual_seed(seed) when a
    seed is given) with its weights loaded unless weights=False (the untrained architecture), its tokenizer
    attached; in training mode, on the CPU."""
    path = Path(path).expanduser()
    model_cfg, tensors = read_encoder(path, weights=weights)
    if seed is not None:
        torch.manual_seed(seed)
    return attach_tokenizer(_built(model_cfg, tensors if weights else None, path), path)


def _built(model_cfg: dict, tensors: dict[str, torch.Tensor] | None, path: Path) -> torch.nn.Module:
    """The encoder of a model config, with `tensors` loaded (None: as initialized)."""
    encoder = build_encoder(model_cfg)
    if tensors is not None:
        try:
            encoder.load_state_dict(tensors)
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {path} do not match its config: {str(exc).splitlines()[0]}") from None
    return encoder


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An exported encoder, a run directory's student or a transformers Data2Vec*Model directory, as an nn.Module
    in eval mode.

    Vision: enc(images) takes float (B, C, H, W) in [0, 1] (or uint8) and returns the last hidden states
    (B, 1 + N, D); enc.embed(images) returns the mean-pooled patch representation (B, D).
    Text: enc(list_of_strings) tokenizes with the saved tokenizer.json and returns (hidden (B, T, D), attention mask
    (B, T)); token ids (B, T) work too; enc.embed(...) returns the mean over real tokens (B, D).
    """
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    return encoder_from(path).to(device).eval()


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """The fine-tuned classifier of an export (`d2v export checkpoint` of a fine-tuning run) or of a fine-tuning run
    directory, in eval mode: model((inputs,)) -> logits (B, classes); model.labels names the classes."""
    path = Path(path).expanduser()
    read_encoder(path, weights=False)  # a clear error for a path that holds no encoder at all
    found = None
    if is_export(path):
        encoder, found = encoder_from(path), read_head(path)
    elif not hf_import.is_hf_dir(path):  # a run directory: encoder and head from one checkpoint
        model_cfg, tensors, _, found = run_state(path)
        encoder = _built(model_cfg, tensors, path)
    if hf_import.is_hf_dir(path):
        raise CheckpointError(f"{path} is a transformers directory; d2v predicts with a fine-tuning run or its d2v "
                              "export (transformers loads this one itself)")
    if found is None:
        raise CheckpointError(f"{path} holds an encoder without a classifier; fine-tune it first (d2v finetune) "
                              "and predict with the fine-tuning run or its export")
    info, tensors = found
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    return build_classifier(attach_tokenizer(encoder, path), info, tensors, path).to(device).eval()


def random_encoder(path: str | Path, seed: int = 0) -> torch.nn.Module:
    """The untrained architecture of an exported encoder or run (for baselines), in eval mode."""
    return encoder_from(path, weights=False, seed=seed).eval()
