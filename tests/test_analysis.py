"""fastmeta.analysis: landscapes (Li et al. 2018; Sharp-MAML Fig. 1/4), sharpness (Sharp-MAML eq. 7,
SAM eq. 8a) and generalization gap (sec. 5.3), against independent oracles in float64.

Oracles: a least-squares model whose Hessian and gradient are written down from the data in
numpy (the 1-D landscape is then an exact quadratic in the step, and eq. 7 is a trust-region
problem solved by its secular equation with scipy); the plain per-task autograd loops of
tests/reference.py for nonlinear nets; hand-computed filter norms.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from torch import nn
from torch.func import functional_call

import fastmeta
from fastmeta.analysis import filter_normalize, generalization_gap, loss_landscape, random_directions, sharpness
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch

from reference import flat, maml_meta_grad, rel_err, task_loss

F64 = torch.float64


# ---------------------------------------------------------------- least-squares oracle
def lsq_case(T=3, n=4, Ns=7, Nq=9, seed=0):
    """Linear regression y = x.w + b on T tasks; L_t(theta) = mean_i (x~_i . theta - y_i)^2."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(n, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, n, generator=g, dtype=F64))
        model.bias.fill_(0.3)
    w_true = torch.randn(T, n, 1, generator=g, dtype=F64)
    x = torch.randn(T, Ns + Nq, n, generator=g, dtype=F64) * torch.linspace(0.5, 1.5, n, dtype=F64)
    y = x @ w_true + 0.1 * torch.randn(T, Ns + Nq, 1, generator=g, dtype=F64)
    return model, TaskBatch(x[:, :Ns], y[:, :Ns], x[:, Ns:], y[:, Ns:])


def np_theta(model):
    return np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy().ravel()])


def np_design(x):
    x = x.numpy()
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1)   # [N, n+1]: x~ = [x, 1]


def np_loss(X, y, th):
    r = X @ th - y.numpy().ravel()
    return float(np.mean(r * r))


def np_grad_hess(X, y, th):
    N = X.shape[0]
    return 2 / N * X.T @ (X @ th - y.numpy().ravel()), 2 / N * X.T @ X


def np_adapt(Xs, ys, th, lr, steps):
    for _ in range(steps):
        th = th - lr * np_grad_hess(Xs, ys, th)[0]
    return th


def trust_region_max(H, g, alpha):
    """max_{||e|| <= alpha} 0.5 e'He + g'e for symmetric PSD H, by the secular equation:
    e(lam) = (lam I - H)^{-1} g with lam > lam_max(H) and ||e(lam)|| = alpha (Moré & Sorensen)."""
    lam, Q = np.linalg.eigh(H)
    gt = Q.T @ g
    phi = lambda l: math.sqrt(np.sum(gt ** 2 / (l - lam) ** 2)) - alpha  # noqa: E731
    hi = lam[-1] + np.linalg.norm(g) / alpha + 1.0
    lo = lam[-1] + 1e-15 * max(1.0, abs(lam[-1]))
    assert phi(lo) > 0 > phi(hi)   # generic g: the boundary solution exists (no hard case)
    lstar = brentq(phi, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=1000)
    e = Q @ (gt / (lstar - lam))
    return 0.5 * e @ H @ e + g @ e


def maml_quadratic(batch, th, lr):
    """The MAML objective of lsq_case with one inner step is itself quadratic in theta:
    F_t(theta + e) = F_t(theta) + g_t'e + 0.5 e'A_t e, A_t = M_t Hq_t M_t, g_t = M_t grad Lq_t(theta'_t),
    M_t = I - lr Hs_t. Returns the task-mean (g, A) and per-task lists."""
    gs, As = [], []
    for t in range(batch.num_tasks):
        Xs, Xq = np_design(batch.support_x[t]), np_design(batch.query_x[t])
        _, Hs = np_grad_hess(Xs, batch.support_y[t], th)
        M = np.eye(len(th)) - lr * Hs
        thp = np_adapt(Xs, batch.support_y[t], th, lr, 1)
        gq, Hq = np_grad_hess(Xq, batch.query_y[t], thp)
        gs.append(M @ gq)
        As.append(M @ Hq @ M)
    return np.mean(gs, 0), np.mean(As, 0), gs, As


