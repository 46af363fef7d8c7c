"""What Nsight Systems and torch.profiler see of a MetaLearner: one NVTX range per phase, named by
the phase alone in the domain "fastmeta", balanced even when a step raises; torch.profiler labels
"fastmeta/<phase>"."""
import pytest
import torch

import fastmeta
from fastmeta import profiling
from fastmeta.data import SinusoidTasks


class _Domain:
    """Stands in for the NVTX domain: records the pushed ranges and the open stack."""

    def __init__(self):
        self.pushed, self.stack = [], []

    def get_event_attributes(self, message=None, **_):
        return message

    def push_range(self, attributes):
        self.pushed.append(attributes)
        self.stack.append(attributes)

    def pop_range(self):
        self.stack.pop()


@pytest.fixture
def nvtx_domain(monkeypatch):
    domain = _Domain()
    monkeypatch.setattr(profiling, "_domain", domain)
    monkeypatch.setattr(profiling, "_attributes", {})
    return domain


def _sine(T=4):
    return SinusoidTasks(5, 5, seed=0).sample(T)


def test_learner_phases_are_nvtx_ranges_in_the_fastmeta_domain(nvtx_domain):
    learner = fastmeta.MetaLearner(fastmeta.SineMLP(), fastmeta.MAML(inner_lr=0.01), loss_fn="mse")
    batch = _sine()
    learner.step(batch)  # the first batch also times the strategies
    assert {"step", "meta_gradient", "strategy", "inner", "outer"} <= set(nvtx_domain.pushed), nvtx_domain.pushed
    assert nvtx_domain.pushed[0] == "step" and nvtx_domain.pushed[1] == "meta_gradient"
    learner.meta_gradient(batch)
    learner.evaluate(batch)
    learner.adapt(batch.support_x[0], batch.support_y[0])
    assert {"evaluate", "adapt"} <= set(nvtx_domain.pushed)
    # The domain is named once, by NVTX: a label repeating it shows as "fastmeta: fastmeta/inner".
    assert not [name for name in nvtx_domain.pushed if "/" in name or "fastmeta" in name]
    assert nvtx_domain.stack == []
    fastmeta.MetaLearner(fastmeta.SineMLP(), fastmeta.HFMAML(inner_lr=0.01), loss_fn="mse", strategy="vmap").step(batch)
    sharp = fastmeta.SharpMAML(inner_lr=0.01, alpha_low=0.05, alpha_up=0.05)
    fastmeta.MetaLearner(fastmeta.SineMLP(), sharp, loss_fn="mse", strategy="vmap").step(batch)
    assert {"hvp", "perturb"} <= set(nvtx_domain.pushed) and nvtx_domain.stack == []


def test_ranges_are_closed_when_a_step_raises(nvtx_domain):
    model = fastmeta.SineMLP()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=0.01), loss_fn="mse", strategy="loop")
    with pytest.raises(FloatingPointError):
        learner.step(_sine())
    assert "step" in nvtx_domain.pushed and nvtx_domain.stack == []


def test_torch_profiler_labels():
    learner = fastmeta.MetaLearner(fastmeta.SineMLP(), fastmeta.MAML(inner_lr=0.01), loss_fn="mse", strategy="bmm")
    batch = _sine()
    learner.step(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        learner.step(batch)
    names = {e.name for e in prof.events()}
    assert {"fastmeta/step", "fastmeta/meta_gradient", "fastmeta/inner", "fastmeta/outer"} <= names


def test_nvtx_package_is_used_when_installed():
    pytest.importorskip("nvtx")
    assert profiling.nvtx_available()
    with profiling.annotate("step") as a:  # a real push/pop with no profiler attached
        assert a.label == "fastmeta/step"
