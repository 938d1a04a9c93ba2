"""Triton kernels vs the float64 reference: odd shapes, every dtype, masks, padding, gradients, the EMA change.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest.py), so shapes stay small; tests marked `cuda`
repeat the checks at realistic sizes on a GPU.
"""
import pytest
import torch

import d2v.ops as ops
from d2v.ops import reference

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("d2v.kernels")

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Inputs are exact in both implementations, so targets differ only by fp32 vs fp64 arithmetic; the loss
# gradient is rounded to pred's dtype.
TARGETS_TOL = dict(rtol=1e-4, atol=1e-4)
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
            torch.float16: dict(rtol=1e-3, atol=1e-6)}
NORM_PAIRS = [(n, f) for n in ("layer", "instance", "none") for f in ("layer", "instance", "none")]


def _layers(K, B, T, D, dtype):
    """K teacher-like activations: an offset and scale per channel, so the norms have work to do."""
    shift = torch.randn(D) * 2
    return [(torch.randn(B, T, D) * (1 + torch.rand(D)) + shift).to(dtype).to(DEVICE) for _ in range(K)]


def _random_mask(B, T, p=0.5):
    return (torch.rand(B, T) < p).to(DEVICE)


def _check_targets(layers, norm, final_norm, mask=None, padding_mask=None, direct=False):
    if direct:
        got = kernels.targets(layers, norm, final_norm, mask, padding_mask, 1e-5)
    else:
        got = ops.targets(layers, norm, final_norm, mask=mask, padding_mask=padding_mask, backend="triton")
    want = reference.targets_reference(layers, norm, final_norm, mask, padding_mask, dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **TARGETS_TOL)


# ---------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm,final_norm", NORM_PAIRS)
def test_targets_every_norm_and_dtype(norm, final_norm, dtype):
    B, T, D = 2, 5, 7
    _check_targets(_layers(3, B, T, D, dtype), norm, final_norm, _random_mask(B, T), _random_mask(B, T, 0.3))


@pytest.mark.parametrize("K,B,T,D", [(1, 1, 1, 1), (3, 1, 1, 33), (1, 3, 6, 1), (3, 2, 9, 33), (1, 2, 3, 768)])
@pytest.mark.parametrize("norm,final_norm", [("layer", "layer"), ("instance", "none"), ("none", "instance")])
def test_targets_odd_shapes(K, B, T, D, norm, final_norm):
    layers = _layers(K, B, T, D, torch.float32)
    _check_targets(layers, norm, final_norm)
    _check_targets(layers, norm, final_norm, mask=_random_mask(B, T), direct=True)


@pytest.mark.parametrize("fill", [False, True], ids=["empty", "full"])
def test_targets_empty_and_full_mask(fill):
    B, T, D = 2, 4, 7
    mask = torch.full((B, T), fill, dtype=torch.bool, device=DEVICE)
    for norm, final_norm in [("layer", "layer"), ("instance", "instance")]:
        _check_targets(_layers(2, B, T, D, torch.bfloat16), norm, final_norm, mask)
    got = ops.targets(_layers(1, B, T, D, torch.float32), mask=mask, backend="triton")
    assert got.shape == ((B * T, D) if fill else (0, D))


def test_targets_instance_norm_padding():
    """Padded steps are left out of the statistics (a fully padded sequence included) but still normalized."""
    B, T, D = 3, 7, 9
    layers = _layers(2, B, T, D, torch.float16)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, :] = True
    pad = pad.to(DEVICE)
    layers[0][0, 4:] = 1e3  # garbage at padded steps must not leak into the statistics
    for final_norm in ("none", "layer", "instance"):
        _check_targets(layers, "instance", final_norm, padding_mask=pad)
        _check_targets(layers, "instance", final_norm, mask=_random_mask(B, T), padding_mask=pad)


def test_targets_non_contiguous_layers():
    """Views of a stacked (K, B, T, D) tensor, time-major activations, and layers with mismatched strides."""
    K, B, T, D = 3, 2, 5, 33
    stacked = torch.randn(K, B, T, D + 3, device=DEVICE)[..., :D]  # row stride D + 3
    _check_targets(list(stacked.unbind(0)), "layer", "layer", _random_mask(B, T))
    time_major = [torch.randn(T, B, D, device=DEVICE).transpose(0, 1) for _ in range(K)]
    _check_targets(time_major, "instance", "layer", _random_mask(B, T), _random_mask(B, T, 0.3))
    mixed = [time_major[0], stacked[1], torch.randn(B, D, T, device=DEVICE).transpose(1, 2)]
    _check_targets(mixed, "instance", "none", direct=True)
    _check_targets(torch.stack(mixed), "layer", "none")  # the (K, B, T, D) tensor form


