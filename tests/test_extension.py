"""Compiled extension d2v._C (backends "cpu" and "cuda") vs the float64 reference.

Odd shapes, every dtype, empty/full/random masks, padding with instance norm, the loss gradient through the
public op, the EMA change, and torch.library.opcheck on the d2v_ext ops. Inputs are drawn fresh each run.
"""
import pytest
import torch

import d2v.ops as ops
from d2v.ops import reference

extension = pytest.importorskip("d2v.ops.extension")
if extension._C is None:
    pytest.skip(f"d2v._C is not built: {extension.status('cpu')[1]}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORM_PAIRS = [(n, f) for n in ("layer", "instance", "none") for f in ("layer", "instance", "none")]
TARGETS_TOL = dict(rtol=1e-4, atol=1e-4)  # inputs are exact in both; fp32 vs fp64 arithmetic only
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
            torch.float16: dict(rtol=1e-3, atol=1e-6)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _layers(K, B, T, D, dtype, device):
    """K teacher-like activations: an offset and scale per channel, so the norms have work to do."""
    shift = torch.randn(D) * 2
    return [(torch.randn(B, T, D) * (1 + torch.rand(D)) + shift).to(dtype).to(device) for _ in range(K)]


def _mask(B, T, p, device):
    return (torch.rand(B, T) < p).to(device)


def _check_targets(layers, norm, final_norm, mask=None, padding_mask=None):
    backend = layers[0].device.type
    got = ops.targets(layers, norm, final_norm, mask=mask, padding_mask=padding_mask, backend=backend)
    want = reference.targets_reference(layers, norm, final_norm, mask, padding_mask, dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, **TARGETS_TOL)


# ---------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm,final_norm", NORM_PAIRS)
def test_targets_every_norm_and_dtype(norm, final_norm, dtype, device):
    B, T, D = 3, 6, 33
    layers = _layers(3, B, T, D, dtype, device)
    _check_targets(layers, norm, final_norm)
    _check_targets(layers, norm, final_norm, _mask(B, T, 0.5, device), _mask(B, T, 0.3, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,B,T,D", [(1, 1, 1, 1), (3, 1, 1, 7), (1, 3, 6, 1), (3, 2, 9, 33), (1, 2, 3, 768),
                                     (3, 2, 197, 768), (1, 1, 5, 100)])
@pytest.mark.parametrize("norm,final_norm", [("layer", "layer"), ("instance", "none"), ("none", "instance"),
                                             ("instance", "layer")])
def test_targets_odd_shapes(K, B, T, D, norm, final_norm, device):
    layers = _layers(K, B, T, D, torch.float32, device)
    _check_targets(layers, norm, final_norm)
    _check_targets(layers, norm, final_norm, mask=_mask(B, T, 0.6, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fill", [False, True], ids=["empty", "full"])
def test_targets_empty_and_full_mask(fill, device):
    B, T, D = 2, 4, 7
    mask = torch.full((B, T), fill, dtype=torch.bool, device=device)
    for norm, final_norm in [("layer", "layer"), ("instance", "instance"), ("none", "layer")]:
        _check_targets(_layers(2, B, T, D, torch.bfloat16, device), norm, final_norm, mask)
    got = ops.targets(_layers(1, B, T, D, torch.float32, device), mask=mask, backend=device)
    assert got.shape == ((B * T, D) if fill else (0, D))


@pytest.mark.parametrize("device", DEVICES)
def test_targets_instance_norm_padding(device):
    """Padded steps are left out of the statistics (a fully padded sequence included) but still normalized."""
    B, T, D = 3, 11, 9
    layers = _layers(3, B, T, D, torch.float16, device)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, :] = True
    pad = pad.to(device)
    for norm, final_norm in [("instance", "none"), ("instance", "instance"), ("layer", "instance")]:
        _check_targets(layers, norm, final_norm, padding_mask=pad)
        _check_targets(layers, norm, final_norm, mask=_mask(B, T, 0.5, device), padding_mask=pad)
    # Values at padded steps do not move the statistics of the others.
    moved = [x.clone() for x in layers]
    for x in moved:
        x[0, 4:] = 1000
    a = ops.targets(layers, "instance", "none", padding_mask=pad, backend=device)
    b = ops.targets(moved, "instance", "none", padding_mask=pad, backend=device)
    torch.testing.assert_close(a[0, :4], b[0, :4])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,B", [(1, 1), (2, 3)])
def test_targets_instance_norm_long_offset(K, B, device):
    """Long sequences (many blocks of partial moments), column-chunked tasks, and a mean far above the spread."""
    T, D = 301, 200
    layers = [x + 100.0 for x in _layers(K, B, T, D, torch.float32, device)]
    pad = _mask(B, T, 0.2, device)
    pad[:, 0] = True  # the first step is padded: statistics start at a later one
    for final_norm in ["none", "instance", "layer"]:
        _check_targets(layers, "instance", final_norm, padding_mask=pad)
        _check_targets(layers, "instance", final_norm, mask=_mask(B, T, 0.5, device), padding_mask=pad)


@pytest.mark.parametrize("device", DEVICES)
def test_targets_non_contiguous_and_stacked(device):
    B, T, D = 2, 5, 12
    stacked = torch.randn(3, B, D, T, device=device).transpose(-1, -2)  # (K, B, T, D), non-contiguous
    got = ops.targets(stacked, "layer", "layer", backend=device)
    want = reference.targets_reference(list(stacked), "layer", "layer", dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, **TARGETS_TOL)


# ---------------------------------------------------------------------------------------------- EMA
def _ema_sizes():
    return [1, 3, 7, 33, 768, 3 * 768, 768 * 768 + 5, 100_003, 4096, 4097]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decay", [0.9, 0.9999])
@pytest.mark.parametrize("student_dtype", DTYPES, ids=str)
def test_ema_change(decay, student_dtype, device):
    """Check the change new - old against (1 - decay) * (student - old), not just new vs old."""
    teacher = [torch.randn(n, device=device) for n in _ema_sizes()]
    teacher.append(torch.randn(5, 33, 7, device=device))
    student = [(t + torch.randn_like(t)).to(student_dtype) for t in teacher]
    old = [t.clone() for t in teacher]
    ops.ema_update_(teacher, student, decay, backend=device)
    for new, before, s in zip(teacher, old, student):
        want = (1 - decay) * (s.double() - before.double())
        # fp32 rounding of the new value is relative to |teacher|, not to the (small) change.
        torch.testing.assert_close((new.double() - before.double()), want, rtol=1e-3,
                                   atol=4 * torch.finfo(torch.float32).eps * before.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_ema_non_contiguous_teacher(device):
    base = torch.randn(33, 20, device=device)
    teacher = [base.t()]  # a view: updated in place through the view
    student = [torch.randn(20, 33, device=device)]
    old = teacher[0].clone()
    ops.ema_update_(teacher, student, 0.5, backend=device)
    torch.testing.assert_close(base.t(), 0.5 * old + 0.5 * student[0])


# ---------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(4, 9, 33), (1, 1, 1), (13, 768), (2, 3, 7)])
def test_loss_and_gradient(shape, reduction, beta, dtype, device):
    pred = torch.randn(shape).to(dtype).to(device).requires_grad_()
    target = torch.randn(shape, device=device)
    for mask in (None, _mask(*shape[:-1], 0.6, device) if len(shape) == 3 else (torch.rand(shape[0]) < 0.6).to(device)):
        pred.grad = None
        loss = ops.masked_regression_loss(pred, target, mask, beta=beta, scale=0.7, reduction=reduction,
                                          backend=device)
        (loss * 3).backward()
        ref_pred = pred.detach().double().requires_grad_()
        want = reference.masked_regression_loss_reference(ref_pred, target, mask, beta, 0.7, reduction,
                                                          dtype=torch.float64)
        (want * 3).backward()
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
        assert pred.grad.dtype == dtype
        torch.testing.assert_close(pred.grad.double(), ref_pred.grad.to(dtype).double(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fill", [False, True], ids=["empty", "full"])
def test_loss_empty_and_full_mask(fill, device):
    pred = torch.randn(3, 5, 7, device=device, requires_grad=True)
    target = torch.randn(3, 5, 7, device=device)
    mask = torch.full((3, 5), fill, dtype=torch.bool, device=device)
    loss = ops.masked_regression_loss(pred, target, mask, beta=0.25, backend=device)
    loss.backward()
    want = reference.masked_regression_loss_reference(pred.detach(), target, mask, 0.25, dtype=torch.float64)
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    if not fill:
        assert loss.item() == 0 and (pred.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_loss_bf16_pred_fp32_target_without_grad(device):
    pred = torch.randn(6, 7, 40, device=device).bfloat16()
    target = torch.randn(6, 7, 40, device=device)
    loss, grad = extension.masked_regression_loss(pred, target, None, 0.0, 1.0, "mean", False)
    assert grad.numel() == 0
    want = reference.masked_regression_loss_reference(pred, target, None, 0.0, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_clones(reduction, beta, dtype, device):
    """pred (B*M, *S, D) against target (B, *S, D): the kernels index target rows; the float64 reference sees
    target.repeat_interleave(M, 0). D not a power of two, S = 1, B = 1, (N, D) rows, M in 1, 2, 3, 5."""
    for (B, *S, D), M in [((4, 9, 33), 3), ((1, 1, 1), 5), ((3, 1, 100), 2), ((13, 24), 3), ((2, 2, 3, 7), 5),
                          ((2, 5, 768), 2), ((3, 4, 8), 1)]:
        pred = torch.randn(B * M, *S, D).to(dtype).to(device).requires_grad_()
        target_dtype = DTYPES[(DTYPES.index(dtype) + M) % 3]
        target = torch.randn(B, *S, D).to(target_dtype).to(device)
        for mask in (None, (torch.rand(B * M, *S) < 0.6).to(device)):
            pred.grad = None
            loss = ops.masked_regression_loss(pred, target, mask, beta=beta, scale=0.7, reduction=reduction,
                                              backend=device, clones=M)
            (loss * 3).backward()
            ref_pred = pred.detach().double().requires_grad_()
            want = reference.masked_regression_loss_reference(ref_pred, target.repeat_interleave(M, 0), mask, beta,
                                                              0.7, reduction, dtype=torch.float64)
            (want * 3).backward()
            torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
            assert pred.grad.dtype == dtype and pred.grad.shape == pred.shape
            torch.testing.assert_close(pred.grad.double(), ref_pred.grad.to(dtype).double(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_loss_clones_wrong_shapes_raise_in_the_kernel(device):
    """The compiled op checks the shapes itself: a direct torch.ops.d2v_ext call gets a RuntimeError, no bad read
    (c10::Error, not c10::ValueError: see check_loss_shapes; d2v.ops raises ValueError before any kernel)."""
    op = torch.ops.d2v_ext.masked_regression_loss.default
    for pred_shape, target_shape, clones in [((6, 5, 7), (2, 5, 7), 2), ((6, 5, 7), (2, 4, 7), 3),
                                             ((6, 7), (2, 5, 7), 3), ((2, 7), (2, 7), 0)]:
        with pytest.raises(RuntimeError, match="clones"):
            op(torch.randn(pred_shape, device=device), torch.randn(target_shape, device=device), None, 0.0, 1.0,
               "mean", True, clones)


# ---------------------------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    B, T, D = 2, 5, 8
    layers = _layers(2, B, T, D, torch.bfloat16, device)
    mask, pad = _mask(B, T, 0.5, device), _mask(B, T, 0.3, device)
    pred, target = torch.randn(B, T, D, device=device), torch.randn(B, T, D, device=device)
    return [
        (torch.ops.d2v_ext.targets.default, (layers, "layer", "layer", None, None, 1e-5)),
        (torch.ops.d2v_ext.targets.default, (layers, "instance", "instance", mask, pad, 1e-5)),
        (torch.ops.d2v_ext.ema_update_.default,
         ([torch.randn(7, device=device), torch.randn(3, 4, device=device)],
          [torch.randn(7, device=device).bfloat16(), torch.randn(3, 4, device=device)], 0.99)),
        (torch.ops.d2v_ext.masked_regression_loss.default, (pred, target, mask, 0.5, 1.0, "mean", True)),
        (torch.ops.d2v_ext.masked_regression_loss.default, (pred, target, None, 0.0, 2.0, "sum", False)),
        (torch.ops.d2v_ext.masked_regression_loss.default,
         (torch.randn(3 * B, T, D, device=device).bfloat16(), target, _mask(3 * B, T, 0.5, device), 0.5, 1.0, "mean",
          True, 3)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_status_and_auto_dispatch():
    ok, why = extension.status("cpu")
    assert ok, why
    ok, why = extension.status("cuda")
    assert ok == (bool(extension._C.with_cuda) and torch.cuda.is_available()), why
