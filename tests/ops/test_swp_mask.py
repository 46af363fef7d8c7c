import math

import pytest
import torch

from fastmeta import ops

from fastmeta.testing import require_backend as require


def _mask(backend, run_on, *args, **kwargs):
    return run_on(backend, ops.swp_mask, *args, **kwargs)


@pytest.fixture(params=["reference", "cpp", "triton"])
def any_backend(request):
    require(request.param, "swp_mask")
    return request.param


@pytest.mark.parametrize("shape", [(7,), (3, 1025), (8, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swp_mask_reproducible_and_binary(any_backend, run_on, shape, dtype):
    a = _mask(any_backend, run_on, shape, 0.3, seed=11, dtype=dtype)
    b = _mask(any_backend, run_on, shape, 0.3, seed=11, dtype=dtype)
    c = _mask(any_backend, run_on, shape, 0.3, seed=12, dtype=dtype)
    assert a.shape == shape and a.dtype == dtype
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    if a.numel() > 100:
        assert not torch.equal(a, c)


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_swp_mask_keep_fraction_and_independence(any_backend, run_on, keep_prob):
    t, d = 8, 20_000
    m = _mask(any_backend, run_on, (t, d), keep_prob, seed=5)
    n = t * d
    sigma = math.sqrt(n * keep_prob * (1 - keep_prob))
    assert abs(float(m.sum()) - n * keep_prob) < 6 * sigma
    # rows (tasks) get different draws, and neighbouring elements are not correlated
    assert not torch.equal(m[0], m[1])
    both = float((m[:, 1:] * m[:, :-1]).mean())
    assert abs(both - keep_prob**2) < 6 * math.sqrt(keep_prob**2 * (1 - keep_prob**2) / (t * (d - 1)))


def test_swp_mask_rescale_and_keep_all(any_backend, run_on):
    m = _mask(any_backend, run_on, (3, 1000), 0.25, seed=1, rescale=True)
    assert set(m.unique().tolist()) <= {0.0, 4.0}
    assert torch.equal(_mask(any_backend, run_on, (3, 1000), 1.0, seed=1), torch.ones(3, 1000))


def test_swp_mask_tensor_mode(any_backend, run_on):
    segments = [5, 1, 300, 20, 7]
    t, d = 64, sum(segments)
    m = _mask(any_backend, run_on, (t, d), 0.5, seed=9, mode="tensor", segments=segments, rescale=True)
    assert m.shape == (t, d)
    start = 0
    for s in segments:
        block = m[:, start:start + s]
        assert torch.equal(block, block[:, :1].expand(-1, s)), "a parameter tensor is kept or dropped whole"
        start += s
    assert set(m.unique().tolist()) <= {0.0, 2.0}
    assert 0 < float((m[:, 0] > 0).float().mean()) < 1  # tasks draw independently


def test_swp_mask_seed_sources(run_on):
    gen = torch.Generator().manual_seed(123)
    a = ops.swp_mask((4, 50), 0.5, generator=gen)
    gen.manual_seed(123)
    assert torch.equal(a, ops.swp_mask((4, 50), 0.5, generator=gen))
    torch.manual_seed(7)
    b = ops.swp_mask((4, 50), 0.5)
    torch.manual_seed(7)
    assert torch.equal(b, ops.swp_mask((4, 50), 0.5))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_swp_mask_bad_keep_prob(bad):
    with pytest.raises(ValueError, match="keep_prob"):
        ops.swp_mask((3, 4), bad, seed=0)


def test_swp_mask_bad_arguments():
    with pytest.raises(ValueError, match="segments"):
        ops.swp_mask((3, 4), 0.5, seed=0, mode="tensor", segments=[1, 2])
    with pytest.raises(ValueError, match="segments"):
        ops.swp_mask((3, 4), 0.5, seed=0, mode="tensor")
    with pytest.raises(ValueError, match="mode"):
        ops.swp_mask((3, 4), 0.5, seed=0, mode="row")
    with pytest.raises(ValueError, match="seed"):
        ops.swp_mask((3, 4), 0.5, seed=-1)
    with pytest.raises(ValueError, match="seed and generator"):
        ops.swp_mask((3, 4), 0.5, seed=1, generator=torch.Generator())


def test_swp_mask_opcheck(any_backend):
    with ops.use_backend(any_backend):
        torch.library.opcheck(torch.ops.fastmeta_ops.swp_mask.default,
                              (3, 10, 0.5, 4, False, torch.device("cpu"), torch.float32))
