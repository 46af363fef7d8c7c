"""Conv-4 on RGB images and ResNet-12 (tiny widths): shapes, checkpoint configs, torch.fx tracing,
exact MAML meta-gradients against the plain per-task loop (tests/reference.py), every registry
algorithm, and exact ANIL with the feature cache."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.algorithms.registry import FACTORIES, build_algorithm
from fastmeta.models import Conv4, ResNet12, build_model
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch
from reference import flat, maml_meta_grad, rel_err


def rgb_batch(side: int, ways: int = 3, per_class: int = 4, tasks: int = 2) -> TaskBatch:
    x = torch.randn(tasks, ways * per_class, 3, side, side, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(per_class).expand(tasks, -1)
    return TaskBatch(x[:, ::2], y[:, ::2].contiguous(), x[:, 1::2], y[:, 1::2].contiguous(), ways=ways)


def conv4_84():
    return Conv4(3, in_channels=3, hidden=3, image_size=84).double(), 84


def resnet12_tiny():
    return ResNet12(3, in_channels=3, widths=(4, 6, 8, 10)).double(), 16


MODELS = {"conv4-84": conv4_84, "resnet12": resnet12_tiny}


def test_shapes_and_the_standard_layouts():
    x = torch.randn(2, 3, 84, 84)
    conv = Conv4(5, in_channels=3, hidden=32, image_size=84)
    assert conv.head.in_features == 32 * 5 * 5 and conv(x).shape == (2, 5)
    res = ResNet12(5, widths=(4, 6, 8, 10))
    assert res(x).shape == (2, 5) and res(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert [b.conv1.out_channels for b in res.features[:4]] == [4, 6, 8, 10]
    assert ResNet12(5).head.in_features == 640  # MetaOptNet's widths by default
    block = res.features[0]
    # plain modules, in the order the fusion pass pattern-matches: BatchNorm2d -> LeakyReLU(0.1)
    assert all(isinstance(m, nn.BatchNorm2d) and not m.track_running_stats
               for m in (block.bn1, block.bn2, block.bn3, block.shortcut_bn))
    assert isinstance(block.relu3, nn.LeakyReLU) and block.relu3.negative_slope == 0.1
    assert isinstance(block.pool, nn.MaxPool2d) and block.shortcut_conv.kernel_size == (1, 1)
    with pytest.raises(ValueError, match="widths"):
        ResNet12(5, widths=(4, 6, 8))


@pytest.mark.parametrize("name", list(MODELS))
def test_config_rebuilds_the_model_and_fx_traces_it(name):
    model, side = MODELS[name]()
    x = torch.randn(4, 3, side, side, dtype=torch.float64)
    again = build_model(model.config).double()
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x), model(x))
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(traced(x), model(x))
    if name == "resnet12":
        adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
        assert len(adds) == 4  # one residual add per block, visible to the fusion pass


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(MODELS))
def test_maml_matches_the_plain_loop(name, strategy):
    model, side = MODELS[name]()
    batch = rgb_batch(side)
    layout = ParamLayout(model, "all")
    want = maml_meta_grad(model, batch, F.cross_entropy, 0.1, 2, layout.adapted)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.1, 2), strategy=strategy)
    got = learner.meta_gradient(batch).grad
    assert rel_err(got, flat(want, layout)) < 1e-9


def _algo(name: str):
    # Radii and the FD step small enough for a tiny float64 model; the rest: registry defaults.
    return build_algorithm(dict(algo=name, inner_lr=0.1, inner_steps=2, alpha_low=0.01, alpha_up=0.01,
                                delta=1e-4, seed=3))


@pytest.mark.parametrize("algo", sorted(FACTORIES))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_algorithm_gives_a_finite_meta_gradient(name, algo):
    model, side = MODELS[name]()
    if name == "conv4-84":
        model, side = Conv4(3, in_channels=3, hidden=3, image_size=16).double(), 16
    learner = fastmeta.MetaLearner(model, _algo(algo), strategy="loop")
    res = learner.step(rgb_batch(side))
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(model.features[0].weight.grad.abs().sum() if name == "conv4-84"
                 else model.features[0].conv1.weight.grad.abs().sum()) > 0
    assert 0.0 <= res.accuracy <= 1.0


@pytest.mark.parametrize("algo", sorted(FACTORIES))
@pytest.mark.parametrize("name", list(MODELS))
def test_anil_feature_cache_is_exact(name, algo):
    model, side = MODELS[name]()
    if name == "conv4-84":
        model, side = Conv4(3, in_channels=3, hidden=3, image_size=16).double(), 16
    batch = rgb_batch(side)
    grads = {}
    for cache in (True, False):
        learner = fastmeta.MetaLearner(model, _algo(algo), adapt="head", strategy="loop", feature_cache=cache)
        assert learner.layout.adapted == ["head.weight", "head.bias"]
        grads[cache] = learner.meta_gradient(batch).grad
        assert learner.feature_cache is cache
    assert float(grads[False][learner.layout.D:].abs().sum()) > 0  # the body is meta-learned
    assert rel_err(grads[True], grads[False]) < 1e-9


def test_anil_with_resnet12_matches_the_plain_loop():
    model, side = resnet12_tiny()
    batch = rgb_batch(side)
    layout = ParamLayout(model, "head")
    want = maml_meta_grad(model, batch, F.cross_entropy, 0.3, 3, layout.adapted)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.3, 3), adapt="head", strategy="vmap")
    got = learner.meta_gradient(batch).grad
    assert learner.feature_cache
    assert rel_err(got, flat(want, layout)) < 1e-9
