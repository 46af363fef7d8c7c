"""Bad input to the compatibility layers: errors name the argument."""
import pytest
import torch
import torch.nn.functional as F

import fastmeta.compat.higher as compat_higher
import fastmeta.compat.learn2learn as l2l
from compat_cases import make_model, make_tasks


@pytest.fixture
def mlp():
    return make_model("mlp"), make_tasks("mlp")[0]


@pytest.mark.parametrize("lr", ["0.1", None, True, [0.1], torch.ones(3)])
@pytest.mark.parametrize("algo", ["MAML", "MetaSGD"])
def test_lr_type(mlp, algo, lr):
    with pytest.raises(TypeError, match="lr"):
        getattr(l2l.algorithms, algo)(mlp[0], lr=lr)


def test_model_type():
    with pytest.raises(TypeError, match="model"):
        l2l.algorithms.MAML("not a module", lr=0.1)
    with pytest.raises(TypeError, match="model"):
        with compat_higher.innerloop_ctx(lambda x: x, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)):
            pass


def test_metasgd_lrs_shape(mlp):
    with pytest.raises(ValueError, match="lrs"):
        l2l.algorithms.MetaSGD(mlp[0], lrs=[torch.ones(2)])


@pytest.mark.parametrize("algo", ["MAML", "MetaSGD"])
def test_adapt_loss(mlp, algo):
    model, (sx, sy, _, _) = mlp
    learner = getattr(l2l.algorithms, algo)(model, lr=0.1).clone()
    with pytest.raises(ValueError, match="loss"):
        learner.adapt(F.cross_entropy(learner(sx), sy, reduction="none"))
    with pytest.raises(ValueError, match="loss"):
        learner.adapt(F.cross_entropy(learner(sx), sy).detach())
    with pytest.raises(TypeError, match="loss"):
        learner.adapt(1.0)


@pytest.mark.parametrize("opt", [torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad])
def test_unsupported_optimizer(mlp, opt):
    model = mlp[0]
    with pytest.raises(TypeError, match=r"opt: .*supported: torch\.optim\.SGD, torch\.optim\.Adam"):
        with compat_higher.innerloop_ctx(model, opt(model.parameters())):
            pass
    with pytest.raises(TypeError, match="opt"):
        with compat_higher.innerloop_ctx(model, "sgd"):
            pass


@pytest.mark.parametrize("opt", [lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True),
                                 lambda ps: torch.optim.Adam(ps, lr=0.1, maximize=True)])
def test_unsupported_setting(mlp, opt):
    # higher ignores maximize=True silently (it would descend); refusing is the honest answer.
    model = mlp[0]
    with pytest.raises(ValueError, match="opt: maximize"):
        with compat_higher.innerloop_ctx(model, opt(model.parameters())):
            pass


def test_override(mlp):
    model = mlp[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="override: .*learning_rate"):
        with compat_higher.innerloop_ctx(model, opt, override={"learning_rate": [0.1]}):
            pass
    with pytest.raises(ValueError, match="override: 'lr' has 2 values for 1 parameter groups"):
        with compat_higher.innerloop_ctx(model, opt, override={"lr": [0.1, 0.2]}):
            pass
    with pytest.raises(TypeError, match="override"):
        with compat_higher.innerloop_ctx(model, opt, override=[("lr", 0.1)]):
            pass


def test_step_loss_and_params(mlp):
    model, (sx, sy, _, _) = mlp
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with compat_higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        with pytest.raises(ValueError, match="loss"):
            diffopt.step(F.cross_entropy(fmodel(sx), sy, reduction="none"))
        with pytest.raises(ValueError, match="params"):
            fmodel(sx, params=[torch.zeros(1)])
    with pytest.raises(ValueError, match="opt"):
        other = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
        with compat_higher.innerloop_ctx(model, other):
            pass