# ---------------------------------------------------------------------------------------------- EMA
SIZES = [1, 7, 33, 4095, 4096, 4097, 3 * 768, 10_000]


def _check_ema(teacher, student, decay, direct=False):
    old = [t.clone() for t in teacher]
    if direct:
        kernels.ema_update_(teacher, student, decay)
    else:
        ops.ema_update_(teacher, student, decay, backend="triton")
    for t, t0, s in zip(teacher, old, student):
        want = (1 - decay) * (s.double() - t0.double())  # the change is what must be right
        torch.testing.assert_close((t.double() - t0.double()), want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("decay", [0.9, 0.9999])
@pytest.mark.parametrize("student_dtype", DTYPES, ids=str)
def test_ema_change_many_tensors(student_dtype, decay):
    shapes = [(n,) for n in SIZES] + [(3, 5), (768, 3), (2, 3, 7)]
    teacher = [torch.randn(s, device=DEVICE) for s in shapes]
    student = [(t + torch.randn_like(t)).to(student_dtype) for t in teacher]
    _check_ema(teacher, student, decay)
    _check_ema(teacher, student, decay, direct=True)  # second call: the cached tables


def test_ema_mixed_student_dtypes_and_odd_layouts():
    """One call with fp32, bf16 and fp16 students; a non-contiguous teacher and student; an empty tensor."""
    teacher = [torch.randn(7, 5, device=DEVICE).t(), torch.randn(4097, device=DEVICE),
               torch.randn(33, device=DEVICE), torch.randn(0, device=DEVICE)]
    student = [torch.randn(7, 5, device=DEVICE).t().to(torch.bfloat16), torch.randn(4097, device=DEVICE),
               torch.randn(66, device=DEVICE, dtype=torch.float16)[::2], torch.randn(0, device=DEVICE)]
    _check_ema(teacher, student, 0.9)


# ---------------------------------------------------------------------------------------------- loss
def _check_loss(pred, target, mask, beta, reduction, direct=False, clones=1):
    """The kernel vs the float64 reference; with clones = M, the reference sees target.repeat_interleave(M, 0)."""
    pred = pred.detach().requires_grad_(True)
    if direct:
        loss, grad = kernels.masked_regression_loss(pred.detach(), target, mask, beta, 2.0, reduction, True, clones)
    else:
        loss = ops.masked_regression_loss(pred, target, mask, beta=beta, scale=2.0, reduction=reduction,
                                          backend="triton", clones=clones)
        loss.backward()
        grad = pred.grad
    p64 = pred.detach().double().requires_grad_(True)
    repeated = target.repeat_interleave(clones, 0)
    want = reference.masked_regression_loss_reference(p64, repeated, mask, beta, 2.0, reduction, dtype=torch.float64)
    want.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # the kernel's own gradient is never fp16 (the autograd wrapper rounds it to pred's dtype after scaling)
    assert grad.dtype == (ops.grad_dtype(pred.dtype) if direct else pred.dtype) and grad.shape == pred.shape
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), p64.grad, **GRAD_TOL[grad.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradient(dtype, beta, reduction):
    B, T, D = 3, 5, 33
    pred = torch.randn(B, T, D, device=DEVICE).to(dtype)
    target = torch.randn(B, T, D, device=DEVICE).to(dtype)
    _check_loss(pred, target, _random_mask(B, T, 0.6), beta, reduction)
    _check_loss(pred, target, None, beta, reduction, direct=True)


@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (1, 7), (9, 33), (2, 1, 7), (2, 3, 768)])
@pytest.mark.parametrize("mask_kind", ["none", "random", "empty", "full"])
def test_loss_shapes_and_masks(shape, mask_kind):
    pred, target = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    mask = {"none": None, "random": torch.rand(shape[:-1]) < 0.5, "empty": torch.zeros(shape[:-1], dtype=torch.bool),
            "full": torch.ones(shape[:-1], dtype=torch.bool)}[mask_kind]
    mask = mask.to(DEVICE) if mask is not None else None
    _check_loss(pred, target, mask, 0.0, "mean")
    _check_loss(pred, target, mask, 1.0, "sum")


