"""Fused conv-block tails (``fastmeta.fused``): ``max_pool2d(relu(batch_norm(x)), 2)`` in C++.

The ground truth is ATen's composition (``bn_relu_pool_reference``): batch norm with batch
statistics (Ioffe & Szegedy 2015, Alg. 1), ReLU, 2x2 max-pool (first maximum wins ties). Forward,
backward and double backward are compared with it on many shapes (odd H and W, rows narrower than
one vector register, one image, ties), float32/float64/bfloat16, on every CPU instruction set; the
speed mode ``MetaLearner(fused=True)`` is compared with an independent per-task MAML loop
(Finn et al. 2017, eq. 1 inner step; the meta-gradient of their Algorithm 1; Fallah eq. 5).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta import _extension
from fastmeta.fused import FusionPlan, bn_relu_pool, bn_relu_pool_reference
from fastmeta.models import Conv4
from reference import rel_err
from test_speed_modes import conv_batch, oracle

if not _extension.available():
    pytest.skip(f"native extension unavailable: {_extension.reason()}", allow_module_level=True)

# (N, C, H, W): Conv-4's four blocks (14, 7, 3, 1 windows per row: wider than the 8-float
# register, between 4 and 8, narrower than 4), odd H and/or W (last row/column in no window), one
# image, two values per channel, a plane of 2x2.
SHAPES = [(5, 8, 28, 28), (5, 8, 14, 14), (5, 8, 7, 7), (5, 8, 3, 3), (3, 5, 9, 11), (4, 2, 5, 4),
          (2, 3, 20, 17), (1, 3, 34, 33), (1, 2, 2, 2), (2, 1, 2, 2)]


def make(shape, dtype, seed=0, ties=True, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    if ties and shape[2] >= 4:
        x[:, :, :2, :] = 0.3  # constant regions, as Omniglot's background: equal values in windows
    c = shape[1]
    w = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    go = torch.randn(shape[0], c, shape[2] // 2, shape[3] // 2, generator=g, dtype=torch.float64)
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
def test_forward_and_backward_match_aten(shape, dtype, affine, isa):
    x, w, b, go = make(shape, dtype, affine=affine)
    out, got = grads(lambda *a: bn_relu_pool(*a)[0], x, w, b, go)
    ref, want = grads(lambda *a: bn_relu_pool_reference(*a, 1e-5), x, w, b, go)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL[dtype])


@pytest.mark.parametrize("shape", [(5, 8, 28, 28), (5, 8, 14, 14), (3, 5, 9, 11), (5, 8, 3, 3)])
def test_bf16_is_the_float32_computation_rounded(shape, isa):
    # bf16 x (CPU autocast's conv output) with float32 parameters: computed in float32 from the
    # widened input, outputs and dx rounded to bf16, mean/invstd/dweight/dbias float32.
    x, w, b, go = make(shape, torch.float32, ties=False)
    xb, gob = x.bfloat16(), go.bfloat16()
    out, (dx, dw, db) = grads(lambda *a: bn_relu_pool(*a)[0], xb, w, b, gob)
    ref, (rdx, rdw, rdb) = grads(lambda *a: bn_relu_pool_reference(*a, 1e-5), xb.float(), w, b, gob.float())
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(out, ref.bfloat16(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dx.float(), rdx, rtol=1e-2, atol=1e-2 * rdx.abs().max().item())
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(db, rdb, rtol=1e-4, atol=1e-3)
    # rounding exactly as torch's: the output is the float32 result rounded once
    with torch.no_grad():
        f32 = bn_relu_pool(xb.float(), w, b)[0]
    assert torch.equal(out, f32.bfloat16())


@pytest.mark.parametrize("shape", [(5, 8, 28, 28), (3, 5, 9, 11), (4, 2, 5, 4), (2, 3, 7, 7), (2, 2, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_double_backward_matches_aten(shape, affine, isa):
    # The derivative of the backward (what second-order MAML differentiates): gradients of
    # <a, dx> + <a_w, dweight> + <a_b, dbias> w.r.t. grad_out, x and weight.
    x0, w0, b0, go0 = make(shape, torch.float64, affine=affine)
    g = torch.Generator().manual_seed(1)
    ax = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    aw = torch.randn(shape[1], generator=g, dtype=torch.float64)
    ab = torch.randn(shape[1], generator=g, dtype=torch.float64)
    results = []
    for fn in (lambda *a: bn_relu_pool(*a)[0], lambda *a: bn_relu_pool_reference(*a, 1e-5)):
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


def test_gradgradcheck_and_third_order():
    x, w, b, _ = make((3, 2, 4, 6), torch.float64, ties=False)
    args = [t.requires_grad_() for t in (x, w, b)]
    fn = (lambda *a: bn_relu_pool(*a)[0])
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    # no third order, like ATen's batch norm: a clear error, not a silently wrong value
    go = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    dx, = torch.autograd.grad(fn(*args), args[0], go, create_graph=True)
    ddx, = torch.autograd.grad(dx.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match=r"bn_relu_pool does not support 3rd\+ order"):
        torch.autograd.grad(ddx.sum(), args[0])
    with pytest.raises(RuntimeError, match=r"3rd\+ order"):  # ATen, for comparison
        x_ = args[0].detach().requires_grad_()
        dx_, = torch.autograd.grad(bn_relu_pool_reference(x_, args[1], args[2], 1e-5), x_, go, create_graph=True)
        ddx_, = torch.autograd.grad(dx_.square().sum(), x_, create_graph=True)
        torch.autograd.grad(ddx_.sum(), x_)


def test_zero_gradient_gives_zero():
    x, w, b, go = make((4, 3, 8, 8), torch.float32)
    _, (dx, dw, db) = grads(lambda *a: bn_relu_pool(*a)[0], x, w, b, torch.zeros_like(go))
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))
    assert torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize("shape", [(5, 16, 28, 28), (3, 12, 9, 11), (2, 3, 7, 7), (4, 9, 6, 5), (2, 8, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last_matches_aten(shape, dtype, isa):
    # NHWC kernels: lanes over channels (16, 12 = one register + a scalar tail, 3 < one register,
    # 9), odd H/W; outputs and dx stay channels_last.
    x, w, b, go = make(shape, dtype)
    xc, goc = x.contiguous(memory_format=torch.channels_last), go.contiguous(memory_format=torch.channels_last)
    out, got = grads(lambda *a: bn_relu_pool(*a)[0], xc, w, b, goc)
    ref, want = grads(lambda *a: bn_relu_pool_reference(*a, 1e-5), x, w, b, go)
    cl = torch.channels_last
    assert out.is_contiguous(memory_format=cl) and got[0].is_contiguous(memory_format=cl)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for g_, r in zip(got, want):
        torch.testing.assert_close(g_, r, **TOL[dtype])


def test_channels_last_bf16_and_nan():
    x, w, b, go = make((4, 16, 10, 10), torch.float32, ties=False)
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(bn_relu_pool(xb, w, b)[0], bn_relu_pool(xb.contiguous(), w, b)[0])
    x[1, 3, 2, 2] = float("nan")
    out = bn_relu_pool(x.contiguous(memory_format=torch.channels_last), w, b)[0]
    assert out[:, 3].isnan().all() and not out[:, [0, 1, 2]].isnan().any()


def test_non_contiguous_inputs():
    x, w, b, go = make((4, 6, 10, 12), torch.float64)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not NCHW-contiguous
    got_t = go.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous() and not got_t.is_contiguous()
    out, got = grads(lambda *a: bn_relu_pool(*a)[0], xt, w, b, got_t)
    ref, want = grads(lambda *a: bn_relu_pool_reference(*a, 1e-5), x, w, b, go)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    for g_, r in zip(got, want):
        torch.testing.assert_close(g_, r, **TOL[torch.float64])


def test_nan_propagates_like_aten():
    x, w, b, _ = make((2, 3, 6, 6), torch.float32)
    x[1, 1, 2, 3] = float("nan")
    out = bn_relu_pool(x, w, b)[0]
    ref = bn_relu_pool_reference(x, w, b, 1e-5)
    assert torch.equal(out.isnan(), ref.isnan()) and out[:, 1].isnan().all()
    torch.testing.assert_close(out[:, [0, 2]], ref[:, [0, 2]])


def test_bad_inputs_name_the_argument():
    x, w, b, _ = make((2, 3, 6, 6), torch.float32)
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
    with pytest.raises(RuntimeError, match="grad_out must be"):
        out, idx, mean, invstd = torch.ops.fastmeta.bn_relu_pool(x, w, b, 1e-5)
        torch.ops.fastmeta.bn_relu_pool_backward(out[:1], x, w, mean, invstd, idx)


# ------------------------------------------------------------------------------ FusionPlan / MetaLearner
def test_plan_finds_conv4_blocks_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Conv4(5, hidden=8).double()
    plan = FusionPlan(model)
    assert plan.blocks == 4
    keys = list(model.state_dict())
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    with plan.active():
        got = model(x)
        assert "forward" in model.features.__dict__
    assert "forward" not in model.features.__dict__ and list(model.state_dict()) == keys
    torch.testing.assert_close(got, model(x), rtol=1e-12, atol=1e-12)


def test_plan_skips_what_it_cannot_fuse():
    # MaxPool2d(3), BatchNorm in eval mode with running statistics, a functorch transform.
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3))
    assert FusionPlan(seq).blocks == 0
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)).double()
    plan = FusionPlan(model)
    assert plan.blocks == 1
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    model.train()
    model(x)  # running statistics move off their initial values
    model.eval()
    with plan.active():
        got = model(x)
    torch.testing.assert_close(got, model(x))
    with plan.active():
        got = torch.func.vmap(model)(x.unsqueeze(1))
    model.train()
    # a hook on one of the three modules must still run: that run is not fused
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with plan.active():
        model(x)
    assert seen == [torch.Size([3, 4, 8, 8])]


def test_plan_updates_running_statistics_like_batch_norm():
    for momentum in (0.1, None):
        torch.manual_seed(0)
        a = nn.Sequential(nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.MaxPool2d(2)).double()
        b = nn.Sequential(nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.MaxPool2d(2)).double()
        plan = FusionPlan(a)
        for step in range(3):
            x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * (step + 1) + step
            with plan.active():
                out = a(x)
            torch.testing.assert_close(out, b(x))
        for name, buf in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[name], buf, msg=name)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps,adapt", [(1, "all"), (2, "all"), (1, "head")])
def test_fused_meta_gradient_matches_the_plain_loop(first_order, steps, adapt):
    # MAML's meta-gradient (Finn et al. 2017, Alg. 1; Fallah et al. eq. 5, first order eq. 8)
    # from an independent per-task autograd loop with ATen's modules, float64.
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    batch = conv_batch()
    algo = fastmeta.MAML(0.4, steps, first_order=first_order)
    learner = fastmeta.MetaLearner(model, algo, adapt=adapt, strategy="loop", fused=True)
    got = learner.meta_gradient(batch).grad
    assert rel_err(got, oracle(model, batch, 0.4, steps, first_order, adapt)) < 1e-9


@pytest.mark.parametrize("first_order", [False, True])
def test_fused_channels_last_meta_gradient_matches_the_plain_loop(first_order):
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    batch = conv_batch()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.4, 1, first_order=first_order), strategy="loop",
                                   fused=True, channels_last=True)
    got = learner.meta_gradient(batch).grad
    assert rel_err(got, oracle(model, batch, 0.4, 1, first_order)) < 1e-9


def test_fused_bf16_meta_gradient_is_float32_and_close():
    torch.manual_seed(0)
    model = Conv4(3, hidden=16)
    ref = oracle(model.double(), conv_batch(), 0.4, 1, False)
    model.float()
    res = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop", fused=True, bf16=True
                               ).meta_gradient(conv_batch(dtype=torch.float32))
    assert res.grad.dtype == torch.float32
    err, cos = rel_err(res.grad.double(), ref), float(F.cosine_similarity(res.grad.double(), ref, dim=0))
    # As the unfused bf16 mode (test_speed_modes): bf16 rounding, not a wrong formula.
    assert 1e-3 < err < 0.5 and cos > 0.95, (err, cos)


def test_fused_flag_is_validated():
    with pytest.raises(ValueError, match="fused: expected a bool"):
        fastmeta.MetaLearner(Conv4(3, hidden=8), fastmeta.MAML(0.4), fused="yes")
