"""learn2learn's MAML sine-regression loop (its examples/maml_sine.py) on fastmeta's batched
``MetaLearner``: the per-task clone/adapt/backward loop becomes one ``learner.step(batch)``.

    python examples/l2l_maml_sine_fastmeta.py --steps 1000
"""
import argparse

import torch

import fastmeta
from fastmeta.data import SinusoidTasks


def main(steps, meta_batch_size=25, shots=10, adaptation_steps=1, fast_lr=0.01, meta_lr=0.001):
    model = fastmeta.SineMLP()  # the same 1-40-40-1 ReLU MLP
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=fast_lr, inner_steps=adaptation_steps), loss_fn="mse")
    opt = torch.optim.Adam(model.parameters(), meta_lr)
    tasks = SinusoidTasks(k_shot=shots, k_query=shots, seed=0)
    for iteration in range(steps):
        opt.zero_grad()
        res = learner.step(tasks.sample(meta_batch_size))  # mean over tasks, as learn2learn's 1/meta_batch_size
        opt.step()
        print(f"step {iteration} loss {res.loss:.4f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--meta-batch", type=int, default=25)
    a = ap.parse_args()
    main(a.steps, a.meta_batch)
