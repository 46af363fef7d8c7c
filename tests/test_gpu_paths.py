"""Learner behaviour that matters on a GPU, checked on the CPU: host syncs per step, what
strategy="auto" times, and full float32 precision inside HF-MAML's finite differences."""
import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import fastmeta
from fastmeta.algorithms import hfmaml as hfmaml_module
from fastmeta.algorithms.base import MetaResult
from fastmeta.data import SinusoidTasks
from fastmeta.evaluation import strategy
from fastmeta.tasks import TaskBatch

# Tensor methods that copy a value to the host: on a GPU each waits for the device to drain.
_HOST_READS = {"__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy"}


class _HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _sine(T=4):
    return SinusoidTasks(5, 5, seed=0).sample(T)


def _classes(T=3, ways=3, n=2):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(ways).repeat(T, n)
    x = torch.randn(T, ways * n, 4, generator=g)
    return TaskBatch(x, y, x + 0.1, y.clone())


@pytest.mark.parametrize("strategy_name", ["loop", "vmap", "bmm"])
@pytest.mark.parametrize("classification", [False, True])
def test_step_reads_the_host_once(strategy_name, classification):
    # Loss, accuracy and the finiteness check used to be three reads (three syncs on a GPU).
    if classification:
        model, batch, loss = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), _classes(), "cross_entropy"
    else:
        model, batch, loss = fastmeta.SineMLP(), _sine(), "mse"
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=0.01), loss_fn=loss, strategy=strategy_name)
    learner.step(batch)  # the first batch of a signature is probed once
    with _HostReads() as mode:
        result = learner.step(batch)
    assert len(mode.reads) == 1, mode.reads
    # Same values as reading each separately.
    res = learner.meta_gradient(batch)
    assert result.loss == float(res.query_loss.mean())
    if classification:
        assert result.accuracy == float(fastmeta.metrics.accuracy(res.query_out, batch.query_y).mean())
    else:
        assert result.accuracy is None


def test_step_keeps_the_finiteness_semantics(monkeypatch):
    model = fastmeta.SineMLP()
    batch = _sine()
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=0.01), loss_fn="mse", strategy="loop")
    P, T = learner.layout.P, batch.num_tasks
    # Finite float32 values whose sum overflows: not an error, and the gradient is written.
    huge = MetaResult(torch.full((P,), 3e38), torch.full((T,), 3e38), None)
    monkeypatch.setattr(learner.algorithm, "meta_grad", lambda *a: huge)
    assert math.isinf(learner.step(batch).loss)
    assert all(bool((p.grad == 3e38).all()) for p in model.parameters())
    # A NaN in the meta-gradient or a query loss: FloatingPointError, .grad untouched.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bad_grad = MetaResult(torch.zeros(P).index_fill_(0, torch.tensor([3]), float("nan")), torch.ones(T), None)
    monkeypatch.setattr(learner.algorithm, "meta_grad", lambda *a: bad_grad)
    with pytest.raises(FloatingPointError, match="meta-gradient is non-finite"):
        learner.step(batch)
    bad_loss = MetaResult(torch.zeros(P), torch.tensor([1.0, float("inf"), 1.0, 1.0]), None)
    monkeypatch.setattr(learner.algorithm, "meta_grad", lambda *a: bad_loss)
    with pytest.raises(FloatingPointError, match=r"non-finite query loss for tasks \[1\]"):
        learner.step(batch)
    assert all(bool((p.grad == 0).all()) for p in model.parameters())


def test_auto_strategy_times_device_work_not_enqueueing(monkeypatch):
    # A fake device: "async" returns at once and leaves 40 ms of queued work, "host" takes 10 ms and
    # leaves nothing. Timing without waiting for the device would pick "async".
    queued = [0.0]

    def synchronize(device):
        time.sleep(queued[0])
        queued[0] = 0.0

    def run(ev):
        if ev.name == "async":
            queued[0] += 0.04
        else:
            time.sleep(0.01)
        return ev.name

    monkeypatch.setattr(strategy, "synchronize", synchronize)
    make = lambda name: SimpleNamespace(name=name, layout=SimpleNamespace(device=torch.device("cpu")))  # noqa: E731
    choice = strategy.time_strategies(["async", "host"], make, run, max_rounds=2, budget_s=10)
    assert choice.strategy == "host", choice.timings
    assert choice.timings["async"] >= 0.04


def test_synchronize_is_a_no_op_on_the_cpu(monkeypatch):
    def fail(*a):
        raise AssertionError("torch.cuda.synchronize called for a CPU model")

    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    strategy.synchronize(torch.device("cpu"))
    learner = fastmeta.MetaLearner(fastmeta.SineMLP(), fastmeta.MAML(inner_lr=0.01), loss_fn="mse")
    learner.step(_sine())
    assert learner.chosen_strategy in ("loop", "vmap", "bmm")


def test_hfmaml_finite_differences_run_in_full_float32(monkeypatch):
    # Reduced-precision float32 (TF32 on CUDA, oneDNN bf16 on the CPU) inside the perturbed
    # gradients is amplified by alpha / (2 delta); the rest of the step keeps the user's choice.
    mkldnn = torch.backends.mkldnn.matmul
    if not hasattr(mkldnn, "fp32_precision"):
        pytest.skip("this torch has no per-backend fp32_precision")
    seen = []
    real = hfmaml_module.per_task_grads

    def recording(*args, **kwargs):
        seen.append(mkldnn.fp32_precision)
        return real(*args, **kwargs)

    monkeypatch.setattr(hfmaml_module, "per_task_grads", recording)
    saved = mkldnn.fp32_precision
    mkldnn.fp32_precision = "bf16"
    try:
        learner = fastmeta.MetaLearner(fastmeta.SineMLP(), fastmeta.HFMAML(inner_lr=0.01, inner_steps=2),
                                       loss_fn="mse", strategy="vmap")
        learner.step(_sine())
        after = mkldnn.fp32_precision
    finally:
        mkldnn.fp32_precision = saved
    # Per call: the query gradient (user's setting), then one finite difference per inner step.
    assert seen == ["bf16", "ieee", "ieee"], seen
    assert after == "bf16"


def test_full_float32_switches_on_cuda_are_restored_even_on_error():
    switches, off = hfmaml_module._tf32_switches("cuda")
    before = [getattr(obj, attr) for obj, attr in switches]
    assert switches, "no TF32 switch found for CUDA"
    with pytest.raises(RuntimeError, match="inside"):
        with hfmaml_module._full_fp32("cuda"):
            assert [getattr(obj, attr) for obj, attr in switches] == [off] * len(switches)
            if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv, "fp32_precision"):
                assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            raise RuntimeError("inside")
    assert [getattr(obj, attr) for obj, attr in switches] == before
