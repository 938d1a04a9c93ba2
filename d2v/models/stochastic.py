"""Training randomness that does not depend on how a global batch is split: dropout, attention dropout, drop-path
and LayerDrop.

Inside a keyed pass (`keyed(seed, first, count)`, which the objective opens around each micro-batch) every
decision is a counter-based hash of (run seed, the sample's global position, the call site, the element's index),
as data2vec 2.0's decoder noise is (d2v.objective.position_noise). A sample therefore gets the same masks whether
it is trained in one micro-batch of 8 on one process or in one of 4 on the second of two processes, and a run gives
the same weights on 1 or N processes and with any --grad-accum, and continues on another process count when
resumed. Elements are keyed by their index per dimension (row, then each middle dimension, then the last), never
by a flat offset, so a micro-batch padded to another length (speech, data2vec 2.0's kept tokens) draws the same
values at the positions both have.

Call sites: every module that draws (Dropout, DropPath, the attention layers, LayerDrop) has a `random_site`
number, given by number_sites() in module order when a model is built; a module used twice in one forward passes a
different `salt` each time.

Outside a keyed pass (fine-tuning, a model called directly) the same modules draw from torch's default generator
as nn.Dropout does."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

_SALTS = 256  # call-site key = random_site * _SALTS + salt (salt: a use of the module, or LayerDrop's block)
_GOLDEN = 0x9E3779B9
_STREAM = 0x3C6EF372  # this stream's salt on the run seed (the decoder noise uses the seed unsalted)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 tensors holding values in [0, 2^32); products
    stay below 2^63, so no step overflows."""
    for mult in (0x7FEB352D, 0x5BD1E995, 0x27D4EB2F):
        x = x ^ (x >> 15)
        x = (x * mult) & 0xFFFFFFFF
    return x ^ (x >> 16)


def mix32(x: torch.Tensor, mult: int) -> torch.Tensor:
    """One multiply-xorshift round on int64 tensors holding values in [0, 2^32)."""
    x = (x * mult) & 0xFFFFFFFF
    return x ^ (x >> 15)


def hash32_int(x: int) -> int:
    """hash32 of one Python int in [0, 2^32)."""
    for mult in (0x7FEB352D, 0x5BD1E995, 0x27D4EB2F):
        x ^= x >> 15
        x = (x * mult) & 0xFFFFFFFF
    return x ^ (x >> 16)


def sample_keys(seed: int, first: int, count: int, device=None) -> torch.Tensor:
    """(count,) int64 keys in [0, 2^32) of the samples at global positions first .. first + count - 1."""
    salt = hash32_int((seed & 0xFFFFFFFF) ^ _STREAM)
    pos = torch.arange(first, first + count, device=device, dtype=torch.int64)
    return hash32(hash32((pos >> 32) ^ salt) ^ (pos & 0xFFFFFFFF))


class _Active:
    """The keys of the keyed pass in progress, one holder object for the whole process: the tensor inside is
    replaced per micro-batch (torch.compile then sees a new input, not a new object to guard on)."""

    samples: torch.Tensor | None = None


_ACTIVE = _Active()


@contextlib.contextmanager
def keyed(seed: int, first: int, count: int, device=None):
    """Within: the randomness of the micro-batch of samples at global positions first .. first + count - 1."""
    before = _ACTIVE.samples
    _ACTIVE.samples = sample_keys(seed, first, count, device)
    try:
        yield
    finally:
        _ACTIVE.samples = before


def bound(fn):
    """`fn` called under the keys of the keyed pass in progress now (or none), whenever it is called: activation
    checkpointing recomputes a block in the backward, after its keyed pass has closed, and must draw the same
    masks as the forward did."""
    samples = _ACTIVE.samples

    def call(*args, **kwargs):
        before = _ACTIVE.samples
        _ACTIVE.samples = samples
        try:
            return fn(*args, **kwargs)
        finally:
            _ACTIVE.samples = before

    call.__wrapped__ = fn
    return call


def row_keys(rows: int, site: int) -> torch.Tensor | None:
    """(rows,) int64 keys of the rows of a tensor in the keyed pass for call-site key `site`, or None outside one.
    rows is the micro-batch's sample count B (one row per sample) or B x r (r rows per sample, data2vec 2.0's
    clones: clone j of sample i is row i * r + j)."""
    samples = _ACTIVE.samples
    if samples is None:
        return None
    B = samples.shape[0]
    if rows % B:
        raise ValueError(f"a tensor of {rows} rows in a keyed pass of {B} samples (rows must be a multiple)")
    keys = samples
    if rows != B:
        r = rows // B
        clone = torch.arange(rows, device=samples.device, dtype=torch.int64) % r
        keys = hash32(samples.repeat_interleave(r) ^ (clone + (r << 16)))
    return hash32(keys ^ hash32_int(site & 0xFFFFFFFF))


