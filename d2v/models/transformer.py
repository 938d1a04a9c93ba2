"""The post-LN Transformer layer that wav2vec 2.0 / data2vec speech and RoBERTa / data2vec text share."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2v.models.stochastic import Dropout, DropPath, attention


class Attention(nn.Module):
    random_site = 0  # its attention dropout's call site (d2v.models.stochastic)

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D); keep: (B, 1, 1, T) bool, True at keys that may be attended; or an additive float bias
        broadcastable to (B, H, T, T) (ALiBi, with -inf at keys not to attend); or None."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, keep, self.dropout, self.training, self.random_site)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class PostLNBlock(nn.Module):
    """x = LN(x + drop(attn(x))); x = LN(x + drop(fc2(act_drop(gelu(fc1(x)))))). Returns (x, FFN output fc2)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, attention_dropout: float,
                 ln_eps: float, activation_dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, num_heads, attention_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.dropout = Dropout(dropout)
        self.act_dropout = Dropout(activation_dropout)
        self.drop_path = DropPath(drop_path)  # data2vec 2.0 images: stochastic depth on both residual branches

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm1(x + self.drop_path(self.dropout(self.attn(x, keep)), salt=0))
        ffn = self.fc2(self.act_dropout(F.gelu(self.fc1(x))))  # the data2vec target: before dropout and residual
        return self.norm2(x + self.drop_path(self.dropout(ffn, salt=1), salt=1)), ffn
