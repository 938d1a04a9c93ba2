"""The data2vec speech encoder: wav2vec 2.0 layout. A 7-layer conv feature extractor (LayerNorm mode, 20 ms frames
at 16 kHz), LayerNorm + Linear projection, a 5-layer convolutional position encoder, post-LN Transformer blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2v.core.config import SpeechModelConfig
from d2v.models.common import EncoderOutput, conv1d_tc, gather_kept, init_transformer_weights, run_blocks
from d2v.models.stochastic import Dropout, LayerDrop
from d2v.models.transformer import PostLNBlock

WAVE_EPS = 1e-7  # what transformers' Wav2Vec2FeatureExtractor adds to the variance (do_normalize)


def conv_output_lengths(lengths, kernels: list[int], strides: list[int]):
    """Frames the feature extractor makes of `lengths` samples (int, numpy or torch integers); 0 when too short."""
    for k, s in zip(kernels, strides):
        lengths = (lengths - k) // s + 1
    if isinstance(lengths, int):
        return max(lengths, 0)
    return lengths.clip(min=0)


def receptive_field(kernels: list[int], strides: list[int]) -> int:
    """Samples one frame sees (400 for the wav2vec 2.0 stack); also the shortest input that gives a frame."""
    r = 1
    for k, s in zip(reversed(kernels), reversed(strides)):
        r = (r - 1) * s + k
    return r


def frame_padding_mask(sample_padding: torch.Tensor, num_frames: int, cfg: SpeechModelConfig) -> torch.Tensor:
    """(B, S) bool sample padding mask (True = padded) -> (B, T) frame padding mask from the conv formula.

    A frame t < conv_output_lengths(valid samples) sees only valid samples, so its value never depends on padding.
    """
    valid = (~sample_padding).sum(dim=1)
    frames = conv_output_lengths(valid, cfg.conv_kernel, cfg.conv_stride)
    return torch.arange(num_frames, device=sample_padding.device)[None, :] >= frames[:, None]


def normalize_waveform(wave: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its valid samples; padded samples become 0. (B, S) fp32."""
    wave = wave.float()
    if padding_mask is None:
        mean = wave.mean(dim=1, keepdim=True)
        var = wave.var(dim=1, unbiased=False, keepdim=True)
        return (wave - mean) / torch.sqrt(var + WAVE_EPS)
    w = (~padding_mask).float()
    n = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (wave * w).sum(dim=1, keepdim=True) / n
    var = (((wave - mean) * w) ** 2).sum(dim=1, keepdim=True) / n
    return (wave - mean) / torch.sqrt(var + WAVE_EPS) * w


class ConvLayer(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels -> GELU, on (B, T, C) sequences."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, bias=False)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, C_in) -> (B, S', C_out)
        return F.gelu(self.norm(conv1d_tc(x, self.conv.weight, None, self.conv.stride[0])))


class FeatureExtractor(nn.Module):
    """Normalized waveform (B, S) -> conv features (B, T, C)."""

    def __init__(self, cfg: SpeechModelConfig):
        super().__init__()
        dims = [1] + list(cfg.conv_dim)
        self.layers = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], k, s) for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride))
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.unsqueeze(-1)  # (B, S, 1)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, T, C)


class FeatureProjection(nn.Module):
    def __init__(self, c: int, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=eps)
        self.proj = nn.Linear(c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, D)
        return self.proj(self.norm(x))


