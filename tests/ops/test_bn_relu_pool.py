"""``bn_relu_pool``: the fused conv-block tail ``max_pool2d(leaky_relu(batch_norm(x), slope), 2)`` (cpp
backend), with slope 0 (ReLU) or 0.1 (ResNet-12's LeakyReLU), with or without the pool.

The ground truth is ATen's composition (``fastmeta.ops.reference.bn_relu_pool``): batch norm with
batch statistics (Ioffe & Szegedy 2015, Alg. 1), ReLU/LeakyReLU, 2x2 max-pool (first maximum wins
ties). Hand-computed values check both backends.
Forward, backward and double backward are compared with it on many shapes (odd H and W, rows
narrower than one vector register, one image, ties), float32/float64/bfloat16, on every CPU
instruction set; the three native ops pass ``torch.library.opcheck``; the dispatch table says why
triton and cuda have no kernel. The ``fused=True`` speed mode is tested in ``tests/nn/test_fusion.py``.
"""
import re

import pytest
import torch
import torch.nn.functional as F

from fastmeta import _extension, ops
from fastmeta.ops import _backend, reference
from fastmeta.ops.bn_relu_pool import NO_THIRD_ORDER, bn_relu_pool, native_ops

needs_extension = pytest.mark.skipif(not _extension.available(),
                                     reason=f"native extension unavailable: {_extension.reason()}")


@pytest.fixture
def cpp():
    """The cpp backend, chosen explicitly (a missing extension skips instead of testing the reference)."""
    if not _extension.available():
        pytest.skip(f"native extension unavailable: {_extension.reason()}")
    with ops.use_backend("cpp"):
        yield


def bn_relu_pool_reference(x, weight, bias, eps, negative_slope=0.0, pool=True):
    """The ATen composition's output (what the kernels fuse)."""
    return reference.bn_relu_pool(x, weight, bias, eps, negative_slope, pool)[0]


# (negative_slope, pool): Conv-4's block tail, ResNet-12's block end, its inner layers, ReLU unpooled.
ACTS = [(0.0, True), (0.1, True), (0.1, False), (0.0, False)]
ACT_IDS = ["relu-pool", "leaky-pool", "leaky", "relu"]
acts = pytest.mark.parametrize("slope,pool", ACTS, ids=ACT_IDS)


# (N, C, H, W): Conv-4's four blocks (14, 7, 3, 1 windows per row: wider than the 8-float
# register, between 4 and 8, narrower than 4), odd H and/or W (last row/column in no window), one
# image, two values per channel, a plane of 2x2.
SHAPES = [(5, 8, 28, 28), (5, 8, 14, 14), (5, 8, 7, 7), (5, 8, 3, 3), (3, 5, 9, 11), (4, 2, 5, 4),
          (2, 3, 20, 17), (1, 3, 34, 33), (1, 2, 2, 2), (2, 1, 2, 2)]


