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


# ---------------------------------------------------------------------------------------------- every backend
def _cases():
    """(backend, device) pairs: every backend that can run CPU tensors here (torch, triton under the
    interpreter, the compiled cpu backend), and the GPU backends as `cuda`-marked cases."""
    from d2v.ops import backends

    cpu = [pytest.param(name, "cpu", id=f"{name}-cpu") for name in ("torch", "triton", "cpu")
           if backends.status(name, "cpu")[0]]
    gpu = [pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.cuda)
           for name in ("torch", "triton", "cuda")]
    return cpu + gpu


BACKEND_CASES = _cases()


def _skip_unavailable(backend, device):
    from d2v.ops import backends

    ok, why = backends.status(backend, device)
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("grad_out", [65536.0, 1.0 / 65536.0])
def test_fp16_loss_gradient_survives_loss_scaling(backend, device, grad_out):
    """fp16 pred under a grad scaler: the gradient is scaled before it is rounded to fp16, never after.

    With scale 1e-3 the unscaled gradient is ~1e-5 per element (fp16 subnormals). Stored in fp16 and then
    multiplied by an fp16 65536 (= inf), it became inf / NaN (0 x inf on unselected rows). The result must equal
    the float64 gradient times grad_out, rounded once to fp16.
    """
    _skip_unavailable(backend, device)
    torch.manual_seed(0)
    R, D = 64, 32
    pred = torch.randn(R, D).half().to(device).requires_grad_()
    target = torch.randn(R, D).half().to(device)
    mask = (torch.rand(R) < 0.5).to(device)
    loss = ops.masked_regression_loss(pred, target, mask, scale=1e-3, backend=backend)
    (loss * grad_out).backward()
    p64 = pred.detach().cpu().double().requires_grad_()
    (ref_loss(p64, target.cpu(), mask.cpu(), 0.0, 1e-3, "mean") * grad_out).backward()
    want = p64.grad.half()  # fp16's own rounding of the final gradient, and nothing more
    got = pred.grad.cpu()
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), rtol=2 ** -10, atol=2 ** -24)
    if grad_out > 1:
        assert (got[mask.cpu()] != 0).float().mean() > 0.99  # not flushed to zero


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_empty_sizes_give_empty_results(backend, device):
    """D = 0, T = 0, B = 0 and an empty selection: empty (or zero) results, no ZeroDivisionError."""
    _skip_unavailable(backend, device)
    for B, T, D in [(2, 3, 0), (2, 0, 4), (0, 3, 4)]:
        layers = [torch.randn(B, T, D, device=device) for _ in range(2)]
        ones = torch.ones(B, T, dtype=torch.bool, device=device)
        zeros = torch.zeros(B, T, dtype=torch.bool, device=device)
        for norm, final_norm in [("layer", "layer"), ("instance", "instance"), ("none", "none")]:
            out = ops.targets(layers, norm, final_norm, backend=backend)
            assert out.shape == (B, T, D) and out.dtype == torch.float32
            masked = ops.targets(layers, norm, final_norm, mask=ones, padding_mask=zeros, backend=backend)
            assert masked.shape == (B * T, D)
        pred = torch.randn(B, T, D, device=device, requires_grad=True)
        loss = ops.masked_regression_loss(pred, torch.randn(B, T, D, device=device), ones, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and pred.grad.shape == pred.shape
    teacher = [torch.zeros(0, device=device), torch.ones(3, device=device)]
    student = [torch.zeros(0, device=device), torch.zeros(3, device=device)]
    ops.ema_update_(teacher, student, 0.5, backend=backend)
    torch.testing.assert_close(teacher[1], torch.full((3,), 0.5, device=device))


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_float64_inputs_are_computed_like_fp32(backend, device):
    _skip_unavailable(backend, device)
    B, T, D = 2, 5, 12
    layers = [torch.randn(B, T, D, dtype=torch.float64, device=device) for _ in range(2)]
    mask = (torch.rand(B, T) < 0.5).to(device)
    got = ops.targets(layers, "layer", "layer", mask=mask, backend=backend)
    want = reference.targets_reference(layers, "layer", "layer", mask, dtype=torch.float64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    pred = torch.randn(B, T, D, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.randn(B, T, D, dtype=torch.float64, device=device)
    loss = ops.masked_regression_loss(pred, target, mask, beta=0.5, backend=backend)
    loss.backward()
    p64 = pred.detach().clone().requires_grad_()
    ref_loss(p64, target, mask, 0.5, 1.0, "mean").backward()
    assert pred.grad.dtype == torch.float64
    torch.testing.assert_close(pred.grad, p64.grad, rtol=1e-5, atol=1e-6)
    teacher = [torch.zeros(7, device=device)]
    ops.ema_update_(teacher, [torch.ones(7, dtype=torch.float64, device=device)], 0.75, backend=backend)
    torch.testing.assert_close(teacher[0], torch.full((7,), 0.25, device=device))


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_fake_gradient_matches_the_kernel_for_strided_fp16_pred(backend, device):
    """The meta (fake) kernel promises the gradient layout and dtype the real kernel returns (torch.compile)."""
    _skip_unavailable(backend, device)
    pred = torch.randn(7, 3, 5, device=device).half().transpose(0, 1).requires_grad_()  # (3, 7, 5), strided
    target = torch.randn(3, 7, 5, device=device)
    mask = (torch.rand(3, 7) < 0.5).to(device)
    torch.library.opcheck(torch.ops.d2v.masked_regression_loss.default,
                          (pred, target, mask, 0.5, 1.0, "mean", True, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_tensors_on_another_device_are_refused():
    """A mask (or target, student) on another device than the data: one clear error, never a raw pointer."""
    layers = [torch.randn(2, 3, 4)]
    meta_mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask is on meta but the data is on cpu"):
        ops.targets(layers, mask=meta_mask)
    with pytest.raises(ValueError, match="padding_mask is on meta"):
        ops.targets(layers, "instance", padding_mask=meta_mask)
    with pytest.raises(ValueError, match="mask is on meta"):
        ops.masked_regression_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), meta_mask)
    with pytest.raises(ValueError, match="target is on meta"):
        ops.masked_regression_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta"))
    with pytest.raises(ValueError, match="student tensor is on meta"):
        ops.ema_update_([torch.zeros(3)], [torch.zeros(3, device="meta")], 0.9)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backend_loss_gradient_is_never_stored_in_fp16(backend, device, dtype):
    """Each backend's own gradient: fp32, or bf16 for bf16 pred (fp32's exponent range, half the traffic)."""
    _skip_unavailable(backend, device)
    from d2v.ops import backends

    impl = backends.module(backend)
    pred = torch.randn(4, 8, device=device).to(dtype)
    _, grad = impl.masked_regression_loss(pred, torch.randn(4, 8, device=device), None, 0.0, 1.0, "mean", True)
    assert grad.dtype == ops.grad_dtype(dtype) != torch.float16 and grad.is_contiguous()


# ---------------------------------------------------------------------------------------------- clones (multi-mask)
# pred (B*M, *S, D) against target (B, *S, D): pred sample i pairs with target sample i // M, i.e. exactly the op
# on target.repeat_interleave(M, 0), which no backend may build. Shapes: D not a power of two, S = 1, B = 1, (N, D).
CLONE_SHAPES = [(2, 5, 7), (1, 1, 1), (3, 1, 33), (1, 4, 100), (4, 7), (2, 2, 3, 5)]


def _clone_inputs(shape, M, pred_dtype, target_dtype, device="cpu", p=0.6):
    B, rest = shape[0], shape[1:]
    pred = (torch.randn(B * M, *rest) * 2).to(pred_dtype).to(device).requires_grad_()
    target = torch.randn(B, *rest).to(target_dtype).to(device)
    mask = (torch.rand(B * M, *rest[:-1]) < p).to(device)
    return pred, target, mask


def _check_clones(pred, target, mask, M, beta, reduction, backend, scale=0.37):
    """The op with clones=M vs the float64 reference on repeat_interleave'd targets: loss and gradient."""
    pred.grad = None
    loss = ops.masked_regression_loss(pred, target, mask, beta=beta, scale=scale, reduction=reduction,
                                      backend=backend, clones=M)
    (loss * 3).backward()
    p64 = pred.detach().cpu().double().requires_grad_()
    repeated = target.cpu().repeat_interleave(M, 0)
    want = ref_loss(p64, repeated, None if mask is None else mask.cpu(), beta, scale, reduction)
    (want * 3).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double().cpu(), want.detach(), atol=1e-5, rtol=1e-5)
    assert pred.grad.dtype == pred.dtype and pred.grad.shape == pred.shape
    tol = 1e-5 if pred.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(pred.grad.cpu().double(), p64.grad.to(pred.dtype).double(), atol=tol * 1e-2, rtol=tol)


@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_loss_clones_match_float64_on_repeated_targets(pred_dtype, target_dtype):
    for shape in CLONE_SHAPES:
        for M in (1, 2, 3, 5):
            pred, target, mask = _clone_inputs(shape, M, pred_dtype, target_dtype)
            for beta, reduction in [(0.0, "mean"), (0.0, "sum"), (0.5, "mean"), (2.0, "sum")]:
                _check_clones(pred, target, mask, M, beta, reduction, "torch")
            _check_clones(pred, target, None, M, 0.5, "mean", "torch")


@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_reference_clones_is_the_loss_on_repeated_targets(M):
    pred, target, mask = _clone_inputs((2, 5, 7), M, torch.float32, torch.float32)
    for beta, reduction in [(0.0, "mean"), (0.5, "sum")]:
        got = reference.masked_regression_loss_reference(pred.detach(), target, mask, beta, 0.5, reduction,
                                                         dtype=torch.float64, clones=M)
        want = ref_loss(pred.detach(), target.repeat_interleave(M, 0), mask, beta, 0.5, reduction)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("pred_shape,target_shape,clones", [
    ((6, 5, 7), (2, 5, 7), 2),  # leading dim not clones * B
    ((6, 5, 7), (2, 4, 7), 3),  # S differs
    ((6, 5, 7), (2, 5, 8), 3),  # D differs
    ((6, 5, 7), (2, 35), 3),  # rank differs
    ((6,), (2,), 3),  # no (..., D) rows
    ((2, 5, 7), (2, 5, 7), 0),  # clones < 1
    ((2, 5, 7), (2, 5, 7), -1),
])
def test_loss_clones_wrong_shapes_are_one_value_error(pred_shape, target_shape, clones):
    with pytest.raises(ValueError, match=r"clones|shape") as err:
        ops.masked_regression_loss(torch.randn(pred_shape), torch.randn(target_shape), clones=clones)
    if clones >= 1:
        assert str(tuple(pred_shape)) in str(err.value) and str(tuple(target_shape)) in str(err.value)


def test_loss_clones_mask_must_have_pred_shape():
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(6, 5\)"):
        ops.masked_regression_loss(torch.randn(6, 5, 7), torch.randn(2, 5, 7), torch.ones(2, 5, dtype=torch.bool),
                                   clones=3)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_loss_clones_every_backend_matches_float64(backend, device):
    _skip_unavailable(backend, device)
    for shape, M, pred_dtype, target_dtype in [((2, 5, 7), 3, torch.float32, torch.float32),
                                               ((1, 1, 1), 5, torch.bfloat16, torch.float32),
                                               ((3, 1, 33), 2, torch.float16, torch.bfloat16),
                                               ((4, 7), 3, torch.bfloat16, torch.float16),
                                               ((1, 3, 100), 2, torch.float32, torch.bfloat16)]:
        pred, target, mask = _clone_inputs(shape, M, pred_dtype, target_dtype, device)
        _check_clones(pred, target, mask, M, 0.0, "mean", backend)
        _check_clones(pred, target, None, M, 0.5, "sum", backend)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_loss_clones_equals_the_op_on_repeated_targets(backend, device):
    """clones=M gives the numbers of today's op on target.repeat_interleave(M, 0): bit for bit in the kernels (the
    same arithmetic, only the target row's address differs), and clones=1 is today's op."""
    _skip_unavailable(backend, device)
    exact = backend != "torch" or device == "cpu"
    for M, beta in [(1, 0.0), (3, 0.0), (5, 0.75)]:
        pred, target, mask = _clone_inputs((2, 6, 24), M, torch.bfloat16, torch.float32, device)
        results = []
        for y, clones in [(target, M), (target.repeat_interleave(M, 0), 1)]:
            pred.grad = None
            loss = ops.masked_regression_loss(pred, y, mask, beta=beta, backend=backend, clones=clones)
            loss.backward()
            results.append((loss.detach(), pred.grad.clone()))
        (la, ga), (lb, gb) = results
        if exact:
            assert torch.equal(la, lb) and torch.equal(ga, gb)
        else:
            torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
            torch.testing.assert_close(ga, gb, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_loss_clones_empty_mask_and_strided_inputs(backend, device):
    _skip_unavailable(backend, device)
    pred = torch.randn(6, 4, 9, device=device, requires_grad=True)
    target = torch.randn(2, 4, 9, device=device)
    loss = ops.masked_regression_loss(pred, target, torch.zeros(6, 4, dtype=torch.bool, device=device), beta=0.5,
                                      backend=backend, clones=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))
    # pred a transposed view (T, B*M, D) -> (B*M, T, D); target a column-sliced view of a wider tensor
    pred = torch.randn(5, 6, 11, device=device).half().transpose(0, 1).requires_grad_()  # (6, 5, 11)
    target = torch.randn(2, 5, 16, device=device)[:, :, 2:13]  # (2, 5, 11), rows 16 apart
    _check_clones(pred, target, (torch.rand(6, 5) < 0.5).to(device), 3, 0.25, "mean", backend)


def test_loss_clones_compile_without_graph_breaks():
    def step(pred, target, mask, layers):
        y = ops.targets(layers, "layer", "layer", backend="torch")  # (B, T, D): one teacher pass per sample
        return ops.masked_regression_loss(pred, y + target, mask, beta=2.0, backend="torch", clones=3)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    pred = torch.randn(6, 5, 8, requires_grad=True)
    args = (torch.randn(2, 5, 8), torch.rand(6, 5) < 0.5, torch.randn(3, 2, 5, 8))
    torch.testing.assert_close(compiled(pred, *args), step(pred, *args))
    compiled(pred, *args).backward()
    g = pred.grad.clone()
    pred.grad = None
    step(pred, *args).backward()
    torch.testing.assert_close(g, pred.grad)


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_loss_clones_opcheck(backend, device):
    """Schema, fake (meta) kernel and the real one agree with clones=3: the gradient has pred's shape, not target's."""
    _skip_unavailable(backend, device)
    pred = torch.randn(5, 6, 8, device=device).bfloat16().transpose(0, 1).requires_grad_()  # (6, 5, 8), strided
    torch.library.opcheck(torch.ops.d2v.masked_regression_loss.default,
                          (pred, torch.randn(2, 5, 8, device=device), (torch.rand(6, 5) < 0.5).to(device), 0.5, 1.0,
                           "mean", True, backend, 3),
                          test_utils=("test_schema", "test_faketensor"))


def test_auto_prefers_the_extension_on_cuda_then_triton(monkeypatch):
    """auto on CUDA tensors: the compiled extension when built (the faster one on the H100, bench/RESULTS.md), else
    Triton, else torch; on CPU tensors the C++ backend, else torch. Availability is faked: no GPU is needed."""
    from d2v.ops import backends

    monkeypatch.setattr(backends, "triton_interpreting", lambda: False)
    for available, device, want in [({"cuda", "triton", "torch"}, "cuda", "cuda"), ({"triton", "torch"}, "cuda", "triton"),
                                    ({"torch"}, "cuda", "torch"), ({"cpu", "torch", "triton"}, "cpu", "cpu"),
                                    ({"torch", "triton"}, "cpu", "torch")]:
        monkeypatch.setattr(backends, "status", lambda name, dev, a=available: (name in a, "faked"))
        assert backends.resolve("auto", device) == want, (available, device)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_loss_backward_twice_and_scaled_on_the_cpu(backend):
    """Issue 25, item 4: the CPU backward hands autograd its saved gradient when the incoming one is exactly 1;
    a kept graph (retain_graph) gives the same gradient again, and a scaled loss still scales it."""
    if not ops.backends.status(backend, "cpu")[0]:
        pytest.skip(f"backend {backend}: {ops.backends.status(backend, 'cpu')[1]}")
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 9, 16, generator=g, requires_grad=True)
    target, mask = torch.randn(4, 9, 16, generator=g), torch.rand(4, 9, generator=g) < 0.6
    loss = ops.masked_regression_loss(pred, target, mask, beta=0.5, backend=backend)
    loss.backward(retain_graph=True)
    first = pred.grad.clone()
    pred.grad = None
    loss.backward(retain_graph=True)
    assert torch.equal(pred.grad, first)
    loss.backward()  # accumulates: twice the gradient, the saved one unchanged by the first backward
    assert torch.allclose(pred.grad, 2 * first)
    pred.grad = None
    (3 * ops.masked_regression_loss(pred, target, mask, beta=0.5, backend=backend)).backward()
    assert torch.allclose(pred.grad, 3 * first)
    p64 = pred.detach().double().requires_grad_()
    reference.masked_regression_loss_reference(p64, target.double(), mask, beta=0.5).backward()
    assert torch.allclose(first.double(), p64.grad, atol=1e-6)
