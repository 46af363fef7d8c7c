"""Memory-bounded second-order MAML (``MAML(recompute=True)``, fastmeta/algorithms/recompute.py).

The recompute mode rebuilds each inner step's graph during the meta-backward (docs/memory.md):
v_K = grad L(w_K; D'), v_k = (I - alpha H(w_k)) v_{k+1} (Fallah eq. 5 factor by factor, inner steps
of Sharp-MAML eq. 9), shared parameters collecting -alpha H_sw(w_k) v_{k+1} at every step. Its
float64 meta-gradient must equal the plain per-task loop (tests/reference.py) and the default mode
to 1e-9, leave batch-norm running statistics and the RNG exactly where the default mode leaves them,
and hold far fewer saved-tensor bytes (measured with saved_tensors_hooks, deterministic).
"""
import weakref

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.evaluation import Evaluator
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch

from reference import conv_case, flat, maml_meta_grad, mlp_case, rel_err

TOL = 1e-9


def _grad(model, batch, loss_fn, lr, steps, adapt="all", strategy="loop", **kw):
    mode = {k: kw.pop(k) for k in ("recompute", "recompute_chunk") if k in kw}  # the rest: Evaluator's
    layout = ParamLayout(model, adapt)
    ev = Evaluator(model, layout, loss_fn, strategy, **kw)
    return fastmeta.MAML(lr, steps, **mode).meta_grad(ev, layout, layout.flatten(model), batch), layout, ev


CASES = [(mlp_case, "loop"), (mlp_case, "vmap"), (mlp_case, "bmm"), (conv_case, "loop"), (conv_case, "vmap")]


@pytest.mark.parametrize("case,strategy", CASES, ids=[f"{c.__name__[:-5]}-{s}" for c, s in CASES])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_matches_default_and_plain_loop(case, strategy, steps, adapt):
    model, batch, loss_fn, lr = case()
    got, layout, _ = _grad(model, batch, loss_fn, lr, steps, adapt, strategy, recompute=True)
    default, _, _ = _grad(model, batch, loss_fn, lr, steps, adapt, strategy)
    want = flat(maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted), layout)
    assert rel_err(got.grad, want) < TOL
    assert rel_err(got.grad, default.grad) < TOL
    assert torch.allclose(got.query_loss, default.query_loss, rtol=1e-12, atol=0)
    assert got.query_out.shape == default.query_out.shape


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_guard_hessian_terms_are_large(adapt):
    # Guards the comparisons above: a recompute chain that dropped H_ww v (or, for ANIL, the mixed
    # H_sw v terms of the shared body) would be first-order MAML (Fallah eq. 8), and that is far
    # from second order here, in the adapted block and in the shared block alike.
    model, batch, loss_fn, lr = conv_case()
    so, layout, _ = _grad(model, batch, loss_fn, lr, 3, adapt, recompute=True)
    fo = flat(maml_meta_grad(model, batch, loss_fn, lr, 3, layout.adapted, first_order=True), layout)
    D = layout.D
    assert rel_err(fo[:D], so.grad[:D]) > 1e-3
    if adapt == "head":
        assert rel_err(fo[D:], so.grad[D:]) > 1e-3


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_anil_feature_cache(strategy):
    # With the cache the support features' body graph is shared by every recomputed step: the
    # mixed terms must go back through it once, at the end (a second traversal would raise).
    model, batch, loss_fn, lr = conv_case()
    got, layout, ev = _grad(model, batch, loss_fn, lr, 3, "head", strategy, feature_cache=True, recompute=True)
    assert ev.features.enabled and ev.features.verified
    want = flat(maml_meta_grad(model, batch, loss_fn, lr, 3, layout.adapted), layout)
    assert rel_err(got.grad, want) < TOL


