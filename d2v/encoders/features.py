"""An encoder's embeddings of every item of a data set, in batches (the probe, the k-NN monitor, fine-tuning's
head-only phase), and the pooled representation of one batch that `d2v embed` writes."""
from __future__ import annotations

import numpy as np
import torch

POOLS = ("mean", "cls")


@torch.no_grad()
def features(encoder, dataset, batch_size: int = 256, device: str | torch.device = "cpu", progress=None,
             blocks: int = 1) -> np.ndarray:
    """(N, blocks x D) float64 embeddings of every item of a dataset: encoder.embed, or with blocks > 1 the mean
    of each of the last `blocks` blocks, concatenated (pooled)."""
    encoder = encoder.to(device)
    batch_size = min(batch_size, getattr(dataset, "max_batch", batch_size))
    out = []
    for start in range(0, len(dataset), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(dataset)))
        inputs = dataset.get_batch(idx)  # a tensor, or a tuple such as (waveforms, padding mask)
        inputs = tuple(t.to(device) for t in inputs) if isinstance(inputs, tuple) else (inputs.to(device),)
        out.append(pooled(encoder, inputs, blocks=blocks).float().cpu())
        if progress is not None:
            progress(len(idx))
    return torch.cat(out).double().numpy()


def pool_error(cfg, layer: int, pool: str) -> str:
    """Why (layer, pool) is not available for an encoder config ('' when it is)."""
    if pool not in POOLS:
        return f"--pool must be {' or '.join(POOLS)}, got {pool!r}"
    if pool == "cls" and cfg.modality == "speech":
        return "--pool cls needs a first token (vision: CLS, text: <s>); speech encoders have none: use mean"
    if not 0 <= layer <= cfg.depth:
        return f"--layer must be from 1 to the encoder's {cfg.depth} blocks (0: the last hidden states), got {layer}"
    return ""


@torch.no_grad()
def pooled(encoder, inputs: tuple, layer: int = 0, pool: str = "mean", blocks: int = 1) -> torch.Tensor:
    """(B, D) representation of a batch of encoder inputs. layer 0: the last hidden states (with pool "mean" this is
    encoder.embed: the mean over patches, valid frames or real tokens); layer k: the output of block k (1-based,
    before any final norm). pool "mean" averages the positions (never the CLS token or padding), "cls" takes the
    first token (vision CLS, text <s>).

    blocks > 1 (layer 0, pool "mean"): (B, blocks x D), the means of the outputs of the last `blocks` blocks,
    concatenated, lowest first, the last one being the last hidden states (after any final norm), all from one
    pass: the linear-probe features of DINO's protocol (its ViT-S/16 reads its last 4 blocks)."""
    if layer == 0 and pool == "mean" and blocks == 1:
        return encoder.embed(*inputs)  # any module with embed (a fine-tuning classifier's too)
    cfg = encoder.cfg
    if blocks > 1 and (layer or pool != "mean"):
        raise ValueError("features of several blocks are means of the last blocks: layer 0 and pool 'mean' only")
    if not 1 <= blocks <= cfg.depth:
        raise ValueError(f"blocks must be from 1 to the encoder's {cfg.depth} blocks, got {blocks}")
    top_k = cfg.depth - layer + 1 if layer else blocks if blocks > 1 else 0
    outputs = "block" if top_k else None
    if cfg.modality == "text":
        ids = inputs[0]
        padding = ids.eq(cfg.pad_id)
        out = encoder.encode(ids, padding_mask=padding if bool(padding.any()) else None, output_layers=outputs,
                             top_k=top_k)
        valid = ~padding
    else:
        kwargs = {"padding_mask": inputs[1]} if cfg.modality == "speech" else {}
        out = encoder.encode(inputs[0], output_layers=outputs, top_k=top_k, **kwargs)
        valid = None if out.padding_mask is None else ~out.padding_mask
    if blocks > 1:
        hiddens = [*out.layers[:blocks - 1], out.hidden]
        return torch.cat([_mean_positions(h[:, out.num_prefix:], valid) for h in hiddens], dim=1)
    hidden = out.layers[0] if layer else out.hidden  # (B, P + T, D)
    if pool == "cls":
        return hidden[:, 0]
    return _mean_positions(hidden[:, out.num_prefix:], valid)


def _mean_positions(hidden: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) -> (B, D): the mean over the positions where valid (B, T) is True (all of them when None)."""
    if valid is None:
        return hidden.mean(dim=1)
    w = valid.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
