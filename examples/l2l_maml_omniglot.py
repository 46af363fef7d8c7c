"""learn2learn's MAML Omniglot loop (its examples/vision/maml_omniglot.py), with ONE changed
line: ``import learn2learn as l2l`` -> ``import fastmeta.compat.learn2learn as l2l``. (Tasks come
from fastmeta.data, or a synthetic stand-in without ``--data``: l2l.data is not provided.)

    python examples/l2l_maml_omniglot.py --data images_background.zip images_evaluation.zip
"""
import argparse

import torch
from torch import nn, optim

import fastmeta
import fastmeta.compat.learn2learn as l2l  # was: import learn2learn as l2l
from _omniglot import omniglot_tasks


def accuracy(predictions, targets):
    return (predictions.argmax(dim=1).view(targets.shape) == targets).sum().float() / targets.size(0)


def fast_adapt(sx, sy, qx, qy, learner, loss, adaptation_steps):
    for _ in range(adaptation_steps):
        learner.adapt(loss(learner(sx), sy))
    predictions = learner(qx)
    return loss(predictions, qy), accuracy(predictions, qy)


def main(steps, data=None, ways=5, shots=1, meta_lr=0.003, fast_lr=0.5, meta_batch_size=32, adaptation_steps=1):
    tasks = omniglot_tasks(data, ways, shots, queries=shots)  # learn2learn: 2*shots drawings, half as queries
    model = fastmeta.Conv4(ways)  # learn2learn: l2l.vision.models.OmniglotCNN(ways)
    maml = l2l.algorithms.MAML(model, lr=fast_lr, first_order=False)
    opt = optim.Adam(maml.parameters(), meta_lr)
    loss = nn.CrossEntropyLoss(reduction="mean")
    for iteration in range(steps):
        opt.zero_grad()
        meta_train_error = meta_train_accuracy = 0.0
        batch = tasks.sample(meta_batch_size)
        for task in range(meta_batch_size):
            learner = maml.clone()
            evaluation_error, evaluation_accuracy = fast_adapt(
                batch.support_x[task], batch.support_y[task], batch.query_x[task], batch.query_y[task],
                learner, loss, adaptation_steps)
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            meta_train_accuracy += evaluation_accuracy.item()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / meta_batch_size)
        opt.step()
        print(f"step {iteration} loss {meta_train_error / meta_batch_size:.4f} "
              f"accuracy {meta_train_accuracy / meta_batch_size:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--data", nargs="*", help="Omniglot zips or folders (default: synthetic stand-in)")
    a = ap.parse_args()
    main(a.steps, a.data, meta_batch_size=a.meta_batch)
