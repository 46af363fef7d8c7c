import pytest
import torch

from fastmeta import ops

from fastmeta.testing import require_backend as require

SIZES = [(t, n) for t in (1, 3, 8) for n in (1, 7, 64, 300)]  # N: samples per task


def _losses(t, n, dtype, ties: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.rand(t, n, generator=gen, dtype=torch.float64).to(dtype)
    if ties:  # few distinct values -> many exact ties in the increase
        pert = torch.randint(0, 3, (t, n), generator=gen).to(dtype)
        clean = torch.zeros_like(pert)
    else:
        pert = clean + torch.randn(t, n, generator=gen, dtype=torch.float64).to(dtype)
    return clean, pert


@pytest.mark.parametrize("t,n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_sds_select_matches_reference_exactly(backend, run_on, t, n, dtype, ties):
    require(backend, "sds_select")
    clean, pert = _losses(t, n, dtype, ties)
    for ratio in (0.01, 0.3, 0.5, 1.0):
        out = run_on(backend, ops.sds_select, clean, pert, ratio)
        ref = run_on("reference", ops.sds_select, clean, pert, ratio)
        assert out.dtype == torch.int64 and out.shape == (t, max(1, round(ratio * n)))
        assert torch.equal(out, ref), f"{backend} T={t} N={n} ratio={ratio}"


def test_sds_select_known_order_and_ties(every_backend, run_on):
    require(every_backend, "sds_select")
    clean = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    pert = torch.tensor([[1.0, 3.0, 3.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    out = run_on(every_backend, ops.sds_select, clean, pert, 0.8)  # k = 4
    assert out.tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]]
    mask = run_on(every_backend, ops.sds_mask, clean, pert, 0.4)  # k = 2
    assert mask.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]


def test_sds_select_noncontiguous(backend, run_on):
    require(backend, "sds_select")
    clean, pert = _losses(9, 6, torch.float32, ties=False)
    clean, pert = clean.T, pert.T  # [6, 9] views
    assert torch.equal(run_on(backend, ops.sds_select, clean, pert, 0.5),
                       run_on("reference", ops.sds_select, clean.contiguous(), pert.contiguous(), 0.5))


def test_sds_k():
    assert ops.sds_k(10, 0.01) == 1
    assert ops.sds_k(10, 0.25) == 2  # round half to even: 2.5 -> 2
    assert ops.sds_k(10, 1.0) == 10


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01, float("nan")])
def test_sds_select_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        ops.sds_select(torch.zeros(2, 3), torch.zeros(2, 3), ratio)


@pytest.mark.parametrize("name", ["reference", "cpp", "triton"])
def test_sds_select_opcheck(name):
    require(name, "sds_select")
    clean, pert = _losses(3, 7, torch.float32, ties=True)
    with ops.use_backend(name):
        torch.library.opcheck(torch.ops.fastmeta_ops.sds_select.default, (clean, pert, 3))
