"""learn2learn's MAML sine-regression loop (its examples/maml_sine.py), with ONE changed line:
``import learn2learn as l2l`` -> ``import fastmeta.compat.learn2learn as l2l``.

    python examples/l2l_maml_sine.py --steps 1000
"""
import argparse

import torch
from torch import nn, optim

import fastmeta.compat.learn2learn as l2l  # was: import learn2learn as l2l
from fastmeta.data import SinusoidTasks


def main(steps, meta_batch_size=25, shots=10, adaptation_steps=1, fast_lr=0.01, meta_lr=0.001):
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = optim.Adam(maml.parameters(), meta_lr)
    lossfn = nn.MSELoss(reduction="mean")
    tasks = SinusoidTasks(k_shot=shots, k_query=shots, seed=0)  # learn2learn: l2l.data + Sinewave tasks
    for iteration in range(steps):
        opt.zero_grad()
        iteration_error = 0.0
        batch = tasks.sample(meta_batch_size)
        for task in range(meta_batch_size):
            learner = maml.clone()
            for _ in range(adaptation_steps):
                learner.adapt(lossfn(learner(batch.support_x[task]), batch.support_y[task]))
            evaluation_error = lossfn(learner(batch.query_x[task]), batch.query_y[task])
            evaluation_error.backward()
            iteration_error += evaluation_error.item()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()
        print(f"step {iteration} loss {iteration_error / meta_batch_size:.4f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--meta-batch", type=int, default=25)
    a = ap.parse_args()
    main(a.steps, a.meta_batch)
