import contextlib

import pytest
import torch

from fastmeta.ops import _backend
from fastmeta.testing import cpu_unavailable_reason


# A backend that cannot run on this machine at all (the cuda backend on CPU tensors, always; triton
# without its interpreter; cpp under FASTMETA_NO_EXT=1) is left out of the parametrisations below,
# and its cases are deselected at collection: each reason then shows ONCE in the skip summary
# (test_backend.py::test_backend_runs_here_or_is_skipped_once), not once per case.
UNAVAILABLE = {b: r for b in _backend.BACKENDS if (r := cpu_unavailable_reason(b)) is not None}
AVAILABLE = [b for b in _backend.BACKENDS if b not in UNAVAILABLE]
KERNEL_BACKENDS = [b for b in AVAILABLE if b != "reference"]
# Parameters that name the backend a case runs on.
BACKEND_PARAMS = ("backend", "every_backend", "any_backend", "name")


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """Every non-reference backend that runs on CPU here (the ``*_matches_reference`` tests)."""
    return request.param


@pytest.fixture(params=AVAILABLE)
def every_backend(request):
    """Every backend that runs on CPU here, the reference included: the hand-computed known-value
    tests check the oracle of all the other op tests too."""
    return request.param


def pytest_collection_modifyitems(config, items):
    here = str(config.rootpath / "tests" / "ops")
    keep, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = next((v for k in BACKEND_PARAMS if isinstance(v := params.get(k), str) and v in UNAVAILABLE), None)
        if name is not None and str(item.path).startswith(here):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


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


def _compiled_type(value, annotation: str) -> str:
    """The type Triton's compiled JIT gives a scalar kernel argument: its annotation when it has one,
    else by value (a Python float is fp32; an int i32, i64 or u64 by size)."""
    from triton.runtime.jit import mangle_type

    return annotation if annotation and annotation != "constexpr" else mangle_type(value)


@pytest.fixture
def compiled_scalars(monkeypatch):
    """Under the interpreter, pass scalar kernel arguments the way a GPU launch does.

    The interpreter keeps a Python float argument a Python float (exact, and weakly typed: it adopts
    the other operand's dtype), while the compiled JIT types it by its annotation, or as fp32 when it
    has none (the launcher rounds it). This fixture converts every non-constexpr int and float argument
    of every launch into a scalar of the compiled type, so float64 kernels see what they see on a GPU.
    Returns the list of (kernel name, {argument: compiled type}) of the launches.
    """
    np = pytest.importorskip("numpy")
    pytest.importorskip("triton")
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import _normalize_ty

    launches = []
    original = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        sig = inspect.signature(self.fn)
        extra = {k: v for k, v in kwargs.items() if k not in sig.parameters}  # launch options: num_warps, ...
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        annotations = {n: _normalize_ty(a) for n, a in inspect.get_annotations(self.fn).items()}
        types = {}
        for name, value in bound.arguments.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if annotations.get(name) == "constexpr":
                continue
            ty = _compiled_type(value, annotations.get(name, ""))
            tl_ty = tl.str_to_ty(ty, None)
            handle = interpreter.TensorHandle(np.array([value], dtype=interpreter._get_np_dtype(tl_ty)), tl_ty)
            bound.arguments[name] = tl.tensor(handle, tl_ty)
            types[name] = ty
        launches.append((self.fn.__name__, types))
        return original(self, *bound.args, **bound.kwargs, **extra)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
    return launches


@pytest.fixture(params=["gpu", "tiny"])
def gpu_launch(request, monkeypatch, compiled_scalars):
    """Run the Triton kernels under the interpreter as on a GPU, and check every launch.

    * ``gpu``: the GPU block sizes (1024-element blocks, 8192-element chunks, 64 x 64 sds_select tiles);
    * ``tiny``: 16-element blocks, 64-element chunks, 4-partial reduce steps and 16-wide tiles, with
      rows capped at 2 programs (axis 1, and axis 0 of the one-program-per-row grids), so the small
      test shapes walk every loop a GPU walks on huge ones: rows past the grid cap, many
      second-stage steps, many compare tiles.

    Every launch must happen inside ``_common.device_guard`` for the device of its tensors, with a grid
    inside CUDA's limits, scalars typed as the compiled JIT types them (``compiled_scalars``) and
    register tiles no larger than the configured block sizes.
    """
    pytest.importorskip("triton")
    from fastmeta.testing import require_backend

    require_backend("triton", "row_norm")
    from triton.runtime import interpreter

    from fastmeta.ops.triton import _common, _launch

    blocks = _launch.GPU if request.param == "gpu" else _launch.Blocks(block=16, chunk=64, reduce=4, tile=16)
    monkeypatch.setattr(_launch, "BLOCKS", blocks)
    if request.param == "tiny":
        monkeypatch.setattr(_launch, "MAX_GRID_YZ", 2)
        # one-program-per-row grids too (their cap, 2**31 - 1, is out of reach of a test)
        monkeypatch.setattr(_launch, "per_row_grid", lambda rows: (max(1, min(rows, 2)),))
    guarded: list = []
    real_guard = _common.device_guard

    @contextlib.contextmanager
    def guard(device):
        guarded.append(torch.device(device))
        try:
            with real_guard(device):
                yield
        finally:
            guarded.pop()

    monkeypatch.setattr(_common, "device_guard", guard)
    checked = interpreter.GridExecutor.__call__  # compiled_scalars' wrapper
    largest_tile = max(blocks.block, blocks.chunk, blocks.reduce, blocks.tile)

    def call(self, *args, **kwargs):
        name = self.fn.__name__
        assert guarded, f"{name} launched outside _common.device_guard"
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                assert a.device == guarded[-1], f"{name}: a tensor on {a.device} under a guard for {guarded[-1]}"
        grid = self.grid
        assert isinstance(grid, tuple) and 1 <= len(grid) <= 3, f"{name}: grid {grid!r}"
        assert 1 <= grid[0] <= _launch.MAX_GRID_X and all(1 <= g <= _launch.MAX_GRID_YZ for g in grid[1:]), \
            f"{name}: grid {grid} outside CUDA's limits"
        for key, value in kwargs.items():
            if key.startswith(("BLOCK", "CHUNK", "TILE")):
                assert value <= largest_tile, f"{name}: {key}={value} > {largest_tile}"
        return checked(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)
    return request.param