@pytest.mark.parametrize("mode", ["fused", "channels_last"])
def test_cpu_speed_modes(mode):
    # The recomputed steps run under the evaluator's speed modes (the fused op's double backward,
    # NHWC copies) and agree with the default mode to float32 round-off (~1e-6); a wrong chain is off
    # by > 1e-3 (test_guard_hessian_terms_are_large).
    model, batch, loss_fn, lr = conv_case(torch.float32)
    got, _, _ = _grad(model, batch, loss_fn, lr, 3, recompute=True, **{mode: True})
    default, _, _ = _grad(model, batch, loss_fn, lr, 3, **{mode: True})
    assert rel_err(got.grad, default.grad) < 1e-5


@pytest.mark.parametrize("strategy,chunk", [("vmap", 2), ("bmm", 1), ("loop", 1)])
def test_chunks(strategy, chunk):
    model, batch, loss_fn, lr = mlp_case()  # 3 tasks: chunks of 2 leave an uneven last chunk
    got, layout, _ = _grad(model, batch, loss_fn, lr, 2, "head", strategy, recompute=True, recompute_chunk=chunk)
    want = flat(maml_meta_grad(model, batch, loss_fn, lr, 2, layout.adapted), layout)
    assert rel_err(got.grad, want) < TOL
    assert got.query_loss.shape == (3,)


def test_distributed_reduction_is_used():
    class Halve:  # stands in for TaskReduction: mean over "all processes" = local sum / (2 n)
        def mean(self, total, n):
            return total / (2 * n)

    model, batch, loss_fn, lr = mlp_case()
    layout = ParamLayout(model)
    ev = Evaluator(model, layout, loss_fn, "vmap")
    plain = fastmeta.MAML(lr, 2, recompute=True).meta_grad(ev, layout, layout.flatten(model), batch).grad
    ev.reduction = Halve()
    halved = fastmeta.MAML(lr, 2, recompute=True).meta_grad(ev, layout, layout.flatten(model), batch).grad
    assert rel_err(halved, plain / 2) < 1e-15


# --------------------------------------------------------------------------- buffers and the RNG
class _BNNet(nn.Module):
    """Conv + batch norm WITH running statistics (train mode) + dropout, then a linear head."""

    def __init__(self, p_drop=0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Dropout(p_drop))
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _bn_case(p_drop=0.0):
    torch.manual_seed(1)
    model = _BNNet(p_drop).double()
    x = torch.randn(2, 12, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(4).expand(2, -1)
    return model, TaskBatch(x[:, ::2], y[:, ::2].contiguous(), x[:, 1::2], y[:, 1::2].contiguous(), ways=3)


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def _load_buffers(model, saved):
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(saved[n])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
def test_running_statistics_as_default(strategy, steps):
    model, batch = _bn_case()
    start = _buffers(model)
    default, _, _ = _grad(model, batch, nn.functional.cross_entropy, 0.3, steps, strategy=strategy)
    after_default = _buffers(model)
    _load_buffers(model, start)
    got, _, _ = _grad(model, batch, nn.functional.cross_entropy, 0.3, steps, strategy=strategy, recompute=True)
    for n, b in model.named_buffers():
        assert torch.equal(b, after_default[n]), n
    assert rel_err(got.grad, default.grad) < TOL
    if strategy == "loop":  # guard: the loop strategy does move them (K+1 forwards per task)
        assert int(after_default["body.1.num_batches_tracked"]) == 2 * (steps + 1)
        assert not torch.equal(after_default["body.1.running_mean"], start["body.1.running_mean"])


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_dropout_masks_replayed(strategy):
    model, batch = _bn_case(p_drop=0.3)
    start = _buffers(model)
    runs = []
    for recompute in (False, True, False):
        _load_buffers(model, start)
        torch.manual_seed(7 if len(runs) < 2 else 8)
        g = _grad(model, batch, nn.functional.cross_entropy, 0.3, 3, strategy=strategy, recompute=recompute)[0].grad
        runs.append((g, torch.rand(4)))  # the stream continues where the default mode leaves it
    (default, r_default), (got, r_got), (other_seed, _) = runs
    assert rel_err(got, default) < TOL
    assert torch.equal(r_got, r_default)
    assert rel_err(other_seed, default) > 1e-3  # guard: the masks matter at this tolerance
    if strategy == "loop":  # the plain loop draws its masks in the same order as the loop strategy
        _load_buffers(model, start)
        torch.manual_seed(7)
        layout = ParamLayout(model)
        want = flat(maml_meta_grad(model, batch, nn.functional.cross_entropy, 0.3, 3, layout.adapted), layout)
        assert rel_err(got, want) < TOL


# --------------------------------------------------------------------------- memory
class SavedBytes:
    """Bytes of the distinct storages autograd holds as saved tensors, now and at peak.

    Deterministic (no allocator or RSS involved): ``pack`` counts a storage when the first saved
    tensor on it appears, a finalizer on the packed box releases it when autograd drops the last.
    """

    def __init__(self):
        self.live, self.current, self.peak = {}, 0, 0

    def pack(self, t):
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes(), str(t.device))
        if self.live.get(key, 0) == 0:
            self.current += key[1]
            self.peak = max(self.peak, self.current)
        self.live[key] = self.live.get(key, 0) + 1
        box = _Box(t)
        weakref.finalize(box, self._release, key)
        return box

    def _release(self, key):
        self.live[key] -= 1
        if self.live[key] == 0:
            del self.live[key]
            self.current -= key[1]

    @staticmethod
    def unpack(box):
        return box.t


