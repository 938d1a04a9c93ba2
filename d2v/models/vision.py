"""The data2vec vision encoder: a pre-LN ViT (BEiT layout) with CLS token, LayerScale, q/v bias without k bias,
and one relative position bias shared by all blocks (no absolute positions)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from d2v.core.config import VisionModelConfig
from d2v.models.common import (
    EncoderOutput,
    gather_kept,
    init_transformer_weights,
    key_mask,
    normal_init_,
    run_blocks,
)
from d2v.models.stochastic import DropPath, attention
from d2v.models.transformer import PostLNBlock

INIT_STD = 0.02


def init_vision_weights(module: nn.Module, trunc: float = 1.0) -> None:
    """The BEiT / data2vec vision init: normal std 0.02 cut at +-trunc std (BEiT: 1; 0: uncut), zero biases, unit
    LayerNorms."""
    init_transformer_weights(module, std=INIT_STD, trunc=trunc)


def auto_patch_size(image_size: int, max_grid: int = 8) -> int:
    """Smallest divisor >= 2 of image_size giving a grid of at most max_grid x max_grid patches."""
    for p in range(min(2, image_size), image_size + 1):
        if image_size % p == 0 and image_size // p <= max_grid:
            return p
    return image_size


class RelativePositionBias(nn.Module):
    """Learned bias per (relative offset, head) on a (h, w) patch grid, plus CLS->token, token->CLS, CLS->CLS."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        h, w = grid
        self.num_distances = (2 * h - 1) * (2 * w - 1) + 3
        self.table = nn.Parameter(torch.zeros(self.num_distances, num_heads))  # (R, H)
        coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
        rel[..., 0] += h - 1
        rel[..., 1] += w - 1
        rel[..., 0] *= 2 * w - 1
        index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
        index[1:, 1:] = rel.sum(-1)
        index[0, :] = self.num_distances - 3
        index[:, 0] = self.num_distances - 2
        index[0, 0] = self.num_distances - 1
        self.register_buffer("index", index, persistent=False)  # (N + 1, N + 1)

    def forward(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)  # (H, N + 1, N + 1)


class Attention(nn.Module):
    random_site = 0  # its attention dropout's call site (d2v.models.stochastic)

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout  # on the attention probabilities, after softmax (training only)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))  # the key has no bias
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, Dh) each
        out = attention(q, k, v, bias.unsqueeze(0).to(q.dtype), self.dropout, self.training, self.random_site)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x + gamma_1 * attn(LN(x)); x + gamma_2 * mlp(LN(x)). Returns (block output, FFN branch gamma_2 * mlp(LN(x)),
    as the block adds it before drop-path and the residual)."""

    def __init__(self, cfg: VisionModelConfig, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.attention_dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), bias))
        ffn = self.gamma_2 * self.mlp(self.norm2(x))
        return x + self.drop_path(ffn, salt=1), ffn


def as_unit_images(images: torch.Tensor) -> torch.Tensor:
    """Images as floats in [0, 1]: uint8 (0..255) is scaled; float passes through; other dtypes are refused,
    since guessing their range would give wrong features silently."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [0, 1] or uint8 in [0, 255], got {images.dtype}")
    return images


def _image_input(module: nn.Module, cfg: VisionModelConfig) -> None:
    """What both image encoders share: size checks, the config, the patch grid, the pixel normalization buffers and
    the patch embedding."""
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"patch size {cfg.patch_size} does not divide image size {cfg.image_size}")
    if cfg.dim % cfg.num_heads:
        raise ValueError(f"dim {cfg.dim} is not a multiple of num_heads {cfg.num_heads}")
    module.cfg = cfg
    module.grid = (cfg.image_size // cfg.patch_size,) * 2
    module.num_patches = module.grid[0] * module.grid[1]
    mean, std = cfg.pixel_mean or [0.5] * cfg.in_chans, cfg.pixel_std or [0.5] * cfg.in_chans
    module.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
    module.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
    module.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, cfg.patch_size)


