"""fastmeta.compat.learn2learn against learn2learn's documented behaviour, written out as a plain
loop (the oracle): per task, fast weights start at the model's parameters, each ``adapt`` is
``p - lr * grad`` (``create_graph`` unless first order; Meta-SGD: ``p - lrs_i * grad``
elementwise), and the query losses' ``backward()`` sums meta-gradients into the original
parameters (and Meta-SGD's ``lrs``). Buffers are the model's own (``clone_module`` shares
buffers that do not require grad), so BatchNorm's running statistics move identically."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import fastmeta.compat.learn2learn as l2l
from compat_cases import grads_of, make_model, make_tasks, rel_err

TOL = 1e-10
LR = 0.1


def oracle(kind, steps, first_order, meta_sgd=False, seed=100):
    """learn2learn's semantics as a plain loop; returns (grads of params [+ lrs], buffers, logits)."""
    model = make_model(kind)
    params = dict(model.named_parameters())
    lrs = [torch.full_like(p, LR, requires_grad=True) for p in params.values()] if meta_sgd else None
    total = None
    logits = []
    for t, (sx, sy, qx, qy) in enumerate(make_tasks(kind)):
        torch.manual_seed(seed + t)
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (sx,)), sy)
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: w - (lrs[i] if meta_sgd else LR) * gi for i, ((n, w), gi) in enumerate(zip(fast.items(), g))}
        out = functional_call(model, fast, (qx,))
        logits.append(out.detach())
        wrt = list(params.values()) + (lrs if meta_sgd else [])
        g = torch.autograd.grad(F.cross_entropy(out, qy), wrt)
        total = list(g) if total is None else [a + b for a, b in zip(total, g)]
    return total, [b.clone() for b in model.buffers()], logits


def compat_loop(kind, steps, first_order, meta_sgd=False, nested=False, seed=100):
    """The canonical learn2learn loop, with the compat import."""
    model = make_model(kind)
    if meta_sgd:
        maml = l2l.algorithms.MetaSGD(model, lr=LR, first_order=first_order)
    else:
        maml = l2l.algorithms.MAML(model, lr=LR, first_order=first_order)
    logits = []
    for t, (sx, sy, qx, qy) in enumerate(make_tasks(kind)):
        torch.manual_seed(seed + t)
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
            if nested:
                learner = learner.clone()  # clones of clones keep the graph
        out = learner(qx)
        logits.append(out.detach())
        F.cross_entropy(out, qy).backward()
    return grads_of(maml), [b.clone() for b in model.buffers()], logits


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
@pytest.mark.parametrize("algo", ["maml", "metasgd"])
def test_matches_documented_loop(algo, kind, steps, first_order):
    meta_sgd = algo == "metasgd"
    ref_g, ref_b, ref_out = oracle(kind, steps, first_order, meta_sgd)
    g, b, out = compat_loop(kind, steps, first_order, meta_sgd)
    assert len(g) == len(ref_g)  # MetaSGD: maml.parameters() includes the lrs, which get gradients
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(g, ref_g) <= TOL
    for x, y in zip(b, ref_b):  # the model's running statistics moved the same way
        assert torch.allclose(x, y, rtol=1e-12, atol=0)
    # Guard: first and second order differ here, so the order is actually tested.
    other, _, _ = oracle(kind, steps, not first_order, meta_sgd)
    assert rel_err(other, ref_g) > 1e-4


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_clones_of_clones(kind):
    ref_g, _, _ = oracle(kind, 3, False)
    g, _, _ = compat_loop(kind, 3, False, nested=True)
    assert rel_err(g, ref_g) <= TOL


def test_clone_parameters_and_modes():
    model = make_model("mlp")
    maml = l2l.algorithms.MAML(model, lr=LR)
    learner = maml.clone()
    names = [n for n, _ in maml.named_parameters()]
    assert names == ["module." + n for n, _ in model.named_parameters()]
    assert [n for n, _ in learner.named_parameters()] == names
    assert all(a is b for a, b in zip(learner.parameters(), model.parameters()))  # before adapt: the originals
    sx, sy, qx, _ = make_tasks("mlp")[0]
    learner.adapt(F.cross_entropy(learner(sx), sy))
    fast = list(learner.parameters())
    assert all(f.grad_fn is not None for f in fast) and maml.module is model and maml.lr == LR
    learner.eval()  # the clone's own mode, as learn2learn's clone_module copies each __dict__
    assert model.training and not learner.training
    before = [b.clone() for b in model.buffers()]
    learner(qx)  # eval: running statistics are read, not updated
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert model.training
    model.train()
    learner.train()
    learner(qx)  # train mode: BatchNorm updates the shared running statistics, as in learn2learn
    assert not torch.equal(before[1], model.bn.running_mean)
    with pytest.raises(AttributeError, match="l2"):
        learner.l2  # a submodule of a clone would silently use the meta-parameters
    assert maml.l2 is model.l2  # on the meta-model, attributes forward to the module (BaseLearner)


def test_allow_nograd_and_allow_unused():
    model = make_model("mlp")
    model.l1.bias.requires_grad_(False)
    sx, sy, _, _ = make_tasks("mlp")[0]
    with pytest.raises(ValueError, match="allow_nograd"):
        learner = l2l.algorithms.MAML(model, lr=LR).clone()
        learner.adapt(F.cross_entropy(learner(sx), sy))
    learner = l2l.algorithms.MAML(model, lr=LR, allow_nograd=True).clone()
    learner.adapt(F.cross_entropy(learner(sx), sy))
    fast = dict(learner.named_parameters())
    assert fast["module.l1.bias"] is model.l1.bias and fast["module.l1.weight"] is not model.l1.weight

    model = make_model("mlp")
    learner = l2l.algorithms.MAML(model, lr=LR).clone()
    loss = dict(learner.named_parameters())["module.l2.bias"].pow(2).sum()  # uses one parameter only
    with pytest.raises(RuntimeError, match="allow_unused"):
        learner.adapt(loss)
    learner = l2l.algorithms.MAML(model, lr=LR, allow_unused=True).clone()
    loss = dict(learner.named_parameters())["module.l2.bias"].pow(2).sum()
    learner.adapt(loss)
    fast = dict(learner.named_parameters())
    assert fast["module.l1.weight"] is model.l1.weight  # unused: unchanged
    assert torch.allclose(fast["module.l2.bias"], model.l2.bias * (1 - 2 * LR), rtol=1e-12)