def plain_quadratic(batch, th):
    gs, Hs = zip(*(np_grad_hess(np_design(batch.query_x[t]), batch.query_y[t], th) for t in range(batch.num_tasks)))
    return np.mean(gs, 0), np.mean(Hs, 0), list(gs), list(Hs)


# ---------------------------------------------------------------- 1-D landscapes, analytic
@pytest.mark.parametrize("strategy", ["vmap", "loop", "bmm"])
def test_1d_plain_landscape_is_the_analytic_quadratic(strategy):
    model, batch = lsq_case()
    th = np_theta(model)
    ls = loss_landscape(model, batch, 1, steps=9, span=2.0, post_adaptation=False, loss_fn="mse",
                        ignore_biasbn=False, strategy=strategy, grid_chunk=4)
    d = ls.directions[0].numpy()
    L0 = np.mean([np_loss(np_design(batch.query_x[t]), batch.query_y[t], th) for t in range(3)])
    g, H, _, _ = plain_quadratic(batch, th)
    a = np.linspace(-2, 2, 9)
    want = L0 + a * (g @ d) + 0.5 * a ** 2 * (d @ H @ d)          # exact for a quadratic
    assert np.max(np.abs(ls.loss.numpy() - want) / np.abs(want)) < 1e-12
    assert abs(ls.center_loss - L0) < 1e-12 * L0
    assert ls.strategy == strategy


