"""higher's MAML Omniglot loop (its examples/maml-omniglot.py, training part), with ONE changed
line: ``import higher`` -> ``import fastmeta.compat.higher as higher``. (Tasks come from
fastmeta.data, or a synthetic stand-in without ``--data``.)

    python examples/higher_maml_omniglot.py --data images_background.zip images_evaluation.zip
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fastmeta.compat.higher as higher  # was: import higher
from _omniglot import omniglot_tasks


def conv_block(c_in, hidden=64):
    return [nn.Conv2d(c_in, hidden, 3), nn.BatchNorm2d(hidden, momentum=1, affine=True), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2)]


def main(steps, data=None, n_way=5, k_spt=1, k_qry=15, task_num=32, n_inner_iter=5):
    tasks = omniglot_tasks(data, n_way, k_spt, k_qry)
    net = nn.Sequential(*conv_block(1), *conv_block(64), *conv_block(64), nn.Flatten(), nn.Linear(64, n_way))
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for batch_idx in range(steps):
        batch = tasks.sample(task_num)
        x_spt, y_spt, x_qry, y_qry = batch.support_x, batch.support_y, batch.query_x, batch.query_y
        inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
        qry_losses, qry_accs = [], []
        meta_opt.zero_grad()
        for i in range(task_num):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(n_inner_iter):
                    spt_logits = fnet(x_spt[i])
                    spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                    diffopt.step(spt_loss)
                qry_logits = fnet(x_qry[i])
                qry_loss = F.cross_entropy(qry_logits, y_qry[i])
                qry_losses.append(qry_loss.detach())
                qry_accs.append((qry_logits.argmax(dim=1) == y_qry[i]).sum().item() / x_qry.size(1))
                qry_loss.backward()
        meta_opt.step()
        print(f"step {batch_idx} loss {sum(qry_losses).item() / task_num:.4f} accuracy {sum(qry_accs) / task_num:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--data", nargs="*", help="Omniglot zips or folders (default: synthetic stand-in)")
    a = ap.parse_args()
    main(a.steps, a.data, task_num=a.meta_batch)
