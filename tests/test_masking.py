"""BEiT block-wise masking: exact counts, blocky shapes, fresh randomness."""
import numpy as np
import pytest

from d2v.masking import block_mask, block_masks


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.6), ((4, 4), 0.6), ((7, 7), 0.6), ((3, 5), 0.4), ((1, 1), 0.6),
                                        ((16, 16), 0.8), ((2, 2), 0.5)])
def test_exact_count(grid, ratio):
    rng = np.random.default_rng()
    masks = block_masks(64, grid, ratio, rng, min_block=min(16, grid[0] * grid[1]))
    want = int(round(ratio * grid[0] * grid[1]))
    assert masks.shape == (64, grid[0] * grid[1]) and masks.dtype == bool
    assert (masks.sum(1) == want).all()


def test_masks_are_blocks_not_scatter():
    rng = np.random.default_rng()
    m = block_mask((14, 14), 118, rng)
    # Fraction of masked patches with a masked 4-neighbour: blocks give nearly all, i.i.d. scatter far fewer.
    padded = np.pad(m, 1)
    neighbour = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert (neighbour & m).sum() / m.sum() > 0.95
    # Rows of the masked region span several patches: at least one row with a run of 4 or more.
    runs = max(max(len(r) for r in "".join("1" if v else "0" for v in row).split("0")) for row in m)
    assert runs >= 4


def test_fresh_randomness_and_seeded_reproducibility():
    a = block_masks(8, (14, 14), 0.6, np.random.default_rng())
    b = block_masks(8, (14, 14), 0.6, np.random.default_rng())
    assert not np.array_equal(a, b)
    assert len({row.tobytes() for row in a}) == 8  # different within a batch too
    c = block_masks(8, (14, 14), 0.6, np.random.default_rng(5))
    d = block_masks(8, (14, 14), 0.6, np.random.default_rng(5))
    assert np.array_equal(c, d)


def test_every_position_gets_masked_sometimes():
    masks = block_masks(400, (8, 8), 0.6, np.random.default_rng(), min_block=4)
    freq = masks.mean(0)
    assert freq.min() > 0.1 and freq.max() < 0.95  # corners are covered less often by blocks, never 0


def test_impossible_count_is_an_error():
    with pytest.raises(ValueError):
        block_mask((2, 2), 5, np.random.default_rng())
