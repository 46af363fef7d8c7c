"""CPU speed modes (``MetaLearner(channels_last=..., bf16=...)``): correctness and accuracy.

* channels_last only changes memory layout, so the meta-gradient must equal the plain per-task
  loop (Sharp-MAML Alg. 2 / Fallah eq. 5; FO: Fallah eq. 8) in float64 to 1e-9, like the default.
* bf16 autocast is approximate by design: the meta-gradient must stay float32 (float32 master
  weights and accumulation), point the same way as the exact one, and differ from it by the
  amount bf16 rounding explains -- and training with it must reach the same meta-test accuracy.
"""
import pytest
import torch
import torch.nn.functional as F

import fastmeta
from fastmeta.evaluation import ChannelsLast, Evaluator
from fastmeta.data import SinusoidTasks
from fastmeta.models import Conv4, SineMLP
from fastmeta.params import ParamLayout
from fastmeta.tasks import TaskBatch
from reference import flat, maml_meta_grad, rel_err


def conv_batch(T=2, ways=3, shots=1, queries=2, size=28, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(T, ways * shots, 1, size, size, generator=g, dtype=torch.float64).to(dtype)
    qx = torch.rand(T, ways * queries, 1, size, size, generator=g, dtype=torch.float64).to(dtype)
    lab = torch.arange(ways)
    return TaskBatch(sx, lab.repeat_interleave(shots).expand(T, -1), qx, lab.repeat_interleave(queries).expand(T, -1),
                     ways=ways)


def oracle(model, batch, inner_lr, steps, first_order, adapt="all"):
    layout = ParamLayout(model, adapt)
    return flat(maml_meta_grad(model, batch, F.cross_entropy, inner_lr, steps, layout.adapted, first_order), layout)


def test_channels_last_mode_converts_convolutions():
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)
    assert not F.conv2d(x, w, padding=1).is_contiguous(memory_format=torch.channels_last)
    with ChannelsLast():
        out = F.conv2d(x, w, padding=1)
    # the output follows the input's memory format: NHWC means the mode converted the call
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, F.conv2d(x, w, padding=1))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps,adapt", [(1, "all"), (2, "all"), (1, "head")])
def test_channels_last_meta_gradient_is_exact(first_order, steps, adapt):
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    batch = conv_batch()
    algo = fastmeta.MAML(0.4, steps, first_order=first_order)
    learner = fastmeta.MetaLearner(model, algo, adapt=adapt, strategy="loop", channels_last=True)
    got = learner.meta_gradient(batch).grad
    assert rel_err(got, oracle(model, batch, 0.4, steps, first_order, adapt)) < 1e-9


def test_bf16_meta_gradient_is_float32_and_close():
    torch.manual_seed(0)
    model = Conv4(3, hidden=16)
    batch = conv_batch(dtype=torch.float32)
    ref = oracle(model.double(), conv_batch(), 0.4, 1, False)
    model.float()
    fp32 = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop").meta_gradient(batch).grad
    for cl in (False, True):
        res = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop", channels_last=cl, bf16=True
                                   ).meta_gradient(batch)
        assert res.grad.dtype == torch.float32 and res.query_loss.dtype == torch.float32
        err, cos = rel_err(res.grad.double(), ref), float(F.cosine_similarity(res.grad.double(), ref, dim=0))
        # bf16 rounding (8 mantissa bits) through four batch norms and a second-order graph:
        # measured 0.26 relative (cosine 0.965) on this random-image case, 0.14 (cosine 0.99)
        # on full-size Omniglot; the float32 path is at ~1e-6. The lower bound fails if autocast
        # were a no-op; the upper bounds if the update or gradient were wrong, not merely rounded.
        assert 1e-3 < err < 0.5 and cos > 0.95, (err, cos)
    assert rel_err(fp32.double(), ref) < 1e-4


def test_bf16_step_keeps_float32_master_weights():
    torch.manual_seed(0)
    model = Conv4(3, hidden=8)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop", channels_last=True, bf16=True)
    r = learner.step(conv_batch(dtype=torch.float32))
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert r.accuracy is not None and torch.isfinite(torch.tensor(r.loss))


def test_bf16_under_vmap_and_auto():
    torch.manual_seed(0)
    model = SineMLP()
    batch = SinusoidTasks(seed=0).sample(4)
    ref = flat(maml_meta_grad(model.double(), SinusoidTasks(seed=0, dtype=torch.float64).sample(4),
                              F.mse_loss, 0.01, 1, [n for n, _ in model.named_parameters()]), ParamLayout(model))
    model.float()
    for strategy in ("vmap", "auto"):
        got = fastmeta.MetaLearner(model, fastmeta.MAML(0.01), "mse", strategy=strategy, bf16=True
                                   ).meta_gradient(batch).grad
        assert got.dtype == torch.float32
        assert float(F.cosine_similarity(got.double(), ref, dim=0)) > 0.98


def test_speed_mode_bad_input():
    with pytest.raises(ValueError, match="bf16"):
        fastmeta.MetaLearner(Conv4(3, hidden=8).double(), fastmeta.MAML(0.4), bf16=True)
    with pytest.raises(ValueError, match="channels_last"):
        fastmeta.MetaLearner(Conv4(3, hidden=8), fastmeta.MAML(0.4), channels_last="yes")
    model = Conv4(3, hidden=8)
    with pytest.raises(ValueError, match="bf16"):
        Evaluator(model, ParamLayout(model), F.cross_entropy, "loop", bf16=1)


@pytest.mark.slow
def test_bf16_omniglot_accuracy_matches_float32(omniglot_dir):
    """Same seed, same tasks, same steps: bf16+channels_last reaches float32's meta-test accuracy
    on held-out alphabets (paired over the same 100 test tasks). A short, small run (hidden 32,
    5 queries, 60 steps) keeps it CI-sized; ``fastmeta bench --full`` runs the full-size check."""
    from fastmeta.data import Omniglot, OmniglotTasks, split_alphabets

    data = Omniglot(omniglot_dir)
    train, _, test = split_alphabets(data.alphabets, n_test=max(1, len(data.alphabets) // 4))
    accs = {}
    for mode in ({}, dict(channels_last=True, bf16=True)):
        torch.manual_seed(0)
        model = Conv4(5, hidden=32)
        learner = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop", **mode)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        tasks = OmniglotTasks(data, train, ways=5, shots=1, queries=5, seed=0)
        for _ in range(60):
            opt.zero_grad()
            learner.step(tasks.sample(4))
            opt.step()
        r = learner.evaluate(OmniglotTasks(data, test, ways=5, shots=1, queries=5, seed=1).sample(100))
        accs[bool(mode)] = r.per_task_accuracy
    fp32, bf16 = accs[False], accs[True]
    assert fp32.mean() > 0.4, fp32.mean()  # it learned something (chance is 0.2)
    diff = (bf16 - fp32)
    # paired difference over the same tasks; 5 points is ~2x its 95% CI half-width at this size
    assert abs(float(diff.mean())) < 0.05, (float(fp32.mean()), float(bf16.mean()))
