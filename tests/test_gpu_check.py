"""bench/gpu_check.py, the one-shot GPU validation script, run with --cpu-smoke: the same checks on
CPU tensors (cpp, and triton under the interpreter), so that the script a GPU owner runs keeps
working. CUDA-only checks must SKIP with a reason, never FAIL or vanish."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS = ("row_norm", "sam_perturb", "fd_hvp_points", "fd_hvp_combine", "swp_mask", "sds_select")


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("FASTMETA_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-smoke" and doc["summary"]["FAIL"] == 0, doc["summary"]
    checks = {c["name"]: c for c in doc["checks"]}
    assert all(c["status"] in ("PASS", "SKIP") for c in checks.values())
    assert all(c["detail"] for c in checks.values() if c["status"] == "SKIP"), "a SKIP must say why"
    # Every check the GPU run makes exists in the smoke run too.
    for backend in ("cpp", "triton"):
        for op in OPS:
            assert f"op {op} [{backend}] shape grid" in checks
            assert f"op {op} [{backend}] large T (100, 8)" in checks
        for name in ("float64 scalar arguments", "current stream", "gradcheck/opcheck", "T*D > 2^31",
                     "cuda:1 with current device 0"):
            assert f"{name} [{backend}]" in checks
        for workload, strategies in (("sine", ("loop", "vmap", "bmm")), ("conv4", ("loop", "vmap"))):
            for strategy in strategies:
                for algo in ("maml-1", "maml-2", "fomaml", "sharp-sds", "sharp-swp", "hfmaml"):
                    assert f"step {workload} {algo} {strategy} [{backend}]" in checks
    for name in ("current stream [cpp]", "cuda:1 with current device 0 [cpp]"):
        assert checks[name]["status"] == "SKIP"
    # What runs on any CPU must pass here (the triton cells may SKIP where triton is missing).
    for name in ("environment", "torch.compile fullgraph", "step sine strategy=auto", "step conv4 strategy=auto",
                 "step conv4 fused=True", "timing: ops vs eager PyTorch", "timing: Conv-4 MAML step vs peers",
                 "step conv4 hfmaml vmap [cpp]", "op sam_perturb [cpp] shape grid", "T*D > 2^31 [cpp]"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert "passed, 0 failed" in proc.stdout
