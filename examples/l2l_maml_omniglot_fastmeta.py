"""learn2learn's MAML Omniglot loop (its examples/vision/maml_omniglot.py) on fastmeta's batched
``MetaLearner``: the per-task clone/adapt/backward loop becomes one ``learner.step(batch)``.

    python examples/l2l_maml_omniglot_fastmeta.py --data images_background.zip images_evaluation.zip
"""
import argparse

import torch

import fastmeta
from _omniglot import omniglot_tasks


def main(steps, data=None, ways=5, shots=1, meta_lr=0.003, fast_lr=0.5, meta_batch_size=32, adaptation_steps=1):
    tasks = omniglot_tasks(data, ways, shots, queries=shots)
    model = fastmeta.Conv4(ways)
    learner = fastmeta.MetaLearner(model, fastmeta.MAML(inner_lr=fast_lr, inner_steps=adaptation_steps))
    opt = torch.optim.Adam(model.parameters(), meta_lr)
    for iteration in range(steps):
        opt.zero_grad()
        res = learner.step(tasks.sample(meta_batch_size))  # mean over tasks, as learn2learn's 1/meta_batch_size
        opt.step()
        print(f"step {iteration} loss {res.loss:.4f} accuracy {res.accuracy:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--data", nargs="*", help="Omniglot zips or folders (default: synthetic stand-in)")
    a = ap.parse_args()
    main(a.steps, a.data, meta_batch_size=a.meta_batch)
