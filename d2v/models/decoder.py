"""data2vec 2.0's decoder: the student encodes only kept tokens; the decoder gets its outputs back at their
positions, noise in the masked slots, and predicts the targets there with a few light conv layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2v.core.config import DecoderConfig
from d2v.models.common import conv1d_tc
from d2v.models.stochastic import Dropout


class _ConvLayer(nn.Module):
    """conv (grouped, 'same' padding) -> LayerNorm over channels without affine -> GELU; residual if widths match.
    2-D: (B, C, h, w); 1-D: (B, T, C), time-major (conv1d_tc)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int, two_d: bool, residual: bool):
        super().__init__()
        conv = nn.Conv2d if two_d else nn.Conv1d
        self.conv = conv(c_in, c_out, kernel, padding=kernel // 2, groups=groups)
        self.residual = residual and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.conv, nn.Conv1d):
            y = conv1d_tc(x, self.conv.weight, self.conv.bias, padding=self.conv.padding[0], groups=self.conv.groups)
            y = F.gelu(F.layer_norm(y, y.shape[-1:]))
        else:
            y = self.conv(x)
            y = F.gelu(F.layer_norm(y.movedim(1, -1), y.shape[1:2]).movedim(-1, 1))
        return x + y if self.residual else y


class ConvDecoder(nn.Module):
    """(B, T, D_in) with T = h * w (2-D, `grid` given) or a sequence (1-D) -> predictions (B, T, out_dim).
    Input dropout belongs to the encoder outputs before the masked slots are refilled; the objective applies it."""

    def __init__(self, cfg: DecoderConfig, in_dim: int, out_dim: int, grid: tuple[int, int] | None = None):
        super().__init__()
        for width in (in_dim, cfg.dim):
            if width % cfg.groups:
                raise ValueError(f"decoder.groups {cfg.groups} must divide the widths {in_dim} and {cfg.dim}")
        if cfg.kernel % 2 == 0:
            raise ValueError(f"decoder.kernel must be odd (same-size output), got {cfg.kernel}")
        self.grid = grid
        self.input_dropout = Dropout(cfg.input_dropout)  # applied by the objective to the encoder's outputs only
        self.layers = nn.ModuleList(
            _ConvLayer(in_dim if i == 0 else cfg.dim, cfg.dim, cfg.kernel, cfg.groups, grid is not None, cfg.residual)
            for i in range(cfg.depth)
        )
        width = cfg.dim if cfg.depth else in_dim
        if cfg.proj_hidden > 0:
            self.proj = nn.Sequential(nn.Linear(width, cfg.proj_hidden), nn.GELU(), nn.Linear(cfg.proj_hidden, out_dim))
        else:
            self.proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if self.grid is None:  # 1-D: the layers take (B, T, D) as it comes
            for layer in self.layers:
                x = layer(x)
            return self.proj(x)
        if self.grid[0] * self.grid[1] != T:
            raise ValueError(f"a {self.grid[0]}x{self.grid[1]} decoder got {T} positions")
        x = x.transpose(1, 2).reshape(B, -1, *self.grid)  # (B, D, h, w)
        for layer in self.layers:
            x = layer(x)
        return self.proj(x.reshape(B, x.shape[1], T).transpose(1, 2))
