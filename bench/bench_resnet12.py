"""ResNet-12 second-order MAML: fastmeta fused (fp32, bf16) and unfused vs plain per-task loops.

Workload: ResNet-12 (``fastmeta.ResNet12``; Lee et al. 2019, MetaOptNet layout: four residual blocks of three
conv3x3-BN-LeakyReLU(0.1) layers, a 1x1 conv + BN shortcut, add, LeakyReLU, MaxPool2d(2); widths
64-160-320-640 by default), 84x84 RGB, 5-way 1-shot with 15 queries, meta-batch 2, one inner SGD
step, second-order MAML (Finn et al. 2017, Alg. 2). ``fuse_conv_blocks`` finds two chains per block
(``bn1 -> LeakyReLU``, ``bn2 -> LeakyReLU``, no pool: the block end's ``bn3`` feeds the residual
add), eight in all.

Rows: ``plain loop`` (the learn2learn-style per-task autograd loop of the tests' oracle),
``torchopt`` (its MetaSGD recipe, when importable; ``bench/peers.py``), ``fastmeta`` (unfused,
loop strategy), ``fastmeta fused`` and ``fastmeta fused+bf16`` (loop strategy: under vmap the
fused chains fall back to ATen). Before timing, every row's meta-gradient is checked once: the
fp32 rows in float64 against the plain loop (relative error < 1e-9); the bf16 row against the
float32 fused meta-gradient, within twice the unfused bf16 mode's error (STYLE's tolerance rule).
The bf16 row's relative L2 error and cosine to fp32 and the same-run bf16/fp32 GEMM rate ratio are
printed with the times (the ratio bounds what bf16 can gain on this CPU).

Script: ``python bench/bench_resnet12.py --rounds 3 [--widths 64,160,320,640] [--threads N]``
prints ms per row (min over rounds, round-robin, ``timing.time_interleaved``) and ratios.
pytest: ``pytest bench/bench_resnet12.py --benchmark-enable -s`` (full size); the CI smoke run
(``--benchmark-disable``) uses a tiny config (widths 4-4-4-4, 16x16, 2 queries) and checks once.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fastmeta from this checkout

import fastmeta  # noqa: E402
from fastmeta.nn import count_fusable  # noqa: E402
from peers import make_fastmeta, make_plain, make_torchopt, peer_status  # noqa: E402
from timing import gemm_gflops, summary, time_interleaved  # noqa: E402
from workloads import Workload, image_workload, smoke  # noqa: E402

FULL = dict(widths=(64, 160, 320, 640), size=84, ways=5, shots=1, queries=15, meta_batch=2)
TINY = dict(widths=(4, 4, 4, 4), size=16, ways=5, shots=1, queries=2, meta_batch=2)


def resnet12_workload(widths, size, ways, shots, queries, meta_batch) -> Workload:
    return image_workload("resnet12", lambda: fastmeta.ResNet12(ways, 3, widths),
                          f"ResNet-12 {'-'.join(map(str, widths))}", size, meta_batch, ways, shots, queries)


def _fm(**kw):
    def make(wl, model, batch, first_order):
        return make_fastmeta(wl, model, batch, first_order, strategy="loop", **kw)
    return make


def rows() -> dict:
    """``{row: make(wl, model, batch, first_order)}``; torchopt only when importable."""
    out = {"plain loop": make_plain}
    if peer_status()["torchopt"][0]:
        out["torchopt"] = make_torchopt
    out.update({"fastmeta": _fm(), "fastmeta fused": _fm(fused=True), "fastmeta fused+bf16": _fm(fused=True, bf16=True)})
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check(wl: Workload, wl64: Workload) -> dict:
    """Each row's meta-gradient once (see the module docstring); returns the bf16 figures. The
    float64 exactness check runs on ``wl64`` (the same network at a size float64 affords: exactness
    does not depend on the widths), the bf16 figures on ``wl`` itself."""
    impls = rows()
    ref = make_plain(wl64, wl64.model(torch.float64), wl64.batch(torch.float64), False)()
    for name in ("fastmeta", "fastmeta fused") + (("torchopt",) if "torchopt" in impls else ()):
        err = rel_err(impls[name](wl64, wl64.model(torch.float64), wl64.batch(torch.float64), False)().double(), ref)
        # torchopt is a peer: reported, not failed
        assert err < 1e-9 or name == "torchopt", f"{name}: meta-gradient off the plain loop by {err:.2e}"
    fp32 = impls["fastmeta fused"](wl, wl.model(), wl.batch(), False)().double()
    bf16 = impls["fastmeta fused+bf16"](wl, wl.model(), wl.batch(), False)().double()
    unfused_bf16 = _fm(bf16=True)(wl, wl.model(), wl.batch(), False)().double()
    err, cos = rel_err(bf16, fp32), float(F.cosine_similarity(bf16, fp32, dim=0))
    bound = 2 * rel_err(unfused_bf16, fp32)
    assert math.isfinite(err) and err <= max(bound, 1e-6), f"fused bf16 error {err:.3g} > 2x unfused bf16 ({bound:.3g})"
    return dict(bf16_rel_err=err, bf16_cos=cos, unfused_bf16_rel_err=bound / 2)


def measure(cfg: dict, rounds: int) -> dict:
    wl = resnet12_workload(**cfg)
    checked = check(wl, wl if cfg == TINY else resnet12_workload(**dict(cfg, widths=(8, 12, 16, 20), size=32)))
    model, batch = wl.model(), wl.batch()
    fns = {name: make(wl, model, batch, False) for name, make in rows().items()}
    ms = {n: 1e3 * summary(ts) for n, ts in time_interleaved(fns, rounds).items()}
    gemm = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    return dict(title=wl.title, ms=ms, fused_chains=count_fusable(model), threads=torch.get_num_threads(),
                gemm_bf16_over_fp32=gemm["bf16"] / gemm["fp32"], **checked)


def format_result(res: dict) -> str:
    ms = res["ms"]
    lines = [f"{res['title']}, second-order MAML, {res['fused_chains']} fused chains, {res['threads']} threads"]
    for name, t in ms.items():
        lines.append(f"  {name:22s} {t:9.1f} ms   x{ms['plain loop'] / t:5.2f} vs plain loop   "
                     f"x{ms['fastmeta'] / t:5.2f} vs unfused")
    lines.append(f"  bf16 meta-gradient vs fp32: rel. L2 error {res['bf16_rel_err']:.3g}, cosine {res['bf16_cos']:.4f} "
                 f"(unfused bf16: {res['unfused_bf16_rel_err']:.3g}); same-run GEMM bf16/fp32 "
                 f"{res['gemm_bf16_over_fp32']:.2f}x")
    return "\n".join(lines)


def test_resnet12(benchmark, request, capsys):
    disabled = smoke(request.config)
    cfg = TINY if disabled else FULL
    res = measure(cfg, rounds=1 if disabled else 3)
    assert res["fused_chains"] == 8
    with capsys.disabled():
        print("\n[bench_resnet12] " + format_result(res))
    benchmark.group = f"resnet12 {res['title']}"
    benchmark.extra_info.update(res)
    wl = resnet12_workload(**cfg)
    benchmark.pedantic(_fm(fused=True)(wl, wl.model(), wl.batch(), False), rounds=1 if disabled else 3,
                       iterations=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--widths", default=",".join(map(str, FULL["widths"])))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="the CI smoke configuration")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = dict(TINY) if a.tiny else dict(FULL, widths=tuple(int(w) for w in a.widths.split(",")))
    print(format_result(measure(cfg, a.rounds)))


if __name__ == "__main__":
    main()
