"""Training randomness (d2v.models.stochastic): dropout, attention dropout, drop-path and LayerDrop draw the same
masks for a sample however its global batch is split into micro-batches, and still drop with the right rate,
independently per element, with F.dropout's scaling."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from d2v.models import stochastic
from d2v.models.stochastic import Dropout, DropPath, LayerDrop, attention, drop_mask, dropout, keyed, row_keys


def _split_equal(fn, x: torch.Tensor, seed: int, first: int, rows_per_sample: int = 1, cut: int | None = None):
    """fn(x) on the whole micro-batch against fn on two halves keyed by their own first positions."""
    B = x.shape[0] // rows_per_sample
    cut = B // 2 if cut is None else cut
    with keyed(seed, first, B):
        whole = fn(x)
    with keyed(seed, first, cut):
        a = fn(x[: cut * rows_per_sample])
    with keyed(seed, first + cut, B - cut):
        b = fn(x[cut * rows_per_sample:])
    return whole, torch.cat([a, b])


@pytest.mark.parametrize("keyed_pass", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.37, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_keeps_each_element_with_1_minus_p_and_scales_it(p, dtype, keyed_pass):
    x = (torch.rand(301, 1031) + 0.5).to(dtype).requires_grad_()  # no zeros: a zero output means dropped
    seed = int(torch.randint(0, 2**31, ()))
    first = int(torch.randint(0, 2**40, ()))
    torch.manual_seed(seed)
    scope = keyed(seed, first, 301) if keyed_pass else contextlib.nullcontext()
    with scope:
        y = dropout(x, p, site=5)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # 5 sigma
    assert y.dtype == dtype
    assert torch.equal(y[kept], (x.detach() * (1.0 / (1 - p)))[kept])  # scaled as F.dropout's x * (1 / (1 - p))
    (y.float() * 3).sum().backward()
    assert torch.equal(x.grad, torch.where(kept, 3 * torch.tensor(1.0 / (1 - p), dtype=dtype), 0).to(dtype))
    # the mask is independent of position: rows and columns drop alike, neighbours are uncorrelated
    rows, cols = kept.float().mean(1), kept.float().mean(0)
    assert rows.std() < 3 * (p * (1 - p) / kept.shape[1]) ** 0.5 and cols.std() < 3 * (p * (1 - p) / kept.shape[0]) ** 0.5
    for a, b in ((kept[:, :-1], kept[:, 1:]), (kept[:-1], kept[1:])):
        assert abs(torch.corrcoef(torch.stack([a.float().flatten(), b.float().flatten()]))[0, 1].item()) < 0.02
    torch.manual_seed(seed)
    with keyed(seed, first, 301) if keyed_pass else contextlib.nullcontext():
        assert torch.equal(dropout(x, p, site=5), y)  # reproducible: resumed runs draw alike
    layer = Dropout(p).eval()
    assert layer(x) is x and dropout(x, 0.0) is x and dropout(x, p, training=False) is x


def test_keyed_dropout_does_not_depend_on_the_split_the_padding_or_torchs_generator():
    x = torch.ones(8, 13, 24)
    whole, halves = _split_equal(lambda t: dropout(t, 0.3, site=7), x, seed=3, first=40)
    assert torch.equal(whole, halves)
    whole, halves = _split_equal(lambda t: dropout(t, 0.3, site=7), x, seed=3, first=40, cut=3)
    assert torch.equal(whole, halves)
    with keyed(3, 40, 8):
        torch.manual_seed(0)
        a = dropout(x, 0.3, site=7)
        torch.manual_seed(1)
        assert torch.equal(dropout(x, 0.3, site=7), a)  # torch's generator plays no part
        # a micro-batch padded to 10 positions draws the same values at the positions it shares with 13
        assert torch.equal(dropout(x[:, :10], 0.3, site=7), a[:, :10])
        assert not torch.equal(dropout(x, 0.3, site=8), a)  # another call site, other masks
    with keyed(4, 40, 8):
        assert not torch.equal(dropout(x, 0.3, site=7), a)  # another seed
    with keyed(3, 48, 8):
        assert not torch.equal(dropout(x, 0.3, site=7), a)  # other samples


def test_clone_rows_are_keyed_by_sample_and_clone():
    """data2vec 2.0: B x r rows (clone j of sample i at row i * r + j) split with their samples."""
    x = torch.ones(8 * 3, 5, 16)
    whole, halves = _split_equal(lambda t: dropout(t, 0.5, site=2), x, seed=1, first=0, rows_per_sample=3)
    assert torch.equal(whole, halves)
    with keyed(1, 0, 8):
        keys = row_keys(24, 2)
        assert len(set(keys.tolist())) == 24  # every clone its own masks
        with pytest.raises(ValueError, match="multiple"):
            row_keys(20, 2)


def test_drop_mask_int32_elements_equal_the_int64_arithmetic_in_chunks_or_whole():
    keys = stochastic.hash32(torch.arange(7, dtype=torch.int64) * 977)
    shape = (7, 3, 11, 37)  # odd sizes: vector loops' tails
    grid = keys
    for size in shape[1:-1]:
        grid = stochastic.hash32(grid[..., None] ^ torch.arange(size))
    col = stochastic.hash32(torch.arange(shape[-1]) + 0x9E3779B9)
    b = ((grid[..., None] ^ col) * 0x5BD1E995) & 0xFFFFFFFF
    bits = b ^ (b >> 15)  # unsigned 32-bit values in int64
    p = 0.23
    want = (bits ^ 2**31) < round(p * 2**32)  # int32's order: the signed view of the bits below its p-quantile
    for chunk in (0, 1, 40, 1 << 15):
        assert torch.equal(drop_mask(keys, shape, p, chunk_elements=chunk), want), chunk


@pytest.mark.parametrize("mask_kind", ["none", "bool", "bias"])
def test_keyed_attention_dropout_is_attention_with_its_probabilities_dropped(mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 2, 9, 8) for _ in range(3))
    mask = {"none": None, "bool": torch.rand(6, 1, 1, 9) > 0.3, "bias": torch.randn(1, 2, 9, 9)}[mask_kind]
    if mask_kind == "bool":
        mask[..., 0] = True  # every query can attend somewhere
    rows = lambda t, i, j: t if t is None or t.shape[0] == 1 else t[i:j]  # noqa: E731
    with keyed(0, 0, 6):
        # nothing dropped (p below 2^-33): scaled_dot_product_attention without dropout
        same = attention(q, k, v, mask, 1e-12, True, site=3)
        torch.testing.assert_close(same, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5,
                                   atol=1e-6)
        out = attention(q, k, v, mask, 0.4, True, site=3)
        assert torch.equal(attention(q, k, v, mask, 0.4, True, site=3), out)
    assert not torch.allclose(out, same)
    # the samples' rows split with them: micro-batches of 2 and 4 at their own positions
    parts = []
    for i, j in ((0, 2), (2, 6)):
        with keyed(0, i, j - i):
            parts.append(attention(q[i:j], k[i:j], v[i:j], rows(mask, i, j), 0.4, True, site=3))
    torch.testing.assert_close(torch.cat(parts), out, rtol=0, atol=1e-6)
    assert torch.equal(attention(q, k, v, mask, 0.4, False, site=3),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # eval: no dropout


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_drop_path_and_layerdrop_drop_whole_rows_at_rate_p_whatever_the_split(p):
    path, layers = DropPath(p).train(), LayerDrop(p).train()
    path.random_site, layers.random_site = 11, 12
    x = torch.ones(4000, 3, 2)
    with keyed(9, 123, 4000):
        y = path(x)
        keep = layers.keep(4000, 1, x.device)
    kept = y[:, 0, 0] != 0
    assert torch.all(y[kept] == 1.0 / (1 - p)) and torch.all(y[~kept] == 0)
    assert torch.all((y == 0).all(dim=(1, 2)) | (y != 0).all(dim=(1, 2)))  # whole rows
    sigma = (p * (1 - p) / 4000) ** 0.5
    assert abs(kept.float().mean() - (1 - p)) < 5 * sigma and abs(keep.float().mean() - (1 - p)) < 5 * sigma
    assert abs(torch.corrcoef(torch.stack([kept.float(), keep.float()]))[0, 1]) < 0.1  # independent sites
    whole, halves = _split_equal(path, x[:10], seed=9, first=123)
    assert torch.equal(whole, halves)
    assert layers.eval().keep(10, 1, x.device) is None and path.eval()(x) is x


def test_layerdrop_rows_keep_their_input_and_every_block_runs():
    from d2v.models.common import run_blocks

    class Add(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, attn):
            return x + self.w, x

    blocks = torch.nn.ModuleList(Add() for _ in range(3))
    layers = LayerDrop(0.5).train()
    x = torch.zeros(64, 2, 1)
    with keyed(0, 0, 64):
        out, _ = run_blocks(blocks, x, None, layerdrop=layers)
        kept = torch.stack([layers.keep(64, i, x.device) for i in range(3)])
    assert torch.equal(out[:, 0, 0], kept.sum(0).float())  # each row: one per block it ran
    out.sum().backward()
    assert all(b.w.grad is not None for b in blocks)  # no block is left without a gradient (DDP, FSDP)


def test_models_number_their_call_sites_in_module_order():
    from d2v.core.presets import preset_config
    from d2v.models import build_encoder

    cfg = preset_config("text", "tiny")
    cfg.model.vocab_size = 100
    a, b = build_encoder(cfg.model), build_encoder(cfg.model)
    sites = [m.random_site for m in a.modules() if hasattr(m, "random_site")]
    assert len(set(sites)) == len(sites) > 4
    assert sites == [m.random_site for m in b.modules() if hasattr(m, "random_site")]  # the same in every process
