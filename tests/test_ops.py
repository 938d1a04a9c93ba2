"""The three hot ops (torch backend and the readable reference) against float64 references written here."""
import pytest
import torch

from d2v import ops
from d2v.ops import reference

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}  # inputs are cast exactly; math is fp32


def ref_norm(x, kind, valid, eps):
    """float64 normalization of x (B, T, D); valid (B, T) bool for instance norm."""
    if kind == "none":
        return x
    if kind == "layer":
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        rows = x[b][valid[b]]  # (T_valid, D)
        if rows.shape[0] == 0:
            mu, var = torch.zeros(x.shape[-1], dtype=x.dtype), torch.zeros(x.shape[-1], dtype=x.dtype)
        else:
            mu, var = rows.mean(0), rows.var(0, unbiased=False)
        out[b] = (x[b] - mu) / torch.sqrt(var + eps)
    return out


def ref_targets(layers, norm, final_norm, mask, padding_mask, eps):
    layers = [l.double() for l in layers]
    B, T, _ = layers[0].shape
    valid = torch.ones(B, T, dtype=torch.bool) if padding_mask is None else ~padding_mask
    y = torch.stack([ref_norm(l, norm, valid, eps) for l in layers]).mean(0)
    y = ref_norm(y, final_norm, valid, eps)
    return y if mask is None else y[mask]


def ref_loss(pred, target, mask, beta, scale, reduction):
    d = pred.double() - target.double()
    if mask is not None:
        d = d[mask]
    e = d * d if beta == 0 else torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta)
    rows = e.sum(-1) * scale
    return rows.sum() if reduction == "sum" else rows.sum() / max(rows.numel(), 1)


SHAPES = [(2, 5, 7), (1, 1, 1), (3, 1, 33), (1, 9, 768), (4, 6, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm,final_norm", [("layer", "layer"), ("layer", "none"), ("instance", "none"),
                                             ("instance", "layer"), ("none", "instance")])
def test_targets_match_float64(shape, dtype, k, norm, final_norm):
    B, T, D = shape
    layers = [(torch.randn(B, T, D) * 3 + 1).to(dtype) for _ in range(k)]
    mask = torch.rand(B, T) < 0.5
    padding = torch.zeros(B, T, dtype=torch.bool)
    if T > 2:
        padding[0, T - 2 :] = True  # one padded sequence
    want_full = ref_targets(layers, norm, final_norm, None, padding, 1e-5)
    want_masked = ref_targets(layers, norm, final_norm, mask, padding, 1e-5)
    for impl in ("op", "reference"):
        if impl == "op":
            full = ops.targets(layers, norm, final_norm, padding_mask=padding, backend="torch")
            masked = ops.targets(torch.stack(layers), norm, final_norm, mask=mask, padding_mask=padding, backend="torch")
        else:
            full = reference.targets_reference(layers, norm, final_norm, None, padding)
            masked = reference.targets_reference(layers, norm, final_norm, mask, padding)
        assert full.dtype == torch.float32 and full.shape == (B, T, D)
        assert masked.shape == (int(mask.sum()), D)
        # Constant rows (D = 1 layer norm, T = 1 instance norm) normalize to 0: absolute tolerance covers it.
        torch.testing.assert_close(full.double(), want_full, atol=TOL[dtype] * 10, rtol=TOL[dtype])
        torch.testing.assert_close(masked.double(), want_masked, atol=TOL[dtype] * 10, rtol=TOL[dtype])


def test_targets_empty_and_full_mask():
    layers = torch.randn(2, 3, 4, 5)
    assert ops.targets(layers, mask=torch.zeros(3, 4, dtype=torch.bool)).shape == (0, 5)
    full = ops.targets(layers, mask=torch.ones(3, 4, dtype=torch.bool))
    torch.testing.assert_close(full, ops.targets(layers).reshape(12, 5))


def test_targets_instance_norm_ignores_padding_values():
    x = torch.randn(2, 1, 6, 4)  # K = 2, B = 1
    pad = torch.tensor([[False, False, False, False, True, True]])
    a = ops.targets(x, "instance", "none", padding_mask=pad)
    x2 = x.clone()
    x2[:, :, 4:] = 1e4  # garbage in padded steps must not change the valid outputs
    b = ops.targets(x2, "instance", "none", padding_mask=pad)
    torch.testing.assert_close(a[:, :4], b[:, :4])


