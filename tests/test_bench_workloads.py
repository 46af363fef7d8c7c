"""The mini-ImageNet-shaped workloads of ``fastmeta bench --full`` (Conv-4 84x84, ResNet-12): their
small presets run and pass the meta-gradient check, and the full-size ones are checked on a smaller
twin of the same network (float64 at full size would take minutes)."""
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(BENCH))
    try:
        import checks
        import peers
        import workloads
        yield workloads, checks, peers
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("name", ["conv4-84", "resnet12"])
def test_image_workloads_check_and_twin(suite, name):
    workloads, checks, peers = suite
    small = workloads.workload(name + "-small")
    res = checks.check_gradient(small, peers.make_fastmeta, first_order=False)
    assert res["ok"] and res["rel_err"] < 1e-9, res
    full = workloads.workload(name)
    twin = full.extra["check_twin"]
    assert twin.name == full.name and twin.meta_batch <= full.meta_batch
    n_full = sum(p.numel() for p in full.model_fn().parameters())
    n_twin = sum(p.numel() for p in twin.model_fn().parameters())
    assert n_twin < n_full / 10  # the twin is what makes the float64 check affordable
    # a wrong implementation fails the twin check: first-order MAML is not second-order MAML
    wrong = checks.check_gradient(small, lambda wl, m, b, fo: peers.make_fastmeta(wl, m, b, True), first_order=False)
    assert not wrong["ok"]
