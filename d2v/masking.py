"""Masks: which positions the student does not see. Each returns a bool array, True = masked. MASK_KINDS names
the kinds each modality offers and clone_masks draws a batch's masks by kind, one or several clones per sample."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from d2v.core.errors import ConfigError


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    rng: np.random.Generator,
    min_block: int = 16,
    aspect_min: float = 0.3,
) -> np.ndarray:
    """BEiT block-wise mask of one image: exactly `num_masked` of the (h, w) patches, as an (h, w) bool array.

    Rectangles of at least `min_block` patches (capped by what is left of the budget), aspect ratio drawn
    log-uniform in [aspect_min, 1 / aspect_min], are placed until the budget is met or no rectangle adds a
    new patch; any remainder is masked patch by patch next to masked ones, so the count is always exact.
    """
    h, w = grid
    if not 0 <= num_masked <= h * w:
        raise ValueError(f"cannot mask {num_masked} of {h * w} patches")
    mask = np.zeros((h, w), dtype=bool)
    count = 0
    log_lo, log_hi = math.log(aspect_min), math.log(1.0 / aspect_min)
    stalls = 0
    while count < num_masked and stalls < 10:
        left = num_masked - count
        lo = min(min_block, left)
        added = 0
        for _ in range(10):  # a few tries to find a rectangle that adds patches within the budget
            area = rng.uniform(lo, left)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            bh = min(h, max(1, int(round(math.sqrt(area * aspect)))))
            bw = min(w, max(1, int(round(math.sqrt(area / aspect)))))
            top = int(rng.integers(0, h - bh + 1))
            lft = int(rng.integers(0, w - bw + 1))
            window = mask[top : top + bh, lft : lft + bw]
            new = bh * bw - int(window.sum())
            if 0 < new <= left:
                window[...] = True
                added = new
                break
        count += added
        stalls = stalls + 1 if added == 0 else 0
    if count < num_masked:
        mask = _grow(mask, num_masked - count, rng)
    return mask


def _grow(mask: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    """Mask `extra` more patches, preferring unmasked neighbours of masked ones (keeps masks blocky)."""
    flat = mask.reshape(-1)
    while extra > 0:
        near = np.zeros_like(mask)
        near[1:] |= mask[:-1]
        near[:-1] |= mask[1:]
        near[:, 1:] |= mask[:, :-1]
        near[:, :-1] |= mask[:, 1:]
        candidates = np.flatnonzero(near.reshape(-1) & ~flat)
        if candidates.size == 0:
            candidates = np.flatnonzero(~flat)
        take = rng.choice(candidates, size=min(extra, candidates.size), replace=False)
        flat[take] = True
        extra -= take.size
    return mask


def block_masks(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    rng: np.random.Generator,
    min_block: int = 16,
    aspect_min: float = 0.3,
) -> np.ndarray:
    """(batch, h * w) bool masks, each with exactly round(ratio * h * w) masked patches."""
    num = int(round(ratio * grid[0] * grid[1]))
    return np.stack([block_mask(grid, num, rng, min_block, aspect_min).reshape(-1) for _ in range(batch)])


def span_masks(
    lengths: np.ndarray,
    num_frames: int,
    rng: np.random.Generator,
    span_prob: float = 0.065,
    span_length: int = 10,
) -> np.ndarray:
    """wav2vec 2.0 span masks: (B, num_frames) bool, equal masked counts across the batch, never in padding.

    Row b has lengths[b] valid frames; int(span_prob * length + u) span starts (u uniform, at least 1) are drawn
    without replacement from the first length - span_length frames (as fairseq: no span reaches the last frame,
    unless the span is the whole row) and each masks the next span_length frames, so with p = 0.065
    and length 10 about 1 - (1 - p)^10 = 49% of frames end up masked. Every row then keeps as many masked frames
    as the row with fewest, dropping the others at random, as fairseq does with require_same_masks.
    """
    B = len(lengths)
    mask = np.zeros((B, num_frames), dtype=bool)
    for b, n in enumerate(int(v) for v in lengths):
        if n <= 0:
            continue
        span = min(span_length, n)
        num = max(1, int(span_prob * n + rng.random()))
        choices = max(1, n - span)
        starts = rng.choice(choices, size=min(num, choices), replace=False)
        mask[b, (starts[:, None] + np.arange(span)).reshape(-1)] = True
    counts = mask.sum(axis=1)
    target = counts[np.asarray(lengths) > 0].min(initial=num_frames)
    for b in np.flatnonzero(counts > target):
        drop = rng.choice(np.flatnonzero(mask[b]), size=counts[b] - target, replace=False)
        mask[b, drop] = False
    return mask


def token_masks(maskable: np.ndarray, ratio: float, rng: np.random.Generator, span_length: int = 1) -> np.ndarray:
    """Which tokens to predict: (B, T) bool, `ratio` of each row's maskable tokens (probabilistic rounding, as
    BERT/fairseq), never a position where `maskable` (B, T) is False (special and pad tokens).

    span_length 1 picks tokens independently (BERT). span_length > 1 is the released data2vec text recipe (fairseq
    mask_multiple_length): int(ratio * n / span_length + u) starts drawn without replacement among the row's n
    maskable tokens, each masking the next span_length of them (cut at the row's end); spans may overlap, so
    ratio 0.35 with spans of 4 masks about 1 - (1 - 0.35 / 4)^4 = 30.7% of the tokens, not 35%.
    """
    B, T = maskable.shape
    mask = np.zeros((B, T), dtype=bool)
    for b in range(B):
        where = np.flatnonzero(maskable[b])
        n = where.size
        if span_length <= 1:
            num = min(n, int(ratio * n + rng.random()))
            if num:
                mask[b, rng.choice(where, size=num, replace=False)] = True
            continue
        num = min(n, int(ratio * n / span_length + rng.random()))
        if num == 0:
            continue
        starts = rng.choice(n, size=num, replace=False)
        runs = (starts[:, None] + np.arange(span_length)).reshape(-1)
        mask[b, where[runs[runs < n]]] = True
    return mask


def bert_corrupt(
    ids: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    random_range: tuple[int, int],
    random_token: float = 0.1,
    unchanged: float = 0.1,
) -> np.ndarray:
    """The student's view of token ids (B, T): masked positions become `mask_id`, except a `random_token` share
    replaced by ids drawn uniformly from [random_range) and an `unchanged` share left as they are (BERT 80/10/10)."""
    u = rng.random(ids.shape)
    out = ids.copy()
    to_mask = mask & (u < 1.0 - random_token - unchanged)
    to_random = mask & (u >= 1.0 - random_token - unchanged) & (u < 1.0 - unchanged)
    out[to_mask] = mask_id
    out[to_random] = rng.integers(random_range[0], random_range[1], size=int(to_random.sum()))
    return out


# ---------------------------------------------------------------------------------------------- data2vec 2.0
def inverse_block_mask(grid: tuple[int, int], num_kept: int, rng: np.random.Generator, block: int = 3,
                       adjust: float = 0.07, keep_fraction: float | None = None) -> np.ndarray:
    """data2vec 2.0's inverse block mask of one image: (h, w) bool, True = masked, with exactly h * w - num_kept
    masked patches. What is *kept* comes in blocks: int(L * (keep + adjust) / block^2) centres are drawn (with
    replacement), each grown into a block x block square (clamped at the border), and cells are then added or
    removed at random until exactly `num_kept` are kept."""
    h, w = grid
    L = h * w
    if not 0 <= num_kept <= L:
        raise ValueError(f"cannot keep {num_kept} of {L} patches")
    keep = np.zeros((h, w), dtype=bool)
    keep_fraction = num_kept / L if keep_fraction is None else keep_fraction  # the reference: 1 - mask ratio
    centres = int(L * (keep_fraction + adjust) / (block * block))
    lo, hi = block // 2, block - block // 2  # offsets -lo .. hi - 1
    for c in rng.integers(0, L, size=max(centres, 0)):
        r, q = divmod(int(c), w)
        keep[max(r - lo, 0): min(r + hi, h), max(q - lo, 0): min(q + hi, w)] = True
    return ~_exact(keep.reshape(-1), num_kept, rng).reshape(h, w)


def _exact(on: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`on` (1-D bool) with cells switched on or off at random until exactly `count` are on."""
    n = int(on.sum())
    if n > count:
        on[rng.choice(np.flatnonzero(on), size=n - count, replace=False)] = False
    elif n < count:
        on[rng.choice(np.flatnonzero(~on), size=count - n, replace=False)] = True
    return on


def inverse_block_masks(batch: int, grid: tuple[int, int], ratio: float, rng: np.random.Generator, block: int = 3,
                        adjust: float = 0.07) -> np.ndarray:
    """(batch, h * w) inverse block masks, each keeping exactly max(1, int(L * (1 - ratio))) patches."""
    L = grid[0] * grid[1]
    kept = min(L, max(1, int(L * (1.0 - ratio))))
    return np.stack([inverse_block_mask(grid, kept, rng, block, adjust, 1.0 - ratio).reshape(-1)
                     for _ in range(batch)])


def block_mask_1d(length: int, num_frames: int, ratio: float, rng: np.random.Generator, span: int = 5,
                  adjust: float = 0.05) -> np.ndarray:
    """data2vec 2.0's 1-D block mask of one sequence (speech): (num_frames,) bool over the first `length` (valid)
    frames with exactly int(length * ratio) masked (at least 1 and at most length - 1 when length >= 2).
    int(length * (ratio + adjust) / span) centres are drawn, each masking the `span` frames around it (clamped
    at the ends), then frames are added or removed at random to the exact count. Padding is never masked."""
    out = np.zeros(num_frames, dtype=bool)
    if length <= 0:
        return out
    count = int(length * ratio)
    if length >= 2:
        count = min(max(count, 1), length - 1)
    on = np.zeros(length, dtype=bool)
    lo, hi = span // 2, span - span // 2
    for c in rng.integers(0, length, size=max(int(length * (ratio + adjust) / span), 0)):
        on[max(int(c) - lo, 0): min(int(c) + hi, length)] = True
    out[:length] = _exact(on, count, rng)
    return out


def random_mask(length: int, num_positions: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """data2vec 2.0's text mask (MAE-style): (num_positions,) bool over the first `length` valid positions, keeping
    exactly int(length * (1 - ratio)) of them at random (at least 1, and at least one masked when length >= 2)."""
    out = np.zeros(num_positions, dtype=bool)
    if length <= 0:
        return out
    kept = int(length * (1.0 - ratio))
    kept = min(max(kept, 1), max(length - 1, 1))
    out[:length] = True
    out[rng.choice(length, size=kept, replace=False)] = False
    return out


def kept_positions(mask: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The positions a data2vec 2.0 student encodes: (B, T) masks (True = masked) and valid (B, T) (True at real,
    non-padding positions; None: all) -> (B, Tk) int64 kept positions of each row in ascending order, Tk the
    largest kept count, rows with fewer filled with T; and (B, Tk) bool, True at those filler slots (None when
    every row keeps Tk)."""
    keep = ~mask if valid is None else ~mask & valid
    B, T = keep.shape
    counts = keep.sum(axis=1)
    Tk = int(counts.max(initial=0))
    order = np.argsort(~keep, axis=1, kind="stable")[:, :Tk].astype(np.int64)
    filler = np.arange(Tk)[None, :] >= counts[:, None]
    order[filler] = T
    return order, (filler if filler.any() else None)


# ------------------------------------------------------------------------------------------ kinds and clones
@dataclass(frozen=True)
class Site:
    """Where one sample's masks go: `length` positions, of which `valid` ones are real (not padding; None: all) and
    `maskable` ones may be predicted (text: not a special token; None: every valid one); images: their (h, w) grid."""

    length: int
    valid: np.ndarray | None = None  # (length,) bool
    maskable: np.ndarray | None = None  # (length,) bool
    grid: tuple[int, int] | None = None

    @property
    def valid_count(self) -> int:
        """Valid positions; for speech they are a prefix of the row (padding comes after the audio)."""
        return self.length if self.valid is None else int(self.valid.sum())


def _text_random(mc, rng: np.random.Generator, clones: int, site: Site) -> np.ndarray:
    where = np.flatnonzero(site.valid) if site.valid is not None else np.arange(site.length)
    rows = np.zeros((clones, site.length), dtype=bool)
    for c in range(clones):
        rows[c, where] = random_mask(where.size, where.size, mc.ratio, rng)
    return rows


def _text_tokens(span: int):
    def masks(mc, rng: np.random.Generator, clones: int, site: Site) -> np.ndarray:
        maskable = site.maskable[None] if site.maskable is not None else np.ones((1, site.length), dtype=bool)
        return np.stack([token_masks(maskable, mc.ratio, rng, span if span else mc.span_length)[0]
                         for _ in range(clones)])
    return masks


# (modality, mask.kind) -> masks(mask config, rng, clones, site) -> (clones, site.length) bool, True = masked. The
# clones of a sample draw from its generator one after the other, so a sample's masks do not depend on the rest of
# its batch. v1 recipes use clones = 1.
MASK_KINDS: dict[tuple[str, str], Callable[..., np.ndarray]] = {
    ("vision", "block"): lambda mc, rng, clones, site: block_masks(clones, site.grid, mc.ratio, rng, mc.min_block,
                                                                   mc.aspect_min),
    ("vision", "inverse_block"): lambda mc, rng, clones, site: inverse_block_masks(clones, site.grid, mc.ratio, rng,
                                                                                   mc.block_size, mc.adjust),
    ("speech", "span"): lambda mc, rng, clones, site: span_masks(np.full(clones, site.valid_count), site.length, rng,
                                                                 mc.span_prob, mc.span_length),
    ("speech", "block_1d"): lambda mc, rng, clones, site: np.stack([
        block_mask_1d(site.valid_count, site.length, mc.ratio, rng, mc.span_length, mc.adjust) for _ in range(clones)]),
    ("text", "bert"): _text_tokens(1),
    ("text", "span"): _text_tokens(0),  # runs of mask.span_length tokens
    ("text", "random"): _text_random,
}


def kinds(modality: str) -> tuple[str, ...]:
    """The mask kinds a modality offers."""
    return tuple(kind for m, kind in MASK_KINDS if m == modality)


def clone_masks(modality: str, mc, rngs: list[np.random.Generator], sites: list[Site], clones: int = 1) -> np.ndarray:
    """(B * clones, T) bool masks of a batch by mask config `mc` (its kind and sizes): `clones` masks of sample b,
    drawn from rngs[b], at rows b * clones .. (b + 1) * clones - 1."""
    masks = MASK_KINDS.get((modality, mc.kind))
    if masks is None:
        raise ConfigError(f"mask.kind {mc.kind!r} is not available for {modality}; use "
                          + " or ".join(repr(k) for k in kinds(modality)))
    return np.concatenate([masks(mc, rng, clones, site) for rng, site in zip(rngs, sites)])