class _Box:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _peak_saved(strategy, steps, recompute):
    model, batch, loss_fn, lr = conv_case()
    counter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        _grad(model, batch, loss_fn, lr, steps, strategy=strategy, recompute=recompute)
    assert counter.current == 0  # every graph was freed
    return counter.peak


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_saved_tensor_peak_is_bounded(strategy):
    default5 = _peak_saved(strategy, 5, False)
    recompute5 = _peak_saved(strategy, 5, True)
    recompute1 = _peak_saved(strategy, 1, True)
    assert recompute5 < 0.5 * default5
    assert recompute5 <= 1.1 * recompute1  # one step's graph at a time: flat in the inner steps
    assert default5 > 2 * _peak_saved(strategy, 1, False)  # guard: the default does grow with K


# --------------------------------------------------------------------------- API
def test_learner_with_recompute_and_auto_feature_cache():
    model, batch, loss_fn, lr = conv_case()
    want = maml_meta_grad(model, batch, loss_fn, lr, 2, ParamLayout(model, "head").adapted)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(lr, 2, recompute=True), adapt="head", strategy="loop")
    learner.step(batch)
    assert learner.feature_cache
    got = {n: p.grad for n, p in model.named_parameters()}
    # One relative error over all parameters: a conv bias before batch norm has a round-off gradient.
    assert rel_err(flat(got, learner.layout), flat(want, learner.layout)) < TOL


@pytest.mark.parametrize("kw,name", [(dict(recompute="yes"), "recompute"),
                                     (dict(recompute=True, first_order=True), "recompute"),
                                     (dict(recompute=True, recompute_chunk=0), "recompute_chunk"),
                                     (dict(recompute=True, recompute_chunk=True), "recompute_chunk"),
                                     (dict(recompute_chunk=2), "recompute_chunk")])
def test_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        fastmeta.MAML(0.1, 2, **kw)


def test_registry_refuses_recompute_for_other_algorithms():
    from fastmeta.algorithms.registry import build_algorithm

    with pytest.raises(ValueError, match="^recompute:"):
        build_algorithm(dict(algo="sharp-low", inner_lr=0.1, inner_steps=1, recompute=True))


def test_refuses_an_inner_optimizer():
    # The reverse chain is plain SGD's (w_{k+1} = w_k - alpha g_k): momentum/Adam are refused.
    with pytest.raises(ValueError, match="^(inner_optimizer|recompute):"):
        fastmeta.MAML(0.1, 2, recompute=True, inner_optimizer="adam")
