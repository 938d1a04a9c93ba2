"""Encoders by modality. Each has encode(x, mask, padding_mask, output_layers, top_k) -> EncoderOutput,
forward(x) -> last hidden states, embed(x) -> (B, D), and no_weight_decay(); data2vec 2.0 students also
encode_kept(x, mask, keep, keep_padding, clones, padding_mask) -> EncoderOutput over the kept positions."""
from __future__ import annotations

from torch import nn

from d2v.models.common import EncoderOutput


def build_encoder(model_cfg) -> nn.Module:
    """The encoder for a model config (its `modality` field picks the family)."""
    if model_cfg.modality == "vision":
        from d2v.models.vision import VisionEncoder, VisionEncoderV2

        return VisionEncoderV2(model_cfg) if getattr(model_cfg, "arch", "beit") == "v2" else VisionEncoder(model_cfg)
    if model_cfg.modality == "text":
        from d2v.models.text import TextEncoder

        return TextEncoder(model_cfg)
    if model_cfg.modality == "speech":
        from d2v.models.speech import SpeechEncoder

        return SpeechEncoder(model_cfg)
    raise ValueError(f"unknown modality {model_cfg.modality!r}")


__all__ = ["EncoderOutput", "build_encoder"]
