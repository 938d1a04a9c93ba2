"""Pieces every encoder shares: what an encoder returns to the objective, weight init, the block loop.
(Dropout, drop-path and LayerDrop: d2v.models.stochastic.)"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from d2v.models.stochastic import bound


@dataclass
class EncoderOutput:
    """What the objective needs from an encoder pass.

    hidden: (B, P + T, D) final states, P prefix tokens (vision: 1 CLS) before T positions that masks index.
    layers: K candidate target sub-layer outputs (B, P + T, D) of the top K blocks, bottom to top.
    padding_mask: (B, T) bool, True at padded positions, or None.
    features: the front end's output before masking (speech: projected conv features (B, T, D); data2vec 2.0 text:
    the embedding output after dropout), the input of a teacher that shares the front end (the reference's
    `local_features`); None where the encoder offers none.
    """

    hidden: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)
    num_prefix: int = 0
    padding_mask: torch.Tensor | None = None
    features: torch.Tensor | None = None


def normal_init_(tensor: torch.Tensor, std: float, trunc: float = 0.0) -> None:
    """Normal(0, std) in place, cut at +-trunc * std when trunc > 0 (else untruncated)."""
    if trunc > 0:
        nn.init.trunc_normal_(tensor, std=std, a=-trunc * std, b=trunc * std)
    else:
        nn.init.normal_(tensor, std=std)


def init_transformer_weights(module: nn.Module, std: float = 0.02, trunc: float = 0.0) -> None:
    """Normal(0, std) linear/conv/embedding weights, cut at +-trunc * std when trunc > 0 (else untruncated, as
    BERT / RoBERTa's init), zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        normal_init_(module.weight, std, trunc)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        normal_init_(module.weight, std, trunc)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def conv1d_tc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
              padding: int = 0, groups: int = 1) -> torch.Tensor:
    """F.conv1d for sequences laid out time-major: x (B, T, C_in) -> (B, T', C_out), T' = (T + 2 padding - k) //
    stride + 1, weight (C_out, C_in / groups, k) as nn.Conv1d's; LayerNorm and GELU over channels then need no
    transposed copies. Strided dense convs on the CPU (the speech front end) run as conv1d_windows, whose forward +
    backward there takes about half the time of F.conv1d's; the rest (grouped or stride-1 convs, where the CPU
    convolution is as fast or faster, and every conv on other devices) F.conv1d on the transposed view."""
    if x.device.type == "cpu" and groups == 1 and stride > 1:
        return conv1d_windows(x, weight, bias, stride, padding, groups)
    return F.conv1d(x.transpose(1, 2), weight, bias, stride, padding, groups=groups).transpose(1, 2)


def conv1d_windows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                   padding: int = 0, groups: int = 1) -> torch.Tensor:
    """conv1d_tc as the input's windows (B, T', C_in * k) times the weight: one matmul, or one per group."""
    if padding:
        x = F.pad(x, (0, 0, padding, padding))
    c_out, c_in, k = weight.shape  # c_in: per group
    win = x.unfold(1, k, stride)  # (B, T', C_in, k), a view; flattened in nn.Conv1d's (C_in, k) weight order
    B, T = win.shape[:2]
    if groups == 1:
        return F.linear(win.reshape(B, T, c_in * k), weight.reshape(c_out, c_in * k), bias)
    win = win.reshape(B, T, groups, c_in * k)
    y = torch.einsum("btgi,goi->btgo", win, weight.reshape(groups, c_out // groups, c_in * k)).reshape(B, T, c_out)
    return y if bias is None else y + bias.to(y.dtype)  # as F.conv1d under autocast: the output dtype


def gather_kept(x: torch.Tensor, keep: torch.Tensor, clones: int = 1) -> torch.Tensor:
    """data2vec 2.0: the rows a student encodes. x (B, T, D) per sample; keep (B * clones, Tk) positions (filler
    slots hold T) -> (B * clones, Tk, D), clone i of sample i // clones, without copying x per clone first."""
    B2, T = keep.shape[0], x.shape[1]
    if B2 != x.shape[0] * clones:
        raise ValueError(f"keep has {B2} rows but {x.shape[0]} samples x {clones} clones were given")
    sample = torch.arange(B2, device=x.device).div(clones, rounding_mode="floor")
    return x[sample[:, None], keep.clamp(max=T - 1)]


def key_mask(keep_padding: torch.Tensor | None, prefix: int = 0) -> torch.Tensor | None:
    """(B, Tk) filler slots (True) -> (B, 1, 1, prefix + Tk) bool, True at keys that may be attended; or None."""
    if keep_padding is None:
        return None
    if prefix:
        keep_padding = torch.cat([keep_padding.new_zeros(keep_padding.shape[0], prefix), keep_padding], dim=1)
    return ~keep_padding[:, None, None, :]


def checkpointed_blocks(setting: str, depth: int) -> int:
    """How many of `depth` blocks run.activation_checkpointing recomputes: "off" 0, "all" depth, N min(N, depth)."""
    if setting == "off":
        return 0
    return depth if setting == "all" else min(int(setting), depth)


def set_activation_checkpointing(encoder: nn.Module, setting: str) -> int:
    """Mark the first checkpointed_blocks(setting) blocks of `encoder` for recomputation in the backward (run_blocks
    honours the mark only where gradients are recorded: never in a teacher's no-grad pass). Returns how many."""
    count = checkpointed_blocks(setting, len(encoder.blocks))
    for i, block in enumerate(encoder.blocks):
        block.recompute = i < count
    return count


def run_blocks(blocks, x: torch.Tensor, attn, output_layers: str | None = None, top_k: int = 0,
               layerdrop=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x through the blocks (each returns (output, FFN output)), with `attn` the attention mask / bias they take;
    the candidate target sub-layers ("block" or "ffn") of the top `top_k` blocks, bottom to top. layerdrop: a
    d2v.models.stochastic.LayerDrop whose dropped rows keep their input through a block, or None.

    A block marked by set_activation_checkpointing keeps only its inputs when gradients are recorded and runs again
    in the backward, under the keys of the keyed pass it first ran in (stochastic.bound): its dropout, attention
    dropout and drop-path draw the same masks again, so the gradients are those of the plain pass. (Outside a keyed
    pass torch.utils.checkpoint replays torch's generator states.)"""
    first = len(blocks) - top_k
    layers = []
    for i, block in enumerate(blocks):
        keep = None if layerdrop is None else layerdrop.keep(x.shape[0], i, x.device)
        if getattr(block, "recompute", False) and torch.is_grad_enabled():
            out, ffn = checkpoint(bound(block), x, attn, use_reentrant=False)
        else:
            out, ffn = block(x, attn)
        x = out if keep is None else torch.where(keep.view((-1,) + (1,) * (x.dim() - 1)), out, x)
        if output_layers is not None and i >= first:
            layers.append(x if output_layers == "block" else ffn)
    return x, layers