def test_loss_empty_mask_is_zero_not_nan():
    pred = torch.randn(4, 7, device=DEVICE, requires_grad=True)
    loss = ops.masked_regression_loss(pred, torch.randn(4, 7, device=DEVICE),
                                      torch.zeros(4, dtype=torch.bool, device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(pred.grad) == 0


def test_loss_non_contiguous_inputs():
    wide = torch.randn(6, 40, device=DEVICE)
    pred = wide[:, 3:36]  # row stride 40
    target = torch.randn(33, 6, device=DEVICE).t()  # column-major
    _check_loss(pred, target, _random_mask(6, 1, 0.5).squeeze(1), 0.0, "mean")
    _check_loss(torch.randn(2, 5, 7, device=DEVICE).transpose(0, 1), torch.randn(5, 2, 7, device=DEVICE),
                _random_mask(5, 2), 0.25, "mean", direct=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_clones(dtype, beta, reduction):
    """pred (B*M, *S, D) against target (B, *S, D): the kernel indexes target rows (row r -> sample r // (M * S))."""
    target_dtype = DTYPES[(DTYPES.index(dtype) + 1) % 3]  # every pred dtype meets another target dtype
    for (B, *S, D), M in [((2, 5, 33), 3), ((1, 1, 7), 5), ((3, 1, 1), 2), ((4, 9), 3), ((2, 2, 3, 24), 2),
                          ((2, 4, 768), 1)]:
        pred = torch.randn(B * M, *S, D, device=DEVICE).to(dtype)
        target = torch.randn(B, *S, D, device=DEVICE).to(target_dtype)
        mask = (torch.rand(B * M, *S) < 0.6).to(DEVICE)
        _check_loss(pred, target, mask, beta, reduction, clones=M)
        _check_loss(pred, target, None, beta, reduction, direct=True, clones=M)


def test_loss_clones_strided_and_empty_mask():
    pred = torch.randn(5, 6, 40, device=DEVICE)[:, :, 3:36].transpose(0, 1)  # (6, 5, 33), rows 40 apart
    target = torch.randn(33, 2, 5, device=DEVICE).permute(1, 2, 0)  # (2, 5, 33), column-major rows
    _check_loss(pred, target, _random_mask(6, 5), 0.5, "mean", clones=3)
    _check_loss(pred, target, torch.zeros(6, 5, dtype=torch.bool, device=DEVICE), 0.0, "mean", direct=True, clones=3)


def test_loss_without_grad_returns_empty_grad():
    pred, target = torch.randn(4, 7, device=DEVICE), torch.randn(4, 7, device=DEVICE)
    loss, grad = kernels.masked_regression_loss(pred, target, None, 0.0, 1.0, "mean", False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss.double(), reference.masked_regression_loss_reference(pred, target, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- launches
def test_no_pointer_table_copies_per_call(monkeypatch):
    """A captured CUDA graph replays launches, not the host-to-device copy of a pinned pointer table (whose
    buffer the caching host allocator may since have reused): targets passes its layers as kernel arguments
    and builds no table at all; EMA builds its tables once per parameter set."""
    import importlib

    targets_mod = importlib.import_module("d2v.kernels.targets")
    ema_mod = importlib.import_module("d2v.kernels.ema")
    built = []

    def counting(real):
        return lambda tensors, device: built.append(len(tensors)) or real(tensors, device)

    real = importlib.import_module("d2v.kernels._layout").pointer_table
    monkeypatch.setattr(targets_mod, "pointer_table", counting(real), raising=False)
    monkeypatch.setattr(ema_mod, "pointer_table", counting(real))
    monkeypatch.setattr(ema_mod, "_TABLES", type(ema_mod._TABLES)())  # no entry left by another test
    layers = _layers(3, 2, 5, 16, torch.bfloat16)
    for _ in range(2):
        _check_targets(layers, "instance", "layer", _random_mask(2, 5), direct=True)
    assert built == []
    teacher = [torch.randn(n, device=DEVICE) for n in (5, 4097)]
    student = [torch.randn(n, device=DEVICE) for n in (5, 4097)]
    for _ in range(3):
        kernels.ema_update_(teacher, student, 0.9)
    assert built == [2, 2]  # teacher and student tables, on the first call only


# ---------------------------------------------------------------------------------------------- in training
def test_tiny_pretraining_loop_with_triton_ops():
    """A data2vec-shaped step a few times over: teacher targets at masked rows, loss, backward, EMA."""
    B, T, D, K = 2, 6, 16, 2
    student = torch.nn.Sequential(*[torch.nn.Linear(D, D) for _ in range(K)]).to(DEVICE)
    teacher = torch.nn.Sequential(*[torch.nn.Linear(D, D) for _ in range(K)]).to(DEVICE)
    teacher.load_state_dict(student.state_dict())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    before = [p.detach().clone() for p in teacher.parameters()]
    for step in range(3):
        x = torch.randn(B, T, D, device=DEVICE)
        mask = _random_mask(B, T, 0.6)
        mask[0, 0] = True
        with torch.no_grad():
            h, layers = x, []
            for layer in teacher:
                h = layer(h)
                layers.append(h)
        y = ops.targets(layers, "layer", "none", mask=mask, backend="triton")  # (N, D)
        pred = student(x.masked_fill(mask.unsqueeze(-1), 0.0))[mask]
        loss = ops.masked_regression_loss(pred, y, backend="triton")
        opt.zero_grad()
        loss.backward()
        opt.step()
        ops.ema_update_(list(teacher.parameters()), list(student.parameters()), 0.99, backend="triton")
        assert torch.isfinite(loss)
    assert any(not torch.equal(p, q) for p, q in zip(teacher.parameters(), before))


# ---------------------------------------------------------------------------------------------- GPU sizes
@pytest.mark.cuda
def test_gpu_realistic_sizes_match_torch_backend():
    """At ViT-B sizes the compiled kernels (not the interpreter) agree with the torch fallback."""
    B, T, D = 16, 197, 768
    layers = [torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
    mask = torch.rand(B, T, device="cuda") < 0.6
    pad = torch.rand(B, T, device="cuda") < 0.1
    for norm, final_norm in NORM_PAIRS:
        got = ops.targets(layers, norm, final_norm, mask, pad, backend="triton")
        want = ops.targets(layers, norm, final_norm, mask, pad, backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    teacher = [torch.randn(n, device="cuda") for n in (768 * 3072, 768, 5, 4097)]
    student = [(t + torch.randn_like(t)).bfloat16() for t in teacher]
    _check_ema(teacher, student, 0.9999)
    pred = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    _check_loss(pred, torch.randn_like(pred), mask, 0.0, "mean")
    # multi-mask at data2vec 2.0's sizes: 8 clones of 8 samples, one fp32 target per sample
    pred = torch.randn(64, T, D, device="cuda", dtype=torch.bfloat16)
    _check_loss(pred, torch.randn(8, T, D, device="cuda"), torch.rand(64, T, device="cuda") < 0.8, 0.0, "mean",
                clones=8)


@pytest.mark.cuda
def test_gpu_compiled_step_with_triton_ops():
    """torch.compile(fullgraph=True) over the ops with the Triton backend: no graph break, same numbers."""
    layers = [torch.randn(4, 9, 33, device="cuda") for _ in range(3)]
    pred = torch.randn(4, 9, 33, device="cuda", requires_grad=True)

    def step(layers, pred):
        y = ops.targets(layers, "layer", "layer", backend="triton")
        return ops.masked_regression_loss(pred, y, backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(layers, pred), step(layers, pred))

    def multi_mask_step(layers, pred):  # pred (B*3, T, D) of 3 clones against one target per sample
        y = ops.targets(layers, "layer", "layer", backend="triton")
        return ops.masked_regression_loss(pred, y, backend="triton", clones=3)

    pred3 = torch.randn(12, 9, 33, device="cuda", requires_grad=True)
    compiled = torch.compile(multi_mask_step, fullgraph=True)
    torch.testing.assert_close(compiled(layers, pred3), multi_mask_step(layers, pred3))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_ops_run_on_the_tensors_device_not_the_current_one(backend):
    """Tensors on cuda:1 while cuda:0 is current: launches must go to cuda:1 (Triton launches on the current
    device unless told otherwise)."""
    from d2v.ops import backends

    if not backends.status(backend, "cuda")[0]:
        pytest.skip(backends.status(backend, "cuda")[1])
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    layers = [torch.randn(2, 9, 40, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    mask = torch.rand(2, 9, device=dev) < 0.5
    got = ops.targets(layers, "instance", "layer", mask=mask, backend=backend)
    want = reference.targets_reference(layers, "instance", "layer", mask, dtype=torch.float64)
    assert got.device == dev
    torch.testing.assert_close(got.double(), want, **TARGETS_TOL)
    pred = torch.randn(2, 9, 40, device=dev, requires_grad=True)
    loss = ops.masked_regression_loss(pred, torch.randn(2, 9, 40, device=dev), mask, backend=backend)
    loss.backward()
    assert loss.device == dev and pred.grad.device == dev and torch.isfinite(pred.grad).all()
    teacher, student = [torch.zeros(5000, device=dev)], [torch.ones(5000, device=dev, dtype=torch.bfloat16)]
    ops.ema_update_(teacher, student, 0.5, backend=backend)
    torch.testing.assert_close(teacher[0], torch.full((5000,), 0.5, device=dev))
    assert torch.cuda.current_device() == 0
