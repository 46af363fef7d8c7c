"""The cost of the per-step communication: median time of one gloo all-reduce of ``P + 1``
numbers (a meta-gradient and its task count) among local ranks over loopback.

    python -m fastmeta.distributed --start-method fork --nproc 2 3 --sizes 112000 11000000
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

import torch
import torch.distributed as dist

from .launch import launch


def _bench_worker(rank: int, world: int, sizes, repeats: int, dtype_name: str):
    dtype = getattr(torch, dtype_name)
    out = {}
    for n in sizes:
        buf = torch.ones(n + 1, dtype=dtype)  # P floats + the task count, as in all_reduce_mean
        for _ in range(2):
            dist.all_reduce(buf)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t0)
        out[n] = sorted(times)[len(times) // 2]
    return out


def bench_all_reduce(sizes: Sequence[int] = (112_000, 11_000_000), nproc: int = 2, repeats: int = 10,
                     dtype: str = "float32", start_method: str = "spawn") -> dict:
    """Median seconds of one gloo all-reduce of ``n + 1`` numbers for each ``n`` in ``sizes``, among
    ``nproc`` local ranks over loopback (rank 0's timing)."""
    return launch(_bench_worker, nproc, (tuple(sizes), repeats, dtype), start_method=start_method,
                  pg_timeout=600.0, threads=1)[0]


def main(argv=None) -> int:
    """``python -m fastmeta.distributed``: a markdown table of all-reduce times per world size and P."""
    p = argparse.ArgumentParser(prog="python -m fastmeta.distributed",
                                description="Time the per-step all-reduce of the meta-gradient (gloo, loopback).")
    p.add_argument("--sizes", type=int, nargs="+", default=[112_000, 11_000_000], help="P, parameters")
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--start-method", default="spawn", choices=["spawn", "fork"],
                   help="fork: ranks inherit the imported torch (fast start on a loaded machine)")
    args = p.parse_args(argv)
    print(f"gloo all_reduce over loopback (127.0.0.1), {args.dtype}, median of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| ranks | P | MB per rank | ms per all-reduce | MB/s (payload / time) |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.nproc:
        res = bench_all_reduce(args.sizes, n, args.repeats, args.dtype, start_method=args.start_method)
        for size, sec in res.items():
            mb = (size + 1) * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size() / 1e6
            print(f"| {n} | {size:,} | {mb:.2f} | {1e3 * sec:.2f} | {mb / sec:.0f} |")
    return 0
