"""Sharp-MAML low / up / both (Abbas et al. 2022: Alg. 4 eqs. 11, 22-23; Alg. 3 eqs. 20-21; Alg. 1
eqs. 11-15) and ESAM inside the inner SAM step (sec. 5.4: SWP, SDS), against the plain per-task loop
(tests/reference.py), float64; plus the registry / CLI names."""
import argparse

import pytest
import torch

import fastmeta
from fastmeta.algorithms.registry import FACTORIES, add_algorithm_args, build_algorithm
from fastmeta.evaluation import Evaluator

from reference import conv_case, flat, maml_meta_grad, mlp_case, rel_err, run, sharp_maml_meta_grad


VARIANTS = {"low": (0.1, 0.0), "up": (0.0, 0.1), "both": (0.1, 0.1)}


CASES = [(mlp_case, 2, a, s) for a in ("all", "head") for s in ("vmap", "loop")]
CASES += [(conv_case, 2, a, s) for a in ("all", "head") for s in ("vmap", "loop")] + [(conv_case, 1, "all", "loop")]


@pytest.mark.parametrize("case,steps,adapt,strategy", CASES,
                         ids=[f"{c.__name__[:4]}-{k}step-{a}-{s}" for c, k, a, s in CASES])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_plain_loop(case, steps, adapt, strategy, variant):
    model, batch, loss_fn, lr = case()
    lo, up = VARIANTS[variant]
    res, layout = run(fastmeta.SharpMAML(lr, steps, alpha_low=lo, alpha_up=up), model, batch, loss_fn, adapt, strategy)
    want = flat(sharp_maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted, lo, up), layout)
    assert rel_err(res.grad, want) < 1e-9
    maml = flat(maml_meta_grad(model, batch, loss_fn, lr, steps, layout.adapted), layout)
    assert rel_err(res.grad, maml) > 1e-4  # the perturbation really changed something


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_first_order_matches_plain_loop(variant):
    model, batch, loss_fn, lr = conv_case()
    lo, up = VARIANTS[variant]
    res, layout = run(fastmeta.SharpMAML(lr, 2, lo, up, first_order=True), model, batch, loss_fn)
    want = flat(sharp_maml_meta_grad(model, batch, loss_fn, lr, 2, layout.adapted, lo, up, first_order=True), layout)
    assert rel_err(res.grad, want) < 1e-9


