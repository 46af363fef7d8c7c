"""ANIL combinations (Sharp-MAML sec. 5.4, eq. 19): every algorithm with adapt="head" adapts only the
head in the inner loop and still meta-learns the body. The exact meta-gradients of the ANIL variants
are checked against the plain loops in test_hfmaml.py / test_sharp.py (adapt="head" cases); here:
each registry algorithm runs as ANIL through MetaLearner and the CLI config, and ANIL feature
caching (Raghu et al. 2020: the body runs once per (body parameters, inputs)) is exact, removes
body evaluations, and turns itself off (or raises, when required) for models it cannot split."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.algorithms.registry import FACTORIES, build_algorithm
from fastmeta.evaluation import ChannelsLast, Evaluator, FeatureSplit
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch
from reference import flat, hfmaml_meta_grad, maml_meta_grad, rel_err, sharp_maml_meta_grad
from test_speed_modes import assert_in_bf16_band, bf16_rounded


def conv_batch():
    x = torch.randn(2, 3 * 2, 1, 16, 16, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(2).expand(2, -1)
    return TaskBatch(x[:, ::2], y[:, ::2].contiguous(), x[:, 1::2], y[:, 1::2].contiguous(), ways=3)


@pytest.mark.parametrize("algo", sorted(FACTORIES))
def test_every_algorithm_runs_as_anil(algo):
    model = fastmeta.Conv4(ways=3, hidden=4, image_size=16).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = fastmeta.MetaLearner(model, build_algorithm(dict(algo=algo, inner_lr=0.3, inner_steps=2)),
                                   adapt="head", strategy="loop")
    assert learner.layout.adapted == ["head.weight", "head.bias"]
    res = learner.step(conv_batch())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert float(model.features[0].weight.grad.abs().sum()) > 0  # the body is meta-learned
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # step() does not update
    assert 0.0 <= res.accuracy <= 1.0
    # meta-test adaptation touches only the head
    fast = learner.adapt(conv_batch().support_x[0], conv_batch().support_y[0])
    assert torch.equal(fast.features[0].weight, model.features[0].weight)


# ------------------------------------------------------------------------------ feature caching
def conv_case():
    model = fastmeta.Conv4(ways=3, hidden=4, image_size=16).double()
    x = torch.randn(2, 3 * 4, 1, 16, 16, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(4).expand(2, -1)
    b = TaskBatch(x[:, ::2], y[:, ::2].contiguous(), x[:, 1::2], y[:, 1::2].contiguous(), ways=3)
    return model, b, "cross_entropy", 0.3


def sine_case():
    model = fastmeta.SineMLP(hidden=12, activation="tanh").double()
    x = torch.rand(3, 14, 1, dtype=torch.float64) * 10 - 5
    y = 2.0 * torch.sin(x - 0.3)
    return model, TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:]), "mse", 0.05


ALGOS = {
    "maml": lambda lr, k: fastmeta.MAML(lr, k),
    "fomaml": lambda lr, k: fastmeta.FOMAML(lr, k),
    "hfmaml": lambda lr, k: fastmeta.HFMAML(lr, k, delta=1e-3),
    "sharp-low": lambda lr, k: fastmeta.SharpMAML(lr, k, alpha_low=0.1),
    "sharp-both": lambda lr, k: fastmeta.SharpMAML(lr, k, alpha_low=0.1, alpha_up=0.1),
    "esharp-low": lambda lr, k: fastmeta.SharpMAML(lr, k, alpha_low=0.1, swp_keep_prob=0.7, sds_ratio=0.5, seed=7),
}


class BodyCalls:
    """Counts the body's forward calls (a module forward hook; under vmap one call per vmapped batch)."""

    def __init__(self, body: nn.Module):
        self.n = 0
        self.handle = body.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1