def _threshold(p: float) -> int:
    """Uniform 32-bit draws below this are dropped: probability p, resolved to 2^-32."""
    return min(round(p * 2**32), 2**32 - 1)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as int32 with the same 32 bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def drop_mask(keys: torch.Tensor, shape: tuple[int, ...], p: float, chunk_elements: int | None = None) -> torch.Tensor:
    """Bool (shape), True where an element is dropped (probability p), shape[0] == len(keys). Element (i, j.., k) is
    a function of (keys[i], j.., k) alone: the row key is hashed with each middle index in turn (the small grid
    shape[:-1], full hash), then each element costs one xor with the last index's hash and one int32
    multiply-xorshift round (int32: twice as many lanes per vector instruction as int64; the multiply wraps).

    On the CPU the elements are made a few rows at a time (about chunk_elements, default 2^15) so that the
    temporaries stay in cache; on a GPU in one pass."""
    grid = keys
    for size in shape[1:-1]:
        grid = hash32(grid[..., None] ^ torch.arange(size, device=keys.device, dtype=torch.int64))
    last = shape[-1] if len(shape) > 1 else 1
    col = _to_int32(hash32(torch.arange(last, device=keys.device, dtype=torch.int64) + _GOLDEN))
    grid = _to_int32(grid).reshape(-1, 1)
    below = _threshold(p) - 2**31  # int32 draws below this: the lowest p of [-2^31, 2^31)

    def dropped(rows: torch.Tensor) -> torch.Tensor:
        b = (rows ^ col) * 0x5BD1E995
        return (b ^ ((b >> 15) & 0x1FFFF)) < below  # logical shift: int32's >> is arithmetic

    if chunk_elements is None:
        chunk_elements = 0 if keys.device.type == "cuda" else 1 << 15
    per = grid.shape[0] if chunk_elements <= 0 else max(1, chunk_elements // last)
    if per >= grid.shape[0]:
        return dropped(grid).view(shape)
    out = torch.empty((grid.shape[0], last), dtype=torch.bool, device=keys.device)
    for start in range(0, grid.shape[0], per):
        out[start:start + per] = dropped(grid[start:start + per])
    return out.view(shape)


def generator_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """F.dropout from torch's default generator. On the CPU the keep mask comes from 64-bit integer draws, 32 bits
    per element (p resolved to 2^-32): half as many draws as the float per element that torch's bernoulli_ makes
    there, each cheaper; elsewhere F.dropout."""
    if x.device.type != "cpu" or x.numel() == 0:
        return F.dropout(x, p, True)
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 1) // 2,), dtype=torch.int64).view(torch.int32)[:n]
    drop = (bits < round(p * 2**32) - 2**31).view(x.shape)  # uniform int32 below the p-quantile
    return (x * (1.0 / (1.0 - p))).masked_fill_(drop, 0.0)


def dropout(x: torch.Tensor, p: float, training: bool = True, site: int = 0) -> torch.Tensor:
    """Zero each element of x (B or B x r rows first) with probability p and scale the rest by 1 / (1 - p); in a
    keyed pass the mask is drop_mask of the rows' keys for call-site key `site`, else from torch's generator."""
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p >= 1.0:
        return x * 0.0
    keys = row_keys(x.shape[0], site)
    if keys is None:
        return generator_dropout(x, p)
    return (x * (1.0 / (1.0 - p))).masked_fill(drop_mask(keys, tuple(x.shape), p), 0.0)


def row_keep(rows: int, p: float, site: int, device) -> torch.Tensor:
    """(rows,) bool, True for the rows that keep a branch dropped with probability p (drop-path, LayerDrop)."""
    keys = row_keys(rows, site)
    if keys is None:
        return torch.empty(rows, device=device).bernoulli_(1.0 - p).bool()
    return keys >= _threshold(p)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, p: float,
              training: bool, site: int) -> torch.Tensor:
    """F.scaled_dot_product_attention of q, k, v (B, H, T, Dh) with dropout p on the attention probabilities in
    training. scaled_dot_product_attention draws its dropout mask inside, from torch's generator, so in a keyed pass
    the attention is computed here instead (scores, softmax, keyed dropout, weighted sum): the probabilities
    (B, H, T, T) are materialized, as the CPU's math path does anyway, while fused GPU kernels would not. attn_mask:
    bool (True: attend) or an additive float bias, broadcastable to (B, H, T, T). site: the module's random_site."""
    keys = row_keys(q.shape[0], site * _SALTS) if training and p > 0 else None
    if keys is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p if training else 0.0)
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask.float())
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(drop_mask(keys, tuple(probs.shape), p), 0.0) * (1.0 / (1.0 - p))
    return probs.to(v.dtype) @ v


class Dropout(nn.Dropout):
    """nn.Dropout through d2v.models.stochastic.dropout: keyed by sample position in a keyed pass."""

    random_site = 0

    def forward(self, x: torch.Tensor, salt: int = 0) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.random_site * _SALTS + salt)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole rows (samples, or clones) with probability p (training
    only), scaling kept rows by 1 / (1 - p)."""

    random_site = 0

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, salt: int = 0) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = row_keep(x.shape[0], self.p, self.random_site * _SALTS + salt, x.device)
        return x * (keep.to(x.dtype) / (1.0 - self.p)).view((-1,) + (1,) * (x.dim() - 1))


class LayerDrop(nn.Module):
    """LayerDrop per row: each row (sample, or clone) skips block i with probability p (training only). The block
    still runs on every row and dropped rows keep their input (torch.where), so every process runs every block, the
    same blocks get gradients on every process (no unused parameters) and no host sync asks which rows kept it."""

    random_site = 0

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def keep(self, rows: int, block: int, device) -> torch.Tensor | None:
        """(rows,) bool, True for the rows that run block `block`; None when nothing is dropped."""
        if self.p == 0.0 or not self.training:
            return None
        return row_keep(rows, self.p, self.random_site * _SALTS + block, device)


def number_sites(model: nn.Module) -> None:
    """Give every module of `model` that draws randomness its own call-site number (its index in module order)."""
    for i, module in enumerate(model.modules()):
        if hasattr(module, "random_site"):
            module.random_site = i