class VisionEncoder(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> hidden states (B, 1 + N, D); normalizes pixels itself."""

    num_prefix = 1
    norm_on_top = True  # `norm` follows the blocks (pre-LN); fine-tuning's layer decay treats it as the top

    def __init__(self, cfg: VisionModelConfig):
        super().__init__()
        _image_input(self, cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.rel_pos_bias = RelativePositionBias(self.grid, cfg.num_heads)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.apply(self.init_weights)
        for token in (self.cls_token, self.mask_token):
            normal_init_(token, INIT_STD, cfg.init_trunc)
        for i, block in enumerate(self.blocks, start=1):  # BEiT: shrink residual branches with depth
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token", "rel_pos_bias.table"}

    def init_weights(self, module: nn.Module) -> None:
        """This model's init, for modules built around it (the regression head)."""
        init_vision_weights(module, self.cfg.init_trunc)

    def encode(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        output_layers: str | None = None,
        top_k: int = 0,
    ) -> EncoderOutput:
        """images (B, C, H, W) in [0, 1]; mask (B, N) bool, True = replaced by the mask token.

        output_layers: None, "block" (end of block) or "ffn" (FFN output); top_k: how many top blocks to return.
        """
        if images.dim() != 4 or images.shape[1:] != (self.cfg.in_chans, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"expected images (B, {self.cfg.in_chans}, {self.cfg.image_size}, {self.cfg.image_size}), "
                f"got {tuple(images.shape)}"
            )
        images = as_unit_images(images)
        x = (images - self.pixel_mean) / self.pixel_std
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, D)
        bias = self.rel_pos_bias()  # (H, 1 + N, 1 + N)
        x, layers = run_blocks(self.blocks, x, bias, output_layers, top_k)
        return EncoderOutput(hidden=self.norm(x), layers=layers, num_prefix=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, 1 + N, D), CLS first, as Hugging Face's Data2VecVisionModel returns them."""
        return self.encode(images).hidden

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled patch representation (B, D)."""
        return self.encode(images).hidden[:, 1:].mean(dim=1)


def sincos_positions(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (h * w, dim): half the features encode the row, half the column,
    each as sin and cos of the coordinate times frequencies 1 / 10000^(i / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need dim divisible by 4, got {dim}")
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angle = coord[:, None] * freq[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


class VisionEncoderV2(nn.Module):
    """data2vec 2.0's image encoder: patch conv + fixed 2-D sin-cos positions, CLS token, LayerNorm, post-LN blocks
    (the first model.prenet_depth of them a pre-net). Images (B, C, H, W) in [0, 1] -> (B, 1 + N, D).

    encode() runs on whole images (the teacher, probes, export); encode_kept() on the kept patches of each clone
    (the data2vec 2.0 student)."""

    num_prefix = 1

    def __init__(self, cfg: VisionModelConfig):
        super().__init__()
        _image_input(self, cfg)
        self.register_buffer("pos_embed", sincos_positions(self.grid, cfg.dim)[None], persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.num_heads, int(cfg.dim * cfg.mlp_ratio), 0.0, cfg.attention_dropout, cfg.ln_eps,
                        drop_path=rate)
            for rate in rates
        )
        self.apply(init_transformer_weights)  # BERT's init, N(0, 0.02)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(cfg.dim, -1))
        nn.init.normal_(self.cls_token)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def init_weights(self, module: nn.Module) -> None:
        init_transformer_weights(module)

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (self.cfg.in_chans, self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"expected images (B, {self.cfg.in_chans}, {self.cfg.image_size}, {self.cfg.image_size}), "
                f"got {tuple(images.shape)}"
            )
        x = (as_unit_images(images) - self.pixel_mean) / self.pixel_std
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        return x + self.pos_embed.to(x.dtype)

    def _blocks(self, x: torch.Tensor, keep: torch.Tensor | None, output_layers: str | None,
                top_k: int) -> EncoderOutput:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.norm(x)
        x, layers = run_blocks(self.blocks, x, keep, output_layers, top_k)
        return EncoderOutput(hidden=x, layers=layers, num_prefix=1)

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None,
               padding_mask: torch.Tensor | None = None, output_layers: str | None = None,
               top_k: int = 0) -> EncoderOutput:
        """Whole images; output_layers None, "block" or "ffn" (data2vec 2.0's targets); top_k: how many top blocks."""
        if mask is not None:
            raise ValueError("a data2vec 2.0 encoder has no mask token: use encode_kept for the masked view")
        return self._blocks(self._patches(images), None, output_layers, top_k)

    def encode_kept(self, images: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
                    keep_padding: torch.Tensor | None = None, clones: int = 1,
                    padding_mask: torch.Tensor | None = None) -> EncoderOutput:
        """The data2vec 2.0 student: images (B, ...), keep (B * clones, Tk) kept patch positions of each clone ->
        hidden (B * clones, 1 + Tk, D), CLS first."""
        x = gather_kept(self._patches(images), keep, clones)
        return self._blocks(x, key_mask(keep_padding, prefix=1), None, 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, 1 + N, D), CLS first."""
        return self.encode(images).hidden

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled patch representation (B, D)."""
        return self.encode(images).hidden[:, 1:].mean(dim=1)