@pytest.mark.parametrize("strategy", ["vmap", "loop", "bmm"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_1d_post_adaptation_landscape_matches_numpy_inner_loop(strategy, inner_steps):
    model, batch = lsq_case()
    th, lr = np_theta(model), 0.05
    ls = loss_landscape(model, batch, 1, steps=7, span=1.5, post_adaptation=True, loss_fn="mse", inner_lr=lr,
                        inner_steps=inner_steps, ignore_biasbn=False, strategy=strategy, grid_chunk=3)
    d = ls.directions[0].numpy()
    want = []
    for a in np.linspace(-1.5, 1.5, 7):
        per = []
        for t in range(3):
            thp = np_adapt(np_design(batch.support_x[t]), batch.support_y[t], th + a * d, lr, inner_steps)
            per.append(np_loss(np_design(batch.query_x[t]), batch.query_y[t], thp))
        want.append(per)
    want = np.array(want)
    assert np.max(np.abs(ls.per_task.numpy() - want) / want) < 1e-12
    # and for one step, the closed form in a (F is quadratic)
    if inner_steps == 1:
        g, A, _, _ = maml_quadratic(batch, th, lr)
        a = np.linspace(-1.5, 1.5, 7)
        closed = want[3].mean() + a * (g @ d) + 0.5 * a ** 2 * (d @ A @ d)
        assert np.max(np.abs(ls.loss.numpy() - closed) / closed) < 1e-12


# ---------------------------------------------------------------- sharpness, eq. 7 vs trust-region oracle
@pytest.mark.parametrize("post_adaptation", [False, True], ids=["plain", "maml"])
def test_sharpness_matches_trust_region_maximum(post_adaptation):
    model, batch = lsq_case()
    th, lr, alpha = np_theta(model), 0.05, 0.7
    g, H = (maml_quadratic(batch, th, lr) if post_adaptation else plain_quadratic(batch, th))[:2]
    want = trust_region_max(H, g, alpha)
    s = sharpness(model, batch, alpha, steps=300, post_adaptation=post_adaptation, loss_fn="mse", inner_lr=lr,
                  strategy="vmap")
    assert abs(s.value - want) < 1e-9 * abs(want)
    e = s.eps.numpy()
    assert np.linalg.norm(e) <= alpha * (1 + 1e-12)
    assert abs((g @ e + 0.5 * e @ H @ e) - want) < 1e-9 * abs(want)   # the returned eps attains it
    # The first-order SAM point (k = 1) is strictly worse here: the test can tell the two apart.
    s1 = sharpness(model, batch, alpha, steps=1, post_adaptation=post_adaptation, loss_fn="mse", inner_lr=lr)
    assert s1.value < want * (1 - 1e-4)


@pytest.mark.parametrize("strategy", ["vmap", "loop", "bmm"])
def test_per_task_sharpness_matches_per_task_oracles(strategy):
    model, batch = lsq_case()
    th, lr, alpha = np_theta(model), 0.05, 0.4
    _, _, gs, As = maml_quadratic(batch, th, lr)
    want = np.array([trust_region_max(A, g, alpha) for g, A in zip(gs, As)])
    s = sharpness(model, batch, alpha, steps=300, per_task=True, loss_fn="mse", inner_lr=lr, strategy=strategy)
    assert np.max(np.abs(s.per_task.numpy() - want) / want) < 1e-9
    assert abs(s.value - want.mean()) < 1e-9 * want.mean()
    assert s.eps.shape == (3, len(th))


@pytest.mark.parametrize("post_adaptation", [False, True], ids=["plain", "maml"])
def test_one_step_is_sams_closed_form(post_adaptation):
    model, batch = lsq_case()
    th, lr, alpha = np_theta(model), 0.05, 0.3
    g, H = (maml_quadratic(batch, th, lr) if post_adaptation else plain_quadratic(batch, th))[:2]
    s = sharpness(model, batch, alpha, steps=1, post_adaptation=post_adaptation, loss_fn="mse", inner_lr=lr)
    e_sam = alpha * g / np.linalg.norm(g)                               # eq. 8a
    assert np.max(np.abs(s.eps.numpy() - e_sam)) < 1e-12 * alpha
    assert abs(s.last - (g @ e_sam + 0.5 * e_sam @ H @ e_sam)) < 1e-11 * s.last
    assert abs(s.first_order - alpha * np.linalg.norm(g)) < 1e-12 * s.first_order


def test_one_step_eps_follows_the_second_order_maml_gradient_of_a_conv_net():
    # eps of k = 1 is alpha * grad F / ||grad F|| with grad F the exact MAML meta-gradient (Fallah
    # eq. 5) from the plain per-task loop -- for Conv-4 + batch norm under vmap (functorch#534 trap)
    # and ANIL (only the head adapts, the shared body is still perturbed).
    model = fastmeta.Conv4(ways=3, hidden=4, image_size=16).double()
    x = torch.randn(2, 12, 1, 16, 16, dtype=F64)
    y = torch.arange(3).repeat_interleave(4).expand(2, -1)
    batch = TaskBatch(x[:, ::2], y[:, ::2].contiguous(), x[:, 1::2], y[:, 1::2].contiguous(), ways=3)
    # (Second-order conv passes are the slowest thing in this file: two of the four combinations.)
    for adapt, strategy in (("all", "vmap"), ("head", "loop")):
        layout = ParamLayout(model, adapt)
        s = sharpness(model, batch, 0.05, steps=1, inner_lr=0.3, adapt=adapt, strategy=strategy)
        want = flat(maml_meta_grad(model, batch, F.cross_entropy, 0.3, 1, layout.adapted), layout)
        assert rel_err(s.eps, 0.05 * want / want.norm()) < 1e-9, (adapt, strategy)


# ---------------------------------------------------------------- landscape batching vs a plain loop
def plain_objective(model, params, batch, t, lr, adapt_names, post):
    """One task's objective at named params, the plain autograd way (Sharp-MAML eq. 2 inner step)."""
    fast = dict(params)
    if post:
        loss = task_loss(model, fast, batch.support_x[t], batch.support_y[t], F.mse_loss)
        grads = torch.autograd.grad(loss, [fast[n] for n in adapt_names])
        for n, g in zip(adapt_names, grads):
            fast[n] = fast[n] - lr * g
    return float(task_loss(model, fast, batch.query_x[t], batch.query_y[t], F.mse_loss).detach())


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_2d_grid_matches_point_by_point_loop(strategy, adapt):
    model = fastmeta.SineMLP(hidden=10, activation="tanh").double()
    x = torch.rand(2, 12, 1, dtype=F64) * 10 - 5
    batch = TaskBatch(x[:, :5], torch.sin(x[:, :5]), x[:, 5:], torch.sin(x[:, 5:]))
    ls = loss_landscape(model, batch, 2, steps=3, span=0.8, loss_fn="mse", inner_lr=0.1, adapt=adapt,
                        strategy=strategy, grid_chunk=4)   # 9 points in chunks of 4: a ragged last chunk
    layout = ParamLayout(model, adapt)
    theta = layout.flatten(model)
    c = [-0.8, 0.0, 0.8]
    for i in range(3):
        for j in range(3):
            p = theta + c[i] * ls.directions[0] + c[j] * ls.directions[1]
            named = {s.name: p[s.offset: s.offset + s.numel].view(s.shape).requires_grad_() for s in layout.slots}
            for t in range(2):
                want = plain_objective(model, named, batch, t, 0.1, layout.adapted, True)
                assert abs(float(ls.per_task[i, j, t]) - want) < 1e-12 * want


# ---------------------------------------------------------------- filter normalization (Li et al. 2018)
def test_filter_normalized_directions_have_the_parameters_filter_norms():
    model = fastmeta.Conv4(ways=5, hidden=6, image_size=16).double()
    with torch.no_grad():
        model.features[0].weight[2].zero_()      # a dead filter: its direction must be zero, not NaN
    layout = ParamLayout(model)
    theta = layout.flatten(model)
    dirs = random_directions(layout, theta, 2, seed=3)
    params = dict(model.named_parameters())
    for d in dirs:
        assert torch.isfinite(d).all()
        for s in layout.slots:
            dv = d[s.offset: s.offset + s.numel].view(s.shape)
            w = params[s.name].detach()
            if w.dim() >= 2:
                dn = dv.reshape(s.shape[0], -1).norm(dim=1)
                wn = w.reshape(s.shape[0], -1).norm(dim=1)
                assert torch.allclose(dn, wn, rtol=1e-12, atol=0), s.name
            else:
                assert (dv == 0).all(), s.name           # biases / BN affine ignored (Li et al. default)
    assert (dirs[0].view(-1)[:6 * 9].view(6, 9)[2] == 0).all()
    # The two directions differ (independent draws), and with ignore_biasbn=False 1-D tensors copy theta.
    assert rel_err(dirs[0], dirs[1]) > 0.5
    d = random_directions(layout, theta, 1, seed=3, ignore_biasbn=False)[0]
    for s in layout.slots:
        if len(s.shape) == 1:
            assert torch.equal(d[s.offset: s.offset + s.numel], theta[s.offset: s.offset + s.numel])


def test_same_seed_same_raw_direction_across_checkpoints():
    # Overlays compare checkpoints along the same raw direction, each rescaled per filter: the
    # normalized directions of two models are then positive per-filter multiples of each other.
    a, b = fastmeta.Conv4(5, hidden=4, image_size=16).double(), fastmeta.Conv4(5, hidden=4, image_size=16).double()
    la, lb = ParamLayout(a), ParamLayout(b)
    da = random_directions(la, la.flatten(a), 1, seed=7)[0]
    db = random_directions(lb, lb.flatten(b), 1, seed=7)[0]
    s = la.slots[0]
    ra = da[s.offset: s.offset + s.numel].view(s.shape[0], -1)
    rb = db[s.offset: s.offset + s.numel].view(s.shape[0], -1)
    ratio = rb / ra
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-12) and (ratio > 0).all()


def test_layer_normalization_matches_whole_tensor_norms():
    model = fastmeta.SineMLP(hidden=5).double()
    layout = ParamLayout(model)
    theta = layout.flatten(model)
    raw = torch.randn(layout.P, dtype=F64)
    d = filter_normalize(raw, theta, layout, "layer")
    for s in layout.slots:
        if len(s.shape) >= 2:
            assert abs(float(d[s.offset: s.offset + s.numel].norm() / theta[s.offset: s.offset + s.numel].norm()) - 1) < 1e-12


# ---------------------------------------------------------------- generalization gap
def test_generalization_gap_matches_plain_per_task_evaluation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.5), strategy="loop")

    def tasks(T, seed):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(T, 3, 4, generator=g, dtype=F64)
        y = torch.arange(3).repeat(4).expand(T, -1)
        x = centers.gather(1, y[..., None].expand(-1, -1, 4)) + 0.8 * torch.randn(T, 12, 4, generator=g, dtype=F64)
        return TaskBatch(x[:, :3], y[:, :3].contiguous(), x[:, 3:], y[:, 3:].contiguous(), ways=3)

    tr, te = tasks(5, 0), tasks(6, 1)
    gap = generalization_gap(learner, tr, te)

    def plain(b):
        params = {n: p for n, p in model.named_parameters()}
        losses, accs = [], []
        for t in range(b.num_tasks):
            loss = task_loss(model, params, b.support_x[t], b.support_y[t], F.cross_entropy)
            grads = torch.autograd.grad(loss, list(params.values()))
            fast = {n: p - 0.5 * g for (n, p), g in zip(params.items(), grads)}
            out = functional_call(model, fast, (b.query_x[t],))
            losses.append(float(F.cross_entropy(out, b.query_y[t]).detach()))
            accs.append(float((out.argmax(-1) == b.query_y[t]).double().mean()))
        return np.array(losses), np.array(accs)

    (ltr, atr), (lte, ate) = plain(tr), plain(te)
    ci = lambda v: 1.96 * v.std(ddof=1) / math.sqrt(len(v))  # noqa: E731
    assert abs(gap.train.accuracy - atr.mean()) < 1e-12 and abs(gap.test.accuracy - ate.mean()) < 1e-12
    assert abs(gap.accuracy_gap - (atr.mean() - ate.mean())) < 1e-12
    assert abs(gap.loss_gap - (lte.mean() - ltr.mean())) < 1e-10
    assert abs(gap.accuracy_gap_ci95 - math.hypot(ci(atr), ci(ate))) < 1e-12
    assert abs(gap.loss_gap_ci95 - math.hypot(ci(ltr), ci(lte))) < 1e-10
    assert gap.train.num_tasks == 5 and gap.test.num_tasks == 6