def make(shape, dtype, seed=0, ties=True, affine=True, pool=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    if ties and shape[2] >= 4:
        x[:, :, :2, :] = 0.3  # constant regions, as Omniglot's background: equal values in windows
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    out_hw = (shape[2] // 2, shape[3] // 2) if pool else shape[2:]
    go = torch.randn(shape[0], c, *out_hw, generator=g, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(b), cast(go)


def grads(fn, x, w, b, go):
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    xs = iter(leaves)
    xr = next(xs)
    wr = next(xs) if w is not None else None
    br = next(xs) if b is not None else None
    out = fn(xr, wr, br)
    return out, torch.autograd.grad(out, leaves, go)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("affine", [True, False])
@acts
def test_forward_and_backward_match_aten(shape, dtype, affine, slope, pool, isa, cpp):
    x, w, b, go = make(shape, dtype, affine=affine, pool=pool)
    out, got = grads(lambda *a: bn_relu_pool(*a, 1e-5, slope, pool)[0], x, w, b, go)
    ref, want = grads(lambda *a: bn_relu_pool_reference(*a, 1e-5, slope, pool), x, w, b, go)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL[dtype])


@pytest.mark.parametrize("shape", [(5, 8, 28, 28), (3, 5, 9, 11), (1, 2, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_match_the_reference_and_are_constants(shape, dtype, channels_last, cpp):
    # mean and invstd = 1/sqrt(biased var + eps) per channel, in the parameter dtype (float32 for
    # bf16 x), for running statistics: not differentiable.
    x, w, b, _ = make(shape, torch.float64)
    x = x.to(dtype)
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype
    w, b = w.to(pdt).requires_grad_(), b.to(pdt).requires_grad_()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out, mean, invstd = bn_relu_pool(x, w, b)
    _, rmean, rinvstd = reference.bn_relu_pool(x, w, b, 1e-5)
    assert mean.dtype == invstd.dtype == pdt and mean.shape == (shape[1],)
    assert out.requires_grad and not mean.requires_grad and not invstd.requires_grad
    tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    torch.testing.assert_close(mean, rmean, **tol)
    torch.testing.assert_close(invstd, rinvstd, **tol)


@pytest.mark.parametrize("shape", [(5, 8, 28, 28), (5, 8, 14, 14), (3, 5, 9, 11), (5, 8, 3, 3)])
@acts
def test_bf16_is_the_float32_computation_rounded(shape, slope, pool, isa, cpp):
    # bf16 x (CPU autocast's conv output) with float32 parameters: computed in float32 from the
    # widened input, outputs and dx rounded to bf16, mean/invstd/dweight/dbias float32.
    x, w, b, go = make(shape, torch.float32, ties=False, pool=pool)
    xb, gob = x.bfloat16(), go.bfloat16()
    out, (dx, dw, db) = grads(lambda *a: bn_relu_pool(*a, 1e-5, slope, pool)[0], xb, w, b, gob)
    ref, (rdx, rdw, rdb) = grads(lambda *a: bn_relu_pool_reference(*a, 1e-5, slope, pool), xb.float(), w, b,
                                 gob.float())
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(out, ref.bfloat16(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dx.float(), rdx, rtol=1e-2, atol=1e-2 * rdx.abs().max().item())
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(db, rdb, rtol=1e-4, atol=1e-3)
    # rounding exactly as torch's: the output is the float32 result rounded once
    with torch.no_grad():
        f32 = bn_relu_pool(xb.float(), w, b, 1e-5, slope, pool)[0]
    assert torch.equal(out, f32.bfloat16())


@pytest.mark.parametrize("shape", [(5, 8, 28, 28), (3, 5, 9, 11), (4, 2, 5, 4), (2, 3, 7, 7), (2, 2, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
@acts
def test_double_backward_matches_aten(shape, affine, slope, pool, isa, cpp):
    # The derivative of the backward (what second-order MAML differentiates): gradients of
    # <a, dx> + <a_w, dweight> + <a_b, dbias> w.r.t. grad_out, x and weight.
    x0, w0, b0, go0 = make(shape, torch.float64, affine=affine, pool=pool)
    g = torch.Generator().manual_seed(1)
    ax = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    aw = torch.randn(shape[1], generator=g, dtype=torch.float64)
    ab = torch.randn(shape[1], generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda *a: bn_relu_pool(*a, 1e-5, slope, pool)[0],
               lambda *a: bn_relu_pool_reference(*a, 1e-5, slope, pool)):
        x, go = x0.clone().requires_grad_(), go0.clone().requires_grad_()
        params = [t.clone().requires_grad_() for t in (w0, b0) if t is not None]
        w, b = (params + [None, None])[:2]
        first = torch.autograd.grad(fn(x, w, b), [x] + params, go, create_graph=True)
        L = (first[0] * ax).sum()
        if affine:
            L = L + (first[1] * aw).sum() + (first[2] * ab).sum()
        results.append(torch.autograd.grad(L, [go, x] + params[:1]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@acts
def test_gradgradcheck_and_third_order(channels_last, slope, pool, cpp):
    x, w, b, go = make((3, 2, 4, 6), torch.float64, ties=False, pool=pool)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [t.requires_grad_() for t in (x, w, b)]
    fn = (lambda *a: bn_relu_pool(*a, 1e-5, slope, pool)[0])
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    if (slope, pool) != (0.0, True):
        return
    # no third order, like ATen's batch norm: a clear error, not a silently wrong value
    go = go.requires_grad_()
    dx, = torch.autograd.grad(fn(*args), args[0], go, create_graph=True)
    ddx, = torch.autograd.grad(dx.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match=r"bn_relu_pool does not support 3rd\+ order"):
        torch.autograd.grad(ddx.sum(), args[0])
    with pytest.raises(RuntimeError, match=r"3rd\+ order"):  # ATen, for comparison
        x_ = args[0].detach().requires_grad_()
        dx_, = torch.autograd.grad(bn_relu_pool_reference(x_, args[1], args[2], 1e-5), x_, go, create_graph=True)
        ddx_, = torch.autograd.grad(dx_.square().sum(), x_, create_graph=True)
        torch.autograd.grad(ddx_.sum(), x_)


def test_third_order_through_the_weights_raises_too(cpp):
    # A third derivative that reaches the double backward only through dweight/dbias.
    x, w, b, go = make((2, 3, 6, 6), torch.float64, ties=False)
    w, b = w.requires_grad_(), b.requires_grad_()
    dw, db = torch.autograd.grad(bn_relu_pool(x, w, b)[0], (w, b), go, create_graph=True)
    ddw, = torch.autograd.grad((dw * db).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match=re.escape(NO_THIRD_ORDER)):
        torch.autograd.grad(ddw.sum(), w)


def test_zero_gradient_gives_zero(cpp):
    x, w, b, go = make((4, 3, 8, 8), torch.float32)
    _, (dx, dw, db) = grads(lambda *a: bn_relu_pool(*a)[0], x, w, b, torch.zeros_like(go))
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))
    assert torch.equal(db, torch.zeros_like(db))


def test_no_graph_without_grad(cpp):
    x, w, b, _ = make((4, 3, 8, 8), torch.float32)
    out, mean, invstd = bn_relu_pool(x, w, b)
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        out2 = bn_relu_pool(x.requires_grad_(), w, b)[0]
    assert out2.grad_fn is None and torch.equal(out, out2)


@pytest.mark.parametrize("shape", [(5, 16, 28, 28), (3, 12, 9, 11), (2, 3, 7, 7), (4, 9, 6, 5), (2, 8, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@acts
def test_channels_last_matches_aten(shape, dtype, slope, pool, isa, cpp):
    # NHWC kernels: lanes over channels (16, 12 = one register + a scalar tail, 3 < one register,
    # 9), odd H/W; outputs and dx stay channels_last.
    x, w, b, go = make(shape, dtype, pool=pool)
    xc, goc = x.contiguous(memory_format=torch.channels_last), go.contiguous(memory_format=torch.channels_last)
    out, got = grads(lambda *a: bn_relu_pool(*a, 1e-5, slope, pool)[0], xc, w, b, goc)
    ref, want = grads(lambda *a: bn_relu_pool_reference(*a, 1e-5, slope, pool), x, w, b, go)
    cl = torch.channels_last
    assert out.is_contiguous(memory_format=cl) and got[0].is_contiguous(memory_format=cl)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for g_, r in zip(got, want):
        torch.testing.assert_close(g_, r, **TOL[dtype])


def test_channels_last_bf16_and_nan(cpp):
    x, w, b, go = make((4, 16, 10, 10), torch.float32, ties=False)
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(bn_relu_pool(xb, w, b)[0], bn_relu_pool(xb.contiguous(), w, b)[0])
    x[1, 3, 2, 2] = float("nan")
    out = bn_relu_pool(x.contiguous(memory_format=torch.channels_last), w, b)[0]
    assert out[:, 3].isnan().all() and not out[:, [0, 1, 2]].isnan().any()


@acts
def test_non_contiguous_inputs(slope, pool, cpp):
    x, w, b, go = make((4, 6, 10, 12), torch.float64, pool=pool)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not NCHW-contiguous
    got_t = go.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous() and not got_t.is_contiguous()
    out, got = grads(lambda *a: bn_relu_pool(*a, 1e-5, slope, pool)[0], xt, w, b, got_t)
    ref, want = grads(lambda *a: bn_relu_pool_reference(*a, 1e-5, slope, pool), x, w, b, go)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for g_, r in zip(got, want):
        torch.testing.assert_close(g_, r, **TOL[torch.float64])


@acts
def test_nan_propagates_like_aten(slope, pool, cpp):
    x, w, b, _ = make((2, 3, 6, 6), torch.float32)
    x[1, 1, 2, 3] = float("nan")
    out = bn_relu_pool(x, w, b, 1e-5, slope, pool)[0]
    ref = bn_relu_pool_reference(x, w, b, 1e-5, slope, pool)
    assert torch.equal(out.isnan(), ref.isnan()) and out[:, 1].isnan().all()
    torch.testing.assert_close(out[:, [0, 2]], ref[:, [0, 2]])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_known_values(backend, slope):
    # One channel x = [[1, 2], [3, 4]], eps = 1e-300 (0 to double precision): mean 2.5, var 1.25, xhat = [-3, -1, 1, 3] / sqrt(5).
    # Bias -2 makes every z negative: z = xhat - 2, the window's maximum z = 3 / sqrt(5) - 2 at (1, 1).
    if backend == "cpp" and not _extension.available():
        pytest.skip(f"native extension unavailable: {_extension.reason()}")
    r5 = 5.0 ** 0.5
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64, requires_grad=True)
    w, b = torch.ones(1, dtype=torch.float64), torch.full((1,), -2.0, dtype=torch.float64)
    xhat = torch.tensor([-3.0, -1.0, 1.0, 3.0], dtype=torch.float64) / r5
    with ops.use_backend(backend):
        pooled, mean, invstd = bn_relu_pool(x, w, b, 1e-300, slope, True)
        flat = bn_relu_pool(x, None, None, 1e-300, slope, False)[0]
    assert mean.item() == 2.5 and abs(invstd.item() - 2 / r5) < 1e-15
    torch.testing.assert_close(pooled.flatten(), torch.tensor([slope * (3 / r5 - 2)], dtype=torch.float64),
                               rtol=1e-14, atol=1e-15)
    # no pool, no affine: leaky(xhat)
    torch.testing.assert_close(flat.flatten(), torch.where(xhat > 0, xhat, slope * xhat), rtol=1e-14, atol=1e-15)
    # d out / dx: dz = [0, 0, 0, slope] (the window's maximum, negative), through the batch norm's
    # backward gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)) = slope * [2, -1, -4, 3] / (5 sqrt 5).
    dx, = torch.autograd.grad(pooled.sum(), x)
    want = slope * torch.tensor([2.0, -1.0, -4.0, 3.0], dtype=torch.float64) * 2 / (10 * r5)
    torch.testing.assert_close(dx.flatten(), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_inputs_name_the_argument(backend):
    # Checked before dispatch, so every backend rejects the same inputs with the same messages.
    if backend == "cpp" and not _extension.available():
        pytest.skip(f"native extension unavailable: {_extension.reason()}")
    x, w, b, _ = make((2, 3, 6, 6), torch.float32)
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="x: expected a \\[N, C, H, W\\]"):
            bn_relu_pool(x[0], w, b)
        with pytest.raises(RuntimeError, match="weight must be \\[C\\]"):
            bn_relu_pool(x, w[:2], b)
        with pytest.raises(RuntimeError, match="bias must be Float"):
            bn_relu_pool(x, w, b.double())
        with pytest.raises(RuntimeError, match="x must be float32, float64 or bfloat16"):
            bn_relu_pool(x.half(), None, None)
        with pytest.raises(RuntimeError, match="more than one value per channel"):
            bn_relu_pool(torch.randn(1, 3, 1, 1), None, None)
        with pytest.raises(RuntimeError, match="weight is on meta but x is on cpu"):
            bn_relu_pool(x, w.to("meta"), b)
        for slope in (float("nan"), float("inf"), -0.1, "0.1", True, None):
            with pytest.raises(ValueError, match="negative_slope: expected a finite float >= 0"):
                bn_relu_pool(x, w, b, 1e-5, slope)
        for eps in (0.0, -1e-5, float("nan")):  # ATen's batch norm rejects eps <= 0 in training mode
            with pytest.raises(ValueError, match="eps: expected a finite float > 0"):
                bn_relu_pool(x, w, b, eps)
        with pytest.raises(ValueError, match="pool: expected a bool"):
            bn_relu_pool(x, w, b, 1e-5, 0.1, 1)


@needs_extension
def test_native_ops_check_their_inputs():
    # The C++ kernels check the same conditions (the raw ops are callable on their own).
    x, w, b, _ = make((2, 3, 6, 6), torch.float32)
    native = native_ops()
    with pytest.raises(RuntimeError, match="weight must be \\[C\\]"):
        native.bn_relu_pool(x, w[:2], b, 1e-5)
    with pytest.raises(RuntimeError, match="bias must be Float"):
        native.bn_relu_pool(x, w, b.double(), 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32, float64 or bfloat16"):
        native.bn_relu_pool(x.half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        native.bn_relu_pool(torch.randn(1, 3, 1, 1), None, None, 1e-5)
    for slope in (float("nan"), float("inf"), -0.1):
        with pytest.raises(RuntimeError, match="negative_slope must be a finite float >= 0"):
            native.bn_relu_pool(x, w, b, 1e-5, slope, True)
    out, idx, mean, invstd = native.bn_relu_pool(x, w, b, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        native.bn_relu_pool_backward(out[:1], x, w, mean, invstd, idx)
    with pytest.raises(RuntimeError, match="grad_out must be \\[2, 3, 6, 6\\]"):  # pooled shape, pool=False
        native.bn_relu_pool_backward(out, x, w, mean, invstd, idx, 0.1, False)
    with pytest.raises(RuntimeError, match="negative_slope must be a finite float >= 0"):
        native.bn_relu_pool_backward(out, x, w, mean, invstd, idx, -1.0, True)


# ------------------------------------------------------------------------------ op registration
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@acts
def test_opcheck(dtype, channels_last, affine, slope, pool):
    # Schema, autograd registration, fake kernels (sizes and strides, NHWC included) and AOT dispatch
    # with dynamic shapes, for the three native ops.
    native = native_ops()
    x, w, b, go = make((3, 4, 6, 7), dtype, ties=False, affine=affine, pool=pool)
    if channels_last:
        x, go = x.contiguous(memory_format=torch.channels_last), go.contiguous(memory_format=torch.channels_last)
    leaf = (lambda t: None if t is None else t.clone().requires_grad_())
    torch.library.opcheck(native.bn_relu_pool.default, (leaf(x), leaf(w), leaf(b), 1e-5, slope, pool))
    out, idx, mean, invstd = native.bn_relu_pool(x, w, b, 1e-5, slope, pool)
    assert out.shape == go.shape
    torch.library.opcheck(native.bn_relu_pool_backward.default,
                          (leaf(go), leaf(x), leaf(w), mean, invstd, idx, slope, pool))
    ggx, ggw, ggb = torch.randn_like(x), torch.randn(4, dtype=dtype), torch.randn(4, dtype=dtype)
    double_args = (ggx, ggw if affine else None, ggb if affine else None, go, x, w, mean, invstd, idx, slope, pool)
    # With inputs that require grad, test_aot_dispatch_dynamic would differentiate the double
    # backward (a third derivative, which raises by design): it runs on constant inputs instead.
    torch.library.opcheck(native.bn_relu_pool_double_backward.default,
                          tuple(map(leaf, double_args[:6])) + double_args[6:],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(native.bn_relu_pool_double_backward.default, double_args)


@needs_extension
def test_compile_fullgraph_traces_the_native_op():
    # Dynamo traces the public function (the backend is chosen at trace time) down to the native op,
    # through its fake kernel; the backward is the registered formula.
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def f(x, w, b):
        out, mean, _ = ops.bn_relu_pool(x, w, b)
        return out.square().sum() + mean.sum()

    x, w, b, _ = make((3, 4, 6, 6), torch.float64, ties=False)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    got = torch.compile(f, fullgraph=True, backend=backend)(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = f(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    assert any("fastmeta.bn_relu_pool" in g for g in graphs)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, **TOL[torch.float64])


# ------------------------------------------------------------------------------ dispatch
def test_reference_backend_is_the_aten_composition():
    x, w, b, go = make((3, 4, 8, 6), torch.float64)
    with ops.use_backend("reference"):
        out, got = grads(lambda *a: bn_relu_pool(*a)[0], x, w, b, go)
    want_out, want = grads(lambda *a: F.max_pool2d(F.relu(F.batch_norm(a[0], None, None, a[1], a[2], True, 0.0, 1e-5)),
                                                    2), x, w, b, go)
    assert torch.equal(out, want_out) and all(torch.equal(g, e) for g, e in zip(got, want))


def test_backend_table_names_the_missing_kernels():
    table = ops.support_table("cpu")["bn_relu_pool"]
    assert table["reference"] is None
    assert (table["cpp"] is None) == _extension.available()
    for name in ("triton", "cuda"):
        assert "not implemented" in table[name] and "CPU" in table[name]
        assert (("bn_relu_pool", name)) in _backend.NOT_IMPLEMENTED
        assert ops.unavailable_reason("bn_relu_pool", name, "cuda") == table[name]
        assert name not in ops.available_backends("cpu", "bn_relu_pool")
        with ops.use_backend(name):
            with pytest.raises(ops.BackendUnavailableError, match="not implemented"):
                bn_relu_pool(torch.randn(2, 3, 4, 4))
    # An op a backend does not implement does not hide the backend from the "every op" listing.
    every = ops.available_backends("cpu")
    assert "reference" in every and ("cpp" in every) == _extension.available()
    if all(ops.unavailable_reason(op, "triton", "cpu") is None for op in ops.OPS if op != "bn_relu_pool"):
        assert "triton" in every


def test_default_backend_on_cpu():
    assert ops.resolve("bn_relu_pool", "cpu") == ("cpp" if _extension.available() else "reference")