def test_targets_rejects_bad_input():
    with pytest.raises(ValueError):
        ops.targets([torch.randn(2, 3, 4), torch.randn(2, 3, 5)])
    with pytest.raises(ValueError):
        ops.targets(torch.randn(1, 2, 3, 4), norm="batch")
    with pytest.raises(ValueError):
        ops.targets(torch.randn(1, 2, 3, 4), mask=torch.ones(2, 3))  # not bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [0.9, 0.9999])
def test_ema_update_change(dtype, decay):
    shapes = [(3, 5), (1,), (7,), (4, 1, 3), (768,), (33, 17)]
    teacher = [torch.randn(s) for s in shapes]
    student = [torch.randn(s).to(dtype) for s in shapes]
    old = [t.clone() for t in teacher]
    ops.ema_update_(teacher, student, decay, backend="torch")
    for t, o, s in zip(teacher, old, student):
        change = t.double() - o.double()
        want = (1 - decay) * (s.double() - o.double())
        # The change, not the value: with decay near 1 a kernel that does nothing still looks close.
        torch.testing.assert_close(change, want, atol=1e-6, rtol=1e-4)
    ref_t = [o.clone() for o in old]
    reference.ema_update_reference(ref_t, student, decay)
    for a, b, o in zip(ref_t, teacher, old):
        torch.testing.assert_close(a - o, b - o, atol=1e-6, rtol=1e-4)


def test_ema_update_rejects_bad_input():
    with pytest.raises(ValueError):
        ops.ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.9)
    with pytest.raises(ValueError):
        ops.ema_update_([torch.zeros(3).half()], [torch.zeros(3)], 0.9)


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 1, 1), (3, 4, 33), (1, 3, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_grad_match_float64(shape, dtype, beta, reduction):
    pred = (torch.randn(shape) * 2).to(dtype).requires_grad_()
    target = torch.randn(shape).to(dtype)
    mask = torch.rand(shape[:-1]) < 0.6
    scale = 0.37
    loss = ops.masked_regression_loss(pred, target, mask, beta=beta, scale=scale, reduction=reduction, backend="torch")
    loss.backward()
    p64 = pred.detach().double().requires_grad_()
    want = ref_loss(p64, target, mask, beta, scale, reduction)
    want.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.grad.double(), p64.grad, atol=tol * 1e-2, rtol=tol)
    assert pred.grad.dtype == dtype
    ref = reference.masked_regression_loss_reference(pred.detach(), target, mask, beta, scale, reduction)
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)


def test_loss_flat_rows_without_mask():
    pred, target = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    loss = ops.masked_regression_loss(pred, target, beta=1.0)
    torch.testing.assert_close(loss.double(), ref_loss(pred, target, None, 1.0, 1.0, "mean"))


def test_loss_empty_mask_is_zero_with_zero_grad():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    loss = ops.masked_regression_loss(pred, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_loss_grad_scales_with_upstream_gradient():
    pred, target = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    (3.0 * ops.masked_regression_loss(pred, target)).backward()
    g3 = pred.grad.clone()
    pred.grad = None
    ops.masked_regression_loss(pred, target).backward()
    torch.testing.assert_close(g3, 3 * pred.grad)


def test_ops_compile_without_graph_breaks():
    def step(pred, target, mask, layers):
        y = ops.targets(layers, "layer", "layer", backend="torch")
        return ops.masked_regression_loss(pred, y + target, mask, beta=2.0, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    pred = torch.randn(2, 5, 8, requires_grad=True)
    args = (torch.randn(2, 5, 8), torch.rand(2, 5) < 0.5, torch.randn(3, 2, 5, 8))
    torch.testing.assert_close(compiled(pred, *args), step(pred, *args))
    compiled(pred, *args).backward()
    assert pred.grad is not None


def test_unknown_or_unavailable_backend_is_an_error():
    with pytest.raises(ops.BackendUnavailable):
        ops.targets(torch.randn(1, 2, 3, 4), backend="nope")
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.masked_regression_loss(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_opcheck_registered_ops():
    layers = [torch.randn(2, 3, 4) for _ in range(2)]
    torch.library.opcheck(torch.ops.d2v.targets.default, (layers, "layer", "layer", None, None, 1e-5, "torch"))
    pred = torch.randn(2, 3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.d2v.masked_regression_loss.default,
                          (pred, torch.randn(2, 3, 4), torch.rand(2, 3) < 0.5, 1.0, 0.5, "mean", True, "torch"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.d2v.ema_update_.default,
                          ([torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)], 0.9, "torch"))
