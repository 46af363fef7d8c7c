"""CPU speed modes (``MetaLearner(channels_last=..., bf16=...)``): correctness and accuracy.

* channels_last only changes memory layout, so the meta-gradient must equal the plain per-task
  loop (Sharp-MAML Alg. 2 / Fallah eq. 5; FO: Fallah eq. 8) in float64 to 1e-9, like the default.
* bf16 autocast is approximate by design: the meta-gradient must stay float32 (float32 master
  weights and accumulation), point the same way as the exact one, and differ from it by the
  amount bf16 rounding explains (``BF16_BAND``; first-order MAML must fall outside it) -- and
  training with it must reach the same meta-test accuracy.
"""
import copy

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


def bf16_rounded(model):
    """A float64 copy of ``model`` whose parameters are rounded to bf16 (8 mantissa bits)."""
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model


# The bf16 band. bf16 keeps 8 mantissa bits (unit 2^-8); how far that moves a meta-gradient is the
# problem's condition factor, measured in float64: the exact meta-gradient of the parameters and
# data rounded to bf16 (``err_round``, nothing computed in bf16). A bf16 autocast path rounds at
# every op besides, and measured 0.39-1.29 x err_round (Conv-4 here 0.79, sine MLP 0.39, ANIL head
# 1.29 in test_anil.py); the band is [0.1, 2] x err_round: above, the path is wrong, not merely
# rounded; below, autocast did not act (float32 is at ~1e-6). First-order MAML in float32 (the
# second-order term dropped) measured 3.0 x err_round here, 9.3 x on the sine MLP, 10.4 x on ANIL,
# and each test asserts it falls outside the band, so the check can fail.
BF16_BAND = (0.1, 2.0)


def assert_in_bf16_band(err, err_round, fo_err, what=""):
    lo, hi = BF16_BAND[0] * err_round, BF16_BAND[1] * err_round
    assert lo < err < hi, f"{what}: bf16 error {err:.4f} outside [{lo:.4f}, {hi:.4f}] (rounding alone: {err_round:.4f})"
    assert not lo < fo_err < hi, f"{what}: first-order MAML's error {fo_err:.4f} is inside the band: it cannot fail"


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
    err_round = rel_err(oracle(bf16_rounded(model), conv_batch().to(torch.bfloat16).to(torch.float64), 0.4, 1, False),
                        ref)  # measured 0.333
    model.float()
    fp32 = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop").meta_gradient(batch).grad
    fo = fastmeta.MetaLearner(model, fastmeta.FOMAML(0.4), strategy="loop").meta_gradient(batch).grad
    fo_err = rel_err(fo.double(), ref)  # measured 1.006
    for cl in (False, True):
        res = fastmeta.MetaLearner(model, fastmeta.MAML(0.4), strategy="loop", channels_last=cl, bf16=True
                                   ).meta_gradient(batch)
        assert res.grad.dtype == torch.float32 and res.query_loss.dtype == torch.float32
        err, cos = rel_err(res.grad.double(), ref), float(F.cosine_similarity(res.grad.double(), ref, dim=0))
        # measured 0.262 (cosine 0.965), 0.79 x err_round: bf16 through four batch norms and a
        # second-order graph on random images
        assert_in_bf16_band(err, err_round, fo_err, f"channels_last={cl}")
        assert cos > 0.95, cos
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
    names = [n for n, _ in model.named_parameters()]
    batch64 = SinusoidTasks(seed=0, dtype=torch.float64).sample(4)
    ref = flat(maml_meta_grad(model.double(), batch64, F.mse_loss, 0.01, 1, names), ParamLayout(model))
    rounded = flat(maml_meta_grad(bf16_rounded(model), batch64.to(torch.bfloat16).to(torch.float64), F.mse_loss, 0.01,
                                  1, names), ParamLayout(model))
    err_round = rel_err(rounded, ref)  # measured 0.0165
    model.float()
    batch = SinusoidTasks(seed=0).sample(4)
    fo = fastmeta.MetaLearner(model, fastmeta.FOMAML(0.01), "mse", strategy="vmap").meta_gradient(batch).grad
    fo_err = rel_err(fo.double(), ref)  # measured 0.153 (cosine 0.989: a cosine check alone would pass it)
    for strategy in ("vmap", "auto"):
        got = fastmeta.MetaLearner(model, fastmeta.MAML(0.01), "mse", strategy=strategy, bf16=True
                                   ).meta_gradient(batch).grad
        assert got.dtype == torch.float32
        # measured 0.0065 / 0.0058 (0.39 x err_round), cosine 0.99998
        assert_in_bf16_band(rel_err(got.double(), ref), err_round, fo_err, strategy)
        assert float(F.cosine_similarity(got.double(), ref, dim=0)) > 0.999


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