class PositionalConv(nn.Module):
    """depth x [Conv1d (kernel k, 'same' padding, groups) -> LayerNorm without affine -> GELU]; (B, T, D) -> same."""

    def __init__(self, dim: int, depth: int, kernel: int, groups: int):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"pos_conv_kernel must be odd (same-length output), got {kernel}")
        self.layers = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.layers:
            x = conv1d_tc(x, conv.weight, conv.bias, padding=conv.padding[0], groups=conv.groups)
            x = F.gelu(F.layer_norm(x, x.shape[-1:]))
        return x


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes: 2^(-8 / n) to the powers 1 .. n for n a power of two; otherwise those of the
    nearest lower power of two m, then every other slope of 2m for the remaining heads."""
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** (num_heads.bit_length() - 1)
    slopes = powers(m) if m == num_heads else powers(m) + powers(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes)


class SpeechEncoder(nn.Module):
    """Waveforms (B, S) at 16 kHz -> frame states (B, T, D), T = conv_output_lengths(S); normalizes input itself."""

    num_prefix = 0
    front_end = ("feature_extractor.", "feature_projection.")  # what produces EncoderOutput.features

    def __init__(self, cfg: SpeechModelConfig):
        super().__init__()
        if not len(cfg.conv_dim) == len(cfg.conv_kernel) == len(cfg.conv_stride) >= 1:
            raise ValueError("conv_dim, conv_kernel and conv_stride must be lists of one length")
        if cfg.dim % cfg.num_heads or cfg.dim % cfg.pos_conv_groups:
            raise ValueError(f"dim {cfg.dim} must be a multiple of num_heads {cfg.num_heads} "
                             f"and of pos_conv_groups {cfg.pos_conv_groups}")
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg.conv_dim[-1], cfg.dim, cfg.ln_eps)
        self.mask_emb = nn.Parameter(torch.empty(cfg.dim).uniform_())
        self.pos_conv = PositionalConv(cfg.dim, cfg.pos_conv_depth, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.dropout = Dropout(cfg.dropout)
        self.layerdrop = LayerDrop(cfg.layerdrop)
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout, cfg.ln_eps,
                        cfg.activation_dropout)
            for _ in range(cfg.depth)
        )
        if cfg.alibi:  # data2vec 2.0: relative positions as an attention bias; a learned scale per head (init 1)
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_heads), persistent=False)
            self.alibi_scale = nn.Parameter(torch.ones(cfg.num_heads))
        # As the reference (fairseq data2vec audio / wav2vec 2.0): the Transformer blocks get BERT's init (normal
        # std 0.02, zero biases); the conv front end Kaiming normal; the feature projection and the multi-layer
        # position convs keep PyTorch's default init (the reference's std sqrt(4 / (kernel * dim)) init belongs to
        # its single weight-normed position conv, which d2v does not have).
        for block in self.blocks:
            block.apply(init_transformer_weights)
        for layer in self.feature_extractor.layers:
            nn.init.kaiming_normal_(layer.conv.weight)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.cfg.conv_kernel, self.cfg.conv_stride)

    def no_weight_decay(self) -> set[str]:
        return {"mask_emb", "alibi_scale"}

    def _attention_bias(self, positions: torch.Tensor, key_padding: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor | None:
        """What the blocks get to restrict / bias attention: positions (B, T) of the encoded frames; key_padding
        (B, T) True at keys not to attend. ALiBi: -|p_i - p_j| x slope x max(scale, 0) per head, (B, H, T, T)
        floats with -inf at padded keys; else the (B, 1, 1, T) bool keep mask or None."""
        if not self.cfg.alibi:
            return None if key_padding is None else ~key_padding[:, None, None, :]
        dist = (positions[:, :, None] - positions[:, None, :]).abs().to(torch.float32)  # (B, T, T)
        slope = (self.alibi_slopes * self.alibi_scale.clamp(min=0.0)).to(torch.float32)
        bias = -dist[:, None] * slope[None, :, None, None]
        if key_padding is not None:
            bias = bias.masked_fill(key_padding[:, None, None, :], float("-inf"))
        return bias.to(dtype)

    def _front(self, wave: torch.Tensor, padding_mask: torch.Tensor | None,
               features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(features (B, T, D), frame padding (B, T) or None, sample padding or None) of the waveforms."""
        if wave.dim() != 2:
            raise ValueError(f"expected waveforms (B, S), got {tuple(wave.shape)}")
        if wave.shape[1] < self.receptive_field:
            raise ValueError(f"waveforms need at least {self.receptive_field} samples, got {wave.shape[1]}")
        if padding_mask is not None and not torch.compiler.is_exporting() and not padding_mask.any():
            padding_mask = None  # no padding: the unmasked path (an exported graph keeps the masked one for all)
        if features is None:
            x = self.feature_extractor(normalize_waveform(wave, padding_mask).to(wave.dtype))  # (B, T, C)
            features = self.feature_projection(x)  # (B, T, D)
        pad = None if padding_mask is None else frame_padding_mask(padding_mask, features.shape[1], self.cfg)
        return features, pad, padding_mask

    def _blocks(self, x: torch.Tensor, bias, output_layers: str | None, top_k: int) -> tuple[torch.Tensor, list]:
        # LayerDrop on the student only (per sample, d2v.models.stochastic); a pass returning target layers never drops.
        return run_blocks(self.blocks, x, bias, output_layers, top_k,
                          self.layerdrop if output_layers is None else None)

    def encode_kept(self, wave: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
                    keep_padding: torch.Tensor | None = None, clones: int = 1,
                    padding_mask: torch.Tensor | None = None) -> EncoderOutput:
        """The data2vec 2.0 student: the conv front end runs once per waveform; each clone's masked frames (mask
        (B * clones, T)) are zeroed for the position convs, whose output is added; then only the kept frames keep
        (B * clones, Tk) are encoded -> hidden (B * clones, Tk, D). features: the front end's output (B, T, D)."""
        features, pad, _ = self._front(wave, padding_mask, None)
        B2, T = mask.shape
        if B2 != features.shape[0] * clones or T != features.shape[1]:
            raise ValueError(f"mask must be (B x clones, T) = {(features.shape[0] * clones, features.shape[1])}, "
                             f"got {tuple(mask.shape)}")
        sample = torch.arange(B2, device=mask.device).div(clones, rounding_mode="floor")
        x = features[sample]  # (B * clones, T, D): each clone's own position-conv input
        hidden = mask if pad is None else mask | pad[sample]
        x = x.masked_fill(hidden.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)
        x = gather_kept(x, keep, 1)
        x = self.dropout(self.norm(x))
        positions = keep.clamp(max=T - 1)
        x, _ = self._blocks(x, self._attention_bias(positions, keep_padding, x.dtype), None, 0)
        return EncoderOutput(hidden=x, num_prefix=0, padding_mask=pad, features=features)

    def encode(
        self,
        wave: torch.Tensor,
        mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        output_layers: str | None = None,
        top_k: int = 0,
        features: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """wave (B, S) float at 16 kHz; mask (B, T) bool, True = frame replaced by the mask embedding;
        padding_mask (B, S) bool, True at padded samples. output_layers: None, "block" or "ffn"; top_k: how many.
        features: the front end's output for this `wave` from an encoder with the same front-end weights (the
        student's, for a teacher that shares them): used instead of running the conv front end again."""
        x, pad, _ = self._front(wave, padding_mask, features)
        local = x
        T = x.shape[1]
        if mask is not None:
            if mask.shape != (x.shape[0], T):
                raise ValueError(f"mask must be (B, T) = {(x.shape[0], T)}, got {tuple(mask.shape)}")
            x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        if pad is not None:
            # Padded frames enter the position convs as zeros, as in fairseq and transformers (which do not
            # re-zero them between conv layers, so with depth > 1 the tail reaches the last valid frames).
            x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        x = self.dropout(self.norm(x + self.pos_conv(x)))
        positions = torch.arange(T, device=x.device).expand(x.shape[0], T)
        x, layers = self._blocks(x, self._attention_bias(positions, pad, x.dtype), output_layers, top_k)
        return EncoderOutput(hidden=x, layers=layers, num_prefix=0, padding_mask=pad, features=local)

    def forward(self, wave: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, D), as Hugging Face's Data2VecAudioModel returns last_hidden_state."""
        return self.encode(wave, padding_mask=padding_mask).hidden

    def embed(self, wave: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over valid frames (B, D)."""
        out = self.encode(wave, padding_mask=padding_mask)
        if out.padding_mask is None:
            return out.hidden.mean(dim=1)
        w = (~out.padding_mask).unsqueeze(-1).to(out.hidden.dtype)
        return (out.hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