# ---------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    model, batch = lsq_case()
    kw = dict(loss_fn="mse", inner_lr=0.05)
    for span in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="span"):
            loss_landscape(model, batch, span=span, **kw)
    for radius in (0, -0.1, float("inf")):
        with pytest.raises(ValueError, match="radius"):
            sharpness(model, batch, radius, **kw)
    with pytest.raises(ValueError, match="steps"):
        sharpness(model, batch, 0.1, steps=0, **kw)
    with pytest.raises(ValueError, match="steps"):
        loss_landscape(model, batch, steps=0, **kw)
    with pytest.raises(ValueError, match="directions"):
        loss_landscape(model, batch, directions=3, **kw)
    with pytest.raises(ValueError, match="normalization"):
        loss_landscape(model, batch, normalization="unit", **kw)
    with pytest.raises(ValueError, match="inner_lr"):
        loss_landscape(model, batch, loss_fn="mse")               # MAML objective needs alpha
    other = fastmeta.SineMLP(hidden=3).double()                  # directions of another architecture
    d = random_directions(ParamLayout(other), ParamLayout(other).flatten(other), 1)
    with pytest.raises(ValueError, match="direction_vectors"):
        loss_landscape(model, batch, direction_vectors=d, **kw)
    with pytest.raises(ValueError, match="batch"):
        loss_landscape(model.float(), batch, **kw)                # float64 data, float32 model
    with pytest.raises(ValueError, match="batch"):                # inputs the model cannot take
        wrong = TaskBatch(batch.support_x[..., :2], batch.support_y, batch.query_x[..., :2], batch.query_y)
        loss_landscape(model.double(), wrong, strategy="loop", **kw)
