import pytest
import torch

from fastmeta.ops import _backend

KERNEL_BACKENDS = [b for b in _backend.BACKENDS if b != "reference"]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Every non-reference backend; skips with the backend's own reason when it cannot run on CPU."""
    name = request.param
    reasons = {op: _backend.unavailable_reason(op, name, "cpu") for op in _backend.OPS}
    if all(r is not None for r in reasons.values()):
        pytest.skip(f"{name}: {next(iter(reasons.values()))}")
    return name


@pytest.fixture
def run_on():
    """run_on(backend, fn, *args): fn(*args) with the backend forced (reference for the oracle)."""

    def run(name, fn, *args, **kwargs):
        with _backend.use_backend(name):
            return fn(*args, **kwargs)

    return run


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    yield
    torch.manual_seed(0)
