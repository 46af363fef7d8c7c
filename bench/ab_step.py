"""Step time of one fastmeta checkout, for A/B comparisons of two commits.

Prints ``<case> <min ms> <median ms>`` over ROUNDS timed calls of ``MetaLearner.step`` on a fixed
batch (sine MLP 1-40-40-1, 25 tasks, bmm strategy, 50 steps per timed call; Conv-4 Omniglot-shaped
random images, 5-way 1-shot, 15 queries, 16 tasks, loop strategy, optionally fused). Only the
public API is used, so the same script runs against any commit; which fastmeta it times is
whichever comes first on the path, so alternate two checkouts in separate processes::

    for r in 1 2 3 4 5 6; do
      PYTHONPATH=/path/to/old python bench/ab_step.py conv4-fused 6
      PYTHONPATH=/path/to/new python bench/ab_step.py conv4-fused 6
    done

Usage: ``ab_step.py {sine,conv4,conv4-fused} ROUNDS``.
"""
import sys
import time

import torch

import fastmeta
from fastmeta import TaskBatch

case, rounds = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
if case == "sine":
    from fastmeta.data import SinusoidTasks
    model = fastmeta.SineMLP()
    batch = SinusoidTasks(10, 10, seed=0).sample(25)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=0.01), loss_fn="mse", strategy="bmm")
    inner = 50
else:
    model = fastmeta.Conv4(5)
    T, ways, shots, q = 16, 5, 1, 15
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(T, ways * shots, 1, 28, 28, generator=g)
    qx = torch.rand(T, ways * q, 1, 28, 28, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways).repeat_interleave(q).expand(T, -1).contiguous()
    batch = TaskBatch(sx, sy, qx, qy, ways=ways)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=0.4), strategy="loop",
                                   fused=(case == "conv4-fused"))
    inner = 1
learner.step(batch)
learner.step(batch)
ts = []
for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(inner):
        learner.step(batch)
    ts.append((time.perf_counter() - t0) / inner * 1e3)
ts.sort()
print(f"{case} {ts[0]:.3f} {ts[len(ts)//2]:.3f}")