@pytest.mark.parametrize("case", [mlp_case, conv_case], ids=["mlp", "conv4_bn"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_zero_radii_is_maml_bit_for_bit(case, strategy, adapt):
    model, batch, loss_fn, lr = case()
    sharp, layout = run(fastmeta.SharpMAML(lr, 2), model, batch, loss_fn, adapt, strategy)
    maml, _ = run(fastmeta.MAML(lr, 2), model, batch, loss_fn, adapt, strategy)
    assert torch.equal(sharp.grad, maml.grad) and torch.equal(sharp.query_loss, maml.query_loss)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_esam_identities_sds_1_and_swp_1_are_plain_sam(strategy):
    model, batch, loss_fn, lr = conv_case()
    plain, _ = run(fastmeta.SharpMAML(lr, 2, alpha_low=0.1), model, batch, loss_fn, strategy=strategy)
    sds, _ = run(fastmeta.SharpMAML(lr, 2, alpha_low=0.1, sds_ratio=1.0), model, batch, loss_fn, strategy=strategy)
    swp, _ = run(fastmeta.SharpMAML(lr, 2, alpha_low=0.1, swp_keep_prob=1.0), model, batch, loss_fn, strategy=strategy)
    assert torch.equal(sds.grad, plain.grad)
    assert torch.equal(swp.grad, plain.grad)


def _mask_dicts(masks, layout):
    # [K, T, D] rows -> [K][T] {name: mask}, for the oracle.
    out = []
    for k in range(masks.shape[0]):
        out.append([{s.name: masks[k, t, s.offset:s.offset + s.numel].view(s.shape)
                     for s in layout.slots[:len(layout.adapted)]} for t in range(masks.shape[1])])
    return out


@pytest.mark.parametrize("case", [mlp_case, conv_case], ids=["mlp", "conv4_bn"])
@pytest.mark.parametrize("adapt,strategy", [("all", "vmap"), ("head", "loop")])
@pytest.mark.parametrize("esam", ["swp", "sds", "swp+sds"])
def test_esam_matches_plain_loop(case, strategy, adapt, esam):
    model, batch, loss_fn, lr = case()
    kw = {}
    if "swp" in esam:
        kw["swp_keep_prob"] = 0.5
    if "sds" in esam:
        kw["sds_ratio"] = 0.5
    algo = fastmeta.SharpMAML(lr, 2, alpha_low=0.1, seed=3, **kw)
    res, layout = run(algo, model, batch, loss_fn, adapt, strategy)
    masks = res.extras.get("swp_masks") if res.extras else None
    if "swp" in esam:
        assert masks.shape == (2, 3, layout.D)
        frac = float(masks.mean())
        assert 0.3 < frac < 0.7 and set(masks.unique().tolist()) <= {0.0, 1.0}
    want = flat(sharp_maml_meta_grad(model, batch, loss_fn, lr, 2, layout.adapted, 0.1, 0.0,
                                     swp_masks=None if masks is None else _mask_dicts(masks, layout),
                                     sds_ratio=kw.get("sds_ratio")), layout)
    assert rel_err(res.grad, want) < 1e-9
    plain = run(fastmeta.SharpMAML(lr, 2, alpha_low=0.1), model, batch, loss_fn, adapt, strategy)[0]
    assert rel_err(res.grad, plain.grad) > 1e-6


def test_swp_masks_same_for_both_strategies_and_seeded():
    model, batch, loss_fn, lr = mlp_case()
    a = run(fastmeta.SharpMAML(lr, 1, 0.1, swp_keep_prob=0.5, seed=7), model, batch, loss_fn, strategy="vmap")[0]
    b = run(fastmeta.SharpMAML(lr, 1, 0.1, swp_keep_prob=0.5, seed=7), model, batch, loss_fn, strategy="loop")[0]
    assert torch.equal(a.extras["swp_masks"], b.extras["swp_masks"])
    assert rel_err(a.grad, b.grad) < 1e-12


def test_sds_backward_runs_on_selected_samples_only(monkeypatch):
    model, batch, loss_fn, lr = conv_case()  # N_s = 6 support samples per task
    sizes = []
    orig = Evaluator.grads

    def spy(self, rows, shared, x, y, create_graph=False):
        sizes.append((x.shape[1], create_graph))
        return orig(self, rows, shared, x, y, create_graph)

    monkeypatch.setattr(Evaluator, "grads", spy)
    run(fastmeta.SharpMAML(lr, 1, alpha_low=0.1, sds_ratio=0.5), model, batch, loss_fn)
    assert sizes == [(3, True)]  # the SAM-step gradient: 3 of 6 samples, differentiable


def test_up_and_both_report_unperturbed_query_loss():
    model, batch, loss_fn, lr = mlp_case()
    up = run(fastmeta.SharpMAML(lr, 1, alpha_up=0.1), model, batch, loss_fn)[0]
    maml = run(fastmeta.MAML(lr, 1), model, batch, loss_fn)[0]
    assert torch.equal(up.query_loss, maml.query_loss)
    assert up.extras["meta_perturbation_norm"] == pytest.approx(0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha_low"):
        fastmeta.SharpMAML(0.1, alpha_low=-0.1)
    with pytest.raises(ValueError, match="alpha_up"):
        fastmeta.SharpMAML(0.1, alpha_up="x")
    with pytest.raises(ValueError, match="swp_keep_prob"):
        fastmeta.SharpMAML(0.1, alpha_low=0.1, swp_keep_prob=0.0)
    with pytest.raises(ValueError, match="sds_ratio"):
        fastmeta.SharpMAML(0.1, alpha_low=0.1, sds_ratio=1.5)
    with pytest.raises(ValueError, match="sds_ratio"):
        fastmeta.SharpMAML(0.1, sds_ratio=0.5)  # ESAM needs an inner SAM step


def test_registry_and_cli_names():
    assert {"maml", "fomaml", "hfmaml", "sharp-low", "sharp-up", "sharp-both", "esharp-low"} <= set(FACTORIES)
    p = argparse.ArgumentParser()
    add_algorithm_args(p)
    a = vars(p.parse_args(["--algo", "esharp-low", "--alpha-low", "0.005", "--swp-keep-prob", "0.6"]))
    a.update(inner_lr=0.4, inner_steps=1)
    e = build_algorithm(a)
    assert (e.alpha_low, e.alpha_up, e.sds_ratio, e.swp_keep_prob) == (0.005, 0.0, 0.5, 0.6)
    base = dict(inner_lr=0.4, inner_steps=2)
    assert build_algorithm(dict(base, algo="sharp-up")).alpha_low == 0.0
    both = build_algorithm(dict(base, algo="sharp-both", alpha_low=0.01, alpha_up=0.02))
    assert (both.alpha_low, both.alpha_up, both.inner_steps) == (0.01, 0.02, 2)
    hf = build_algorithm(dict(base, algo="hfmaml", delta=1e-3, fd_float64=True))
    assert isinstance(hf, fastmeta.HFMAML) and hf.delta == 1e-3 and hf.fd_dtype == torch.float64
    with pytest.raises(ValueError, match="algo"):
        build_algorithm(dict(base, algo="sharp"))
