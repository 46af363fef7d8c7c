"""higher's MAML Omniglot loop (its examples/maml-omniglot.py, training part) on fastmeta's
batched ``MetaLearner``: the per-task innerloop_ctx loop becomes one ``learner.step(batch)``.

    python examples/higher_maml_omniglot_fastmeta.py --data images_background.zip images_evaluation.zip
"""
import argparse

import torch
from torch import nn

import fastmeta
from _omniglot import omniglot_tasks


def conv_block(c_in, hidden=64):
    # Batch statistics, as higher's example uses them in training (it never switches to eval).
    return [nn.Conv2d(c_in, hidden, 3), nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2, 2)]


def main(steps, data=None, n_way=5, k_spt=1, k_qry=15, task_num=32, n_inner_iter=5):
    tasks = omniglot_tasks(data, n_way, k_spt, k_qry)
    net = nn.Sequential(*conv_block(1), *conv_block(64), *conv_block(64), nn.Flatten(), nn.Linear(64, n_way))
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    # higher's inner SGD(lr=0.1) for n_inner_iter steps, and its sum of per-task query gradients:
    # MetaLearner averages over tasks, so scale the meta learning rate or the loss if you need the sum.
    learner = fastmeta.MetaLearner(net, fastmeta.MAML(inner_lr=1e-1, inner_steps=n_inner_iter))
    for batch_idx in range(steps):
        meta_opt.zero_grad()
        res = learner.step(tasks.sample(task_num))
        meta_opt.step()
        print(f"step {batch_idx} loss {res.loss:.4f} accuracy {res.accuracy:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--data", nargs="*", help="Omniglot zips or folders (default: synthetic stand-in)")
    a = ap.parse_args()
    main(a.steps, a.data, task_num=a.meta_batch)