def body_of(model):
    return model.features if isinstance(model, fastmeta.Conv4) else model.body


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("case", [conv_case, sine_case], ids=["conv4", "sine"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_feature_cache_is_exact(algo, steps, case, strategy):
    model, batch, loss_fn, lr = case()
    results, calls = {}, {}
    for cache in (True, False):
        learner = fastmeta.MetaLearner(model, ALGOS[algo](lr, steps), loss_fn=loss_fn, adapt="head",
                                       strategy=strategy, feature_cache=cache)
        counter = BodyCalls(body_of(model))
        res = learner.meta_gradient(batch)
        ev = learner.evaluate(batch)
        counter.handle.remove()
        assert learner.feature_cache is cache
        results[cache], calls[cache] = (res, ev), counter.n
    (res_c, ev_c), (res_p, ev_p) = results[True], results[False]
    assert rel_err(res_c.grad, res_p.grad) < 1e-12
    assert rel_err(res_c.query_loss, res_p.query_loss) < 1e-12
    assert rel_err(ev_c.per_task_loss, ev_p.per_task_loss) < 1e-12
    if ev_p.per_task_accuracy is not None:
        assert torch.equal(ev_c.per_task_accuracy, ev_p.per_task_accuracy)
    # the cache was really used: fewer body evaluations once there are several inner steps
    # (the cached run also pays the one-off model(x) vs head(body(x)) check: 2 calls)
    assert calls[True] - 2 <= calls[False]
    if steps > 1:
        assert calls[True] - 2 < calls[False]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_cached_anil_matches_plain_loops(strategy):
    # Independent oracles (tests/reference.py): MAML (Sharp-MAML eq. 9, Alg. 2), Sharp-MAML_both
    # (Alg. 1, eqs. 11-15), HF-MAML (Fallah eqs. 9-11) with the body's mixed term.
    model, batch, _, lr = conv_case()
    layout = ParamLayout(model, "head")
    cases = [(fastmeta.MAML(lr, 2), maml_meta_grad(model, batch, F.cross_entropy, lr, 2, layout.adapted)),
             (fastmeta.SharpMAML(lr, 2, alpha_low=0.1, alpha_up=0.1),
              sharp_maml_meta_grad(model, batch, F.cross_entropy, lr, 2, layout.adapted, 0.1, 0.1)),
             (fastmeta.HFMAML(lr, 2, delta=1e-3),
              hfmaml_meta_grad(model, batch, F.cross_entropy, lr, 2, layout.adapted, delta=1e-3))]
    for algo, want in cases:
        learner = fastmeta.MetaLearner(model, algo, adapt="head", strategy=strategy)
        got = learner.meta_gradient(batch).grad
        assert learner.feature_cache
        assert rel_err(got, flat(want, layout)) < 1e-9, type(algo).__name__


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_head_gradients_keep_the_body_graph(create_graph, strategy):
    # Gradients w.r.t. the head rows only (inner steps, SAM ascent) must neither free nor alter the
    # body's graph: the body gradient afterwards, through the same cached features, equals the
    # uncached one.
    model, batch, _, _ = conv_case()
    layout = ParamLayout(model, "head")
    theta = layout.flatten(model).requires_grad_()
    x, y = batch.support_x, batch.support_y

    def body_grad(ev):
        adapted, shared = layout.split(theta)
        with ev.feature_scope():
            rows = adapted.expand(x.shape[0], -1)
            for _ in range(2):
                _, g = ev.grads(rows, shared, x, y, create_graph=create_graph)
                rows = rows - 0.3 * g
            loss = ev.losses(rows, shared, x, y)
            return torch.autograd.grad(loss.sum(), theta)[0]

    cached = Evaluator(model, layout, F.cross_entropy, strategy, feature_cache=True)
    plain = Evaluator(model, layout, F.cross_entropy, strategy)
    counter = BodyCalls(model.features)
    got = body_grad(cached)
    # one cached evaluation (per task under loop), plus the one-off model(x) vs head(body(x)) check
    assert counter.n == (x.shape[0] if strategy == "loop" else 1) + 2
    assert rel_err(got, body_grad(plain)) < 1e-12
    assert float(got[layout.D:].abs().sum()) > 0


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("algo,per_task", [("maml", lambda k: 2), ("sharp-low", lambda k: 2),
                                           ("maml-off", lambda k: k + 1), ("sharp-low-off", lambda k: 2 * k + 1)])
def test_body_runs_once_per_support_and_query(algo, per_task, strategy):
    # K inner steps. MAML: the body runs on the support set at each step and once on the query set
    # (K + 1) without the cache; with it, once on each. Sharp-MAML_low adds the ascent gradient
    # at each step (2K + 1 without the cache), still 2 with it.
    K = 4
    model, batch, _, lr = conv_case()
    name = algo.replace("-off", "")
    algorithm = fastmeta.MAML(lr, K) if name == "maml" else fastmeta.SharpMAML(lr, K, alpha_low=0.1)
    learner = fastmeta.MetaLearner(model, algorithm, adapt="head", strategy=strategy,
                                   feature_cache=not algo.endswith("-off"))
    learner.meta_gradient(batch)  # warm-up: the one-off check runs the body twice
    counter = BodyCalls(model.features)
    learner.meta_gradient(batch)
    chunks = batch.num_tasks if strategy == "loop" else 1  # under vmap one body call covers all tasks
    assert counter.n == chunks * per_task(K)
    counter.n = 0
    learner.evaluate(batch)
    assert counter.n == chunks * (2 if learner.feature_cache else K + 1)


class SkipNet(nn.Module):
    """A body/head model whose forward is NOT head(body(x)): a skip connection around the body."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.body(x) + x)


def skip_batch():
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    y = torch.randn(2, 10, 1, dtype=torch.float64)
    return TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_mismatch_turns_the_cache_off(strategy):
    model, batch = SkipNet().double(), skip_batch()
    auto = fastmeta.MetaLearner(model, fastmeta.MAML(0.1, 3), loss_fn="mse", adapt="head", strategy=strategy)
    assert auto.feature_cache  # structurally it qualifies ...
    got = auto.meta_gradient(batch).grad
    assert not auto.feature_cache  # ... the numerical check on the first batch refutes it
    assert "head(body(x))" in auto.feature_cache_reason and "off" in auto.feature_cache_reason
    off = fastmeta.MetaLearner(model, fastmeta.MAML(0.1, 3), loss_fn="mse", adapt="head", strategy=strategy,
                               feature_cache=False)
    layout = ParamLayout(model, "head")
    want = flat(maml_meta_grad(model, batch, F.mse_loss, 0.1, 3, layout.adapted), layout)
    assert rel_err(got, want) < 1e-9 and rel_err(off.meta_gradient(batch).grad, want) < 1e-9

    required = fastmeta.MetaLearner(model, fastmeta.MAML(0.1, 3), loss_fn="mse", adapt="head", strategy=strategy,
                                    feature_cache=True)
    with pytest.raises(ValueError, match="feature_cache.*head\\(body\\(x\\)\\)"):
        required.meta_gradient(batch)


def test_dropout_between_body_and_head_is_detected():
    class Dropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.drop, self.head = nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 1)

        def forward(self, x):
            return self.head(self.drop(self.body(x)))

    model = Dropped().double()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.1), loss_fn="mse", adapt="head", strategy="loop")
    x = skip_batch().support_x
    rng = torch.get_rng_state()
    learner._verify_features(x)
    assert not learner.feature_cache
    assert torch.equal(torch.get_rng_state(), rng)  # the check does not consume the global RNG


def test_feature_cache_required_errors_and_auto_reasons():
    conv = fastmeta.Conv4(ways=3, hidden=4, image_size=16).double()
    with pytest.raises(ValueError, match="feature_cache.*adapt='all'"):
        fastmeta.MetaLearner(conv, fastmeta.MAML(0.1), adapt="all", feature_cache=True)
    auto = fastmeta.MetaLearner(conv, fastmeta.MAML(0.1), adapt="all")
    assert not auto.feature_cache and "adapt='all'" in auto.feature_cache_reason
    off = fastmeta.MetaLearner(conv, fastmeta.MAML(0.1), adapt="head", feature_cache=False)
    assert not off.feature_cache and "feature_cache=False" in off.feature_cache_reason
    on = fastmeta.MetaLearner(conv, fastmeta.MAML(0.1), adapt="head")
    assert on.feature_cache and "'features'" in on.feature_cache_reason and "'head'" in on.feature_cache_reason
    with pytest.raises(ValueError, match="feature_cache"):
        fastmeta.MetaLearner(conv, fastmeta.MAML(0.1), adapt="head", feature_cache="yes")

    class TwoBodies(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.b(self.a(x)))

    with pytest.raises(ValueError, match="feature_cache.*exactly one direct child"):
        fastmeta.MetaLearner(TwoBodies(), fastmeta.MAML(0.1), loss_fn="mse", adapt="head", feature_cache=True)
    # adapting only part of the head (a direct child) is not the head
    with pytest.raises(ValueError, match="feature_cache.*not exactly the trainable parameters"):
        fastmeta.MetaLearner(TwoBodies(), fastmeta.MAML(0.1), loss_fn="mse", adapt=["head.weight"],
                             feature_cache=True)
    with pytest.raises(ValueError, match="feature_cache"):
        Evaluator(TwoBodies(), ParamLayout(TwoBodies(), "head"), F.mse_loss, "loop", feature_cache=True)


def test_frozen_body_is_cached():
    # A frozen (pretrained) body: all trainable parameters are the head's; its features are constants.
    model, batch, _, lr = conv_case()
    for p in model.features.parameters():
        p.requires_grad_(False)
    grads = {}
    for cache in (True, False):
        learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr, 3), adapt="all", strategy="loop", feature_cache=cache)
        grads[cache] = learner.meta_gradient(batch).grad
        assert learner.feature_cache is cache
    assert rel_err(grads[True], grads[False]) < 1e-12


def test_speed_modes_apply_to_body_and_head(monkeypatch):
    model, batch, _, lr = conv_case()
    seen = []
    original = ChannelsLast.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        if func is F.conv2d:
            seen.append(args[0].shape)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(ChannelsLast, "__torch_function__", counting)
    grads = {}
    for cache in (True, False):
        learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr, 2), adapt="head", strategy="loop",
                                       channels_last=True, feature_cache=cache)
        grads[cache] = learner.meta_gradient(batch).grad
    assert seen  # the body's convolutions ran under the channels_last mode
    assert rel_err(grads[True], grads[False]) < 1e-12
    # bf16 autocast: the same bf16 ops, but with the cache the body's backward runs once on the sum
    # of the inner steps' feature gradients (rounded to bf16) instead of once per step: the two
    # differ by bf16 rounding, far below bf16's own error against the float64 meta-gradient. That
    # error must lie in test_speed_modes.py's band (BF16_BAND x the error of rounding the parameters
    # and data alone to bf16, measured in float64), which first-order MAML misses.
    layout = ParamLayout(model, "head")
    ref = flat(maml_meta_grad(model, batch, F.cross_entropy, lr, 2, layout.adapted), layout)
    rounded = flat(maml_meta_grad(bf16_rounded(model), batch.to(torch.bfloat16).to(torch.float64), F.cross_entropy,
                                  lr, 2, layout.adapted), layout)
    err_round = rel_err(rounded, ref)  # measured 0.0292; bf16 0.0377 (1.29 x), first-order MAML 0.305
    model, batch = model.float(), batch.to(torch.float32)
    res = {c: fastmeta.MetaLearner(model, fastmeta.MAML(lr, 2), adapt="head", strategy="loop", bf16=True,
                                   feature_cache=c).meta_gradient(batch).grad for c in (True, False)}
    assert res[True].dtype == torch.float32
    fo = fastmeta.MetaLearner(model, fastmeta.FOMAML(lr, 2), adapt="head", strategy="loop").meta_gradient(batch).grad
    err_cached, err_plain = rel_err(res[True].double(), ref), rel_err(res[False].double(), ref)
    assert_in_bf16_band(err_plain, err_round, rel_err(fo.double(), ref), "ANIL head, 2 steps")
    assert err_cached < 1.5 * err_plain  # measured 0.0378 vs 0.0377
    assert rel_err(res[True].double(), res[False].double()) < 0.25 * err_plain  # measured 0.0018


def test_feature_split_views_and_repr():
    model = fastmeta.SineMLP(hidden=5)
    layout = ParamLayout(model, "head")
    split = FeatureSplit(model, layout)
    assert (split.body_name, split.head_name) == ("body", "head")
    theta = layout.flatten(model)
    adapted, shared = layout.split(theta)
    assert torch.equal(split.head_params(adapted)["weight"], model.head.weight)
    assert torch.equal(split.body_params(shared)["2.bias"], model.body[2].bias)
    assert "body" in repr(split)


def test_reduced_evaluator_caches_inside_its_chunks():
    # Under a process group the learner sets a reduction on its evaluator (no wrapper object):
    # over_tasks must still open a feature scope per chunk and hand the task sum to the reduction.
    model = fastmeta.SineMLP(hidden=5).double()
    ev = Evaluator(model, ParamLayout(model, "head"), F.mse_loss, "vmap", feature_cache=True)

    class Sum:
        calls = []

        def mean(self, grad_sum, n):
            self.calls.append(n)
            return grad_sum / (2 * n)  # a recognisable reduction

    ev.reduction = Sum()
    seen = []
    from fastmeta.data import SinusoidTasks

    batch = SinusoidTasks(3, 3, seed=0, dtype=torch.float64).sample(4)
    g, = ev.over_tasks(lambda b: (seen.append(ev.caches_features) or torch.ones(3, dtype=torch.float64),), batch)
    assert seen == [True] and not ev.caches_features
    assert Sum.calls == [4] and torch.equal(g, torch.full((3,), 1 / 8, dtype=torch.float64))