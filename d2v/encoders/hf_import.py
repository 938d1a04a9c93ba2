"""Hugging Face transformers Data2Vec{Vision,Audio,Text}Model directory -> d2v encoder config and weights: the
inverse of d2v.encoders.hf_export, for continuing pretraining from a published model.

The tensor mapping is not written twice: hf_export.convert maps a d2v state dict to HF names with views (chunks
of qkv, renames), so feeding it d2v tensors and writing each HF tensor into the view it returns fills the d2v
tensors. A d2v element that no HF tensor reaches is reported by name. Nothing is unpickled: weights are read
from model.safetensors only."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from d2v.core.config import MODEL_CONFIGS
from d2v.core.errors import CheckpointError
from d2v.encoders import hf_export
from d2v.models import build_encoder

MODEL_TYPES = {"data2vec-vision": "vision", "data2vec-audio": "speech", "data2vec-text": "text"}
OPTIONAL = {"mask_token", "mask_emb"}  # inference-only exports may lack the mask embedding: it starts fresh


def is_hf_dir(path: Path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") in MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError as exc:
        raise CheckpointError(f"cannot parse {path}: {exc}") from None


def model_config(hf: dict, pre: dict) -> dict:
    """The d2v model config (as a dict) that an HF config describes; refuse layouts d2v does not have."""
    try:
        return _model_config(hf, pre)
    except KeyError as exc:
        raise CheckpointError(f"the transformers config.json lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"the transformers config.json has an invalid value ({exc})") from None


def _model_config(hf: dict, pre: dict) -> dict:
    modality = MODEL_TYPES.get(hf.get("model_type"))
    if modality is None:
        raise CheckpointError(f"model_type {hf.get('model_type')!r} is not a transformers data2vec model")
    m = dataclasses.asdict(MODEL_CONFIGS[modality]())
    common = {"dim": hf["hidden_size"], "depth": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
              "ln_eps": hf.get("layer_norm_eps", m["ln_eps"])}
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} differs from d2v's gelu")
    m.update(common)
    if modality == "vision":
        if hf.get("use_relative_position_bias") or not hf.get("use_shared_relative_position_bias", False) \
                or hf.get("use_absolute_position_embeddings"):
            raise CheckpointError("d2v vision encoders use one shared relative position bias; this model has "
                                  "per-layer or absolute position embeddings")
        c = hf.get("num_channels", 3)
        m.update(image_size=hf["image_size"], patch_size=hf["patch_size"], in_chans=c,
                 mlp_ratio=hf["intermediate_size"] / hf["hidden_size"],
                 layer_scale_init=hf.get("layer_scale_init_value", m["layer_scale_init"]),
                 pixel_mean=list(pre.get("image_mean", [0.5] * c)), pixel_std=list(pre.get("image_std", [0.5] * c)))
    elif modality == "speech":
        if hf.get("feat_extract_norm", "layer") != "layer" or hf.get("conv_bias", False):
            raise CheckpointError("d2v speech encoders use layer-norm conv blocks without bias")
        m.update(ffn_dim=hf["intermediate_size"], conv_dim=list(hf["conv_dim"]), conv_kernel=list(hf["conv_kernel"]),
                 conv_stride=list(hf["conv_stride"]), pos_conv_depth=hf["num_conv_pos_embeddings"],
                 pos_conv_kernel=hf["conv_pos_kernel_size"], pos_conv_groups=hf["num_conv_pos_embedding_groups"],
                 dropout=hf.get("hidden_dropout", m["dropout"]),
                 attention_dropout=hf.get("attention_dropout", m["attention_dropout"]),
                 activation_dropout=hf.get("activation_dropout", m["activation_dropout"]),
                 layerdrop=hf.get("layerdrop", m["layerdrop"]), sample_rate=pre.get("sampling_rate", m["sample_rate"]))
    else:
        pad = hf.get("pad_token_id", 1)
        m.update(vocab_size=hf["vocab_size"], ffn_dim=hf["intermediate_size"], pad_id=pad,
                 max_length=hf["max_position_embeddings"] - pad - 1,
                 dropout=hf.get("hidden_dropout_prob", m["dropout"]),
                 attention_dropout=hf.get("attention_probs_dropout_prob", m["attention_dropout"]))
    return m


def load_hf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(d2v model config dict, d2v encoder state) of a transformers Data2Vec*Model directory."""
    path = Path(path)
    hf = read_json(path / "config.json")
    model_cfg = model_config(hf, read_json(path / "preprocessor_config.json"))
    weights = path / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{path} has no model.safetensors (d2v reads only safetensors weights, never pickles)")
    try:
        theirs = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise CheckpointError(f"cannot read {weights}: {exc}") from None
    prefix = next((p for p in ("data2vec_vision.", "data2vec_audio.", "data2vec_text.") if any(
        k.startswith(p) for k in theirs)), "")
    theirs = {k[len(prefix):]: v for k, v in theirs.items() if k.startswith(prefix)}  # task models wrap the base

    try:
        encoder = build_encoder(model_cfg)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    _, views, _ = hf_export.convert(model_cfg, state)
    owner = {v.untyped_storage().data_ptr(): k for k, v in state.items()}
    filled = {k: 0 for k in state}
    if model_cfg["modality"] == "vision" and "layernorm.weight" not in theirs and hf.get("use_mean_pooling"):
        # a mean-pooling classifier (d2v's own fine-tuned export among them) has no final per-token LayerNorm: the
        # encoder's starts from the pooler's, the LayerNorm nearest to it
        for what in ("weight", "bias"):
            if f"pooler.layernorm.{what}" in theirs:
                theirs[f"layernorm.{what}"] = theirs[f"pooler.layernorm.{what}"]
    if model_cfg["modality"] == "text":  # RoBERTa adds token type 0 to every position: fold it into the positions
        types = theirs.get("embeddings.token_type_embeddings.weight")
        if types is not None and "embeddings.position_embeddings.weight" in theirs:
            theirs["embeddings.position_embeddings.weight"] = theirs["embeddings.position_embeddings.weight"] + types[0]
    for name, view in views.items():
        key = owner.get(view.untyped_storage().data_ptr())
        if key is None:
            continue  # a constant the export adds (text token types), not a d2v weight
        if name not in theirs:
            if key in OPTIONAL:
                continue
            raise CheckpointError(f"{path} lacks the tensor {name} (d2v {key})")
        if tuple(theirs[name].shape) != tuple(view.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(theirs[name].shape)} in {path}, d2v expects "
                                  f"{tuple(view.shape)} for {key}")
        view.copy_(theirs[name].to(view.dtype))
        filled[key] += view.numel()
    missing = [k for k, n in filled.items() if n < state[k].numel() and k not in OPTIONAL]
    if missing:
        raise CheckpointError(f"{path} does not provide d2v tensor(s) {', '.join(missing[:3])}")
    return model_cfg, state
