"""Encoders by modality. Each has encode(x, mask, padding_mask, output_layers, top_k) -> EncoderOutput,
forward(x) -> last hidden states, embed(x) -> (B, D), and no_weight_decay(); data2vec 2.0 students also
encode_kept(x, mask, keep, keep_padding, clones, padding_mask) -> EncoderOutput over the kept positions.

A new modality plugs in here: one module with its encoder and one line in build_encoder."""
from __future__ import annotations

from torch import nn

from d2v.core.config import MODEL_CONFIGS, from_dict
from d2v.core.errors import ConfigError
from d2v.models.common import EncoderOutput
from d2v.models.speech import SpeechEncoder
from d2v.models.stochastic import number_sites
from d2v.models.text import TextEncoder
from d2v.models.vision import VisionEncoder, VisionEncoderV2


def build_encoder(model_cfg) -> nn.Module:
    """The encoder of a model config: a model config dataclass (its `modality` field picks the family), or the same
    as a dict (the "model" of a saved config.json)."""
    if isinstance(model_cfg, dict):
        cls = MODEL_CONFIGS.get(model_cfg.get("modality"))
        if cls is None:
            raise ConfigError(f"unknown modality {model_cfg.get('modality')!r} in the model config")
        model_cfg = from_dict(cls, model_cfg)
    if model_cfg.modality == "vision":
        encoder = VisionEncoderV2(model_cfg) if getattr(model_cfg, "arch", "beit") == "v2" else VisionEncoder(model_cfg)
    elif model_cfg.modality == "text":
        encoder = TextEncoder(model_cfg)
    elif model_cfg.modality == "speech":
        encoder = SpeechEncoder(model_cfg)
    else:
        raise ConfigError(f"unknown modality {model_cfg.modality!r}")
    number_sites(encoder)
    return encoder


__all__ = ["EncoderOutput", "build_encoder"]
