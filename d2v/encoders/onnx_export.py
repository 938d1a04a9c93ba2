"""d2v encoders as ONNX graphs (torch's dynamo exporter), checked in onnxruntime against the PyTorch encoder.

What a graph computes is the encoder's forward in eval mode (no dropout, no masking), fp32:

  vision  images (batch, C, H, W) float32 in [0, 1] (the graph normalizes pixels itself, as the encoder does)
          -> last_hidden_state (batch, 1 + N, D), CLS first; pooled (batch, D), the mean over patches
  speech  waveform (batch, samples) float32 at 16 kHz, attention_mask (batch, samples) int64, 1 at real samples
          (0 at padding after them); at least the receptive field (400 samples)
          -> last_hidden_state (batch, frames, D); frame_mask (batch, frames) int64, 1 at frames made of real
          samples only; pooled (batch, D), the mean over those frames
  text    input_ids (batch, tokens) int64, attention_mask (batch, tokens) int64, 1 at real tokens; at most the
          model's max length; positions count the non-<pad> ids, as the encoder does
          -> last_hidden_state (batch, tokens, D); pooled (batch, D), the mean over real tokens

batch is dynamic everywhere, samples (speech) and tokens (text) too. The d2v model config and the inputs are
stored in the graph's metadata ("d2v"). A text graph takes token ids: its tokenizer.json ships beside it."""
from __future__ import annotations

import importlib.util
import json
import logging
import warnings

import torch
from torch import nn

from d2v.core.errors import ConfigError, UserError
from d2v.models.speech import frame_padding_mask

PACKAGES = ("onnx", "onnxruntime", "onnxscript")
MAX_BATCH = 4096
MAX_SAMPLES = 16_000 * 3600  # an hour of 16 kHz speech


class OnnxExportError(UserError):
    """The exporter could not turn the encoder into a graph, or the graph does not compute what PyTorch does."""

    exit_code = 1


def check_installed() -> None:
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"d2v export onnx needs {', '.join(missing)}: pip install 'd2v[onnx]'")


def _masked_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, D) over positions where keep (B, T) is 1."""
    w = keep.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class VisionGraph(nn.Module):
    input_names, output_names = ["images"], ["last_hidden_state", "pooled"]

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder.encode(images).hidden
        return hidden, hidden[:, 1:].mean(dim=1)


class SpeechGraph(nn.Module):
    input_names = ["waveform", "attention_mask"]
    output_names = ["last_hidden_state", "frame_mask", "pooled"]

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, waveform: torch.Tensor, attention_mask: torch.Tensor):
        padding = attention_mask == 0
        hidden = self.encoder.encode(waveform, padding_mask=padding).hidden
        frames = (~frame_padding_mask(padding, hidden.shape[1], self.encoder.cfg)).long()
        return hidden, frames, _masked_mean(hidden, frames)


class TextGraph(nn.Module):
    input_names, output_names = ["input_ids", "attention_mask"], ["last_hidden_state", "pooled"]

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.encoder.encode(input_ids, padding_mask=attention_mask == 0).hidden
        return hidden, _masked_mean(hidden, attention_mask)


GRAPHS = {"vision": VisionGraph, "speech": SpeechGraph, "text": TextGraph}


def sample_inputs(encoder: nn.Module, batch: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's kinds: `batch` items (`length` samples or tokens where it applies), the last one
    padded over its final third where the modality has padding."""
    g = torch.Generator().manual_seed(seed)
    cfg = encoder.cfg
    if cfg.modality == "vision":
        return (torch.rand(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g),)
    mask = torch.ones(batch, length, dtype=torch.int64)
    if batch > 1:
        mask[-1, length - length // 3:] = 0
    if cfg.modality == "speech":
        return torch.randn(batch, length, generator=g) * mask, mask
    specials = 5  # <s> <pad> </s> <unk> <mask> come first in d2v's BPE; draw ordinary tokens
    ids = torch.randint(min(specials, cfg.vocab_size - 1), cfg.vocab_size, (batch, length), generator=g)
    return ids.masked_fill(mask == 0, cfg.pad_id), mask


def lengths(encoder: nn.Module) -> tuple[int, int]:
    """(export length, check length) of samples or tokens: two different ones, so the check sees the dynamic axis."""
    cfg = encoder.cfg
    if cfg.modality == "speech":
        field = encoder.receptive_field
        return 4 * field, 6 * field + 123
    if cfg.modality == "text":
        return min(16, cfg.max_length), max(2, min(cfg.max_length, 11))
    return 0, 0


def dynamic_shapes(encoder: nn.Module) -> dict:
    """The dynamic axes: batch; samples (speech, from the receptive field up) and tokens (text, up to max length)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if encoder.cfg.modality == "vision":
        return {"images": {0: batch}}
    if encoder.cfg.modality == "speech":
        samples = torch.export.Dim("samples", min=encoder.receptive_field, max=MAX_SAMPLES)
        return {"waveform": {0: batch, 1: samples}, "attention_mask": {0: batch, 1: samples}}
    tokens = torch.export.Dim("tokens", min=1, max=encoder.cfg.max_length)
    return {"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}}


def export_graph(encoder: nn.Module, metadata: dict):
    """The ONNX ModelProto of `encoder` (fp32, eval mode) with `metadata` under "d2v". Raises OnnxExportError."""
    check_installed()
    import onnx

    encoder = encoder.float().eval()
    graph = GRAPHS[encoder.cfg.modality](encoder).eval()
    args = sample_inputs(encoder, 2, lengths(encoder)[0], seed=0)
    shapes = dynamic_shapes(encoder)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, args, dynamo=True, input_names=graph.input_names,
                                        output_names=graph.output_names, dynamic_shapes=shapes,
                                        external_data=False, verbose=False, optimize=True)
    except Exception as exc:  # noqa: BLE001 - the exporter's many failure types: one sentence
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxExportError(f"the ONNX exporter failed on this {encoder.cfg.modality} encoder: {first}") from None
    model = program.model_proto
    io = {"inputs": graph.input_names, "outputs": graph.output_names}
    onnx.helper.set_model_props(model, {"d2v": json.dumps({**metadata, **io})})
    return model


def check_graph(model_bytes: bytes, encoder: nn.Module, seed: int = 1) -> float:
    """The largest absolute difference between onnxruntime running the graph and the PyTorch encoder's own forward
    and embed, over every output, at two batch sizes (and two lengths for speech and text)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for batch, length in ((3, lengths(encoder)[1]), (1, lengths(encoder)[0])):
        inputs = sample_inputs(encoder, batch, length, seed)
        got = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
        for want, have in zip(reference(encoder, inputs), got):
            worst = max(worst, float((want.double() - torch.from_numpy(have).double()).abs().max()))
    return worst


@torch.no_grad()
def reference(encoder: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """What the graph should return for `inputs`, from the encoder's public forward and embed."""
    modality = encoder.cfg.modality
    if modality == "vision":
        return [encoder(inputs[0]), encoder.embed(inputs[0])]
    if modality == "speech":
        wave, padding = inputs[0], inputs[1] == 0
        out = encoder.encode(wave, padding_mask=padding)
        frames = (torch.ones_like(out.hidden[..., 0], dtype=torch.int64) if out.padding_mask is None
                  else (~out.padding_mask).long())
        return [encoder(wave, padding), frames, encoder.embed(wave, padding)]
    hidden, _ = encoder(inputs[0])  # padding from the <pad> ids (sample_inputs pads with them where the mask is 0)
    return [hidden, encoder.embed(inputs[0])]
