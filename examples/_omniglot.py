"""Omniglot N-way K-shot tasks for the examples: your copy (``--data``: zips or folders in the
``<Alphabet>/<character>/*.png`` layout, see ``fastmeta.data.Omniglot``) or, when none is given,
a synthetic stand-in of the same shapes so that every example runs anywhere."""
import torch

import fastmeta


class SyntheticOmniglot:
    """``classes`` random 28x28 stroke-like prototypes; a drawing is its prototype plus noise."""

    def __init__(self, ways, shots, queries, classes=100, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.protos = (torch.rand(classes, 1, 28, 28, generator=self.g) > 0.8).float()
        self.ways, self.shots, self.queries = ways, shots, queries

    def sample(self, num_tasks):
        n = self.shots + self.queries
        picks = torch.stack([torch.randperm(len(self.protos), generator=self.g)[:self.ways] for _ in range(num_tasks)])
        x = self.protos[picks][:, :, None].expand(-1, -1, n, -1, -1, -1)  # [T, ways, n, 1, 28, 28]
        x = (x + 0.3 * torch.randn(x.shape, generator=self.g)).clamp(0, 1)
        y = torch.arange(self.ways).view(1, -1, 1).expand(num_tasks, -1, n)
        s, q = slice(0, self.shots), slice(self.shots, n)
        flat = lambda t: t.reshape(num_tasks, -1, *t.shape[3:])  # noqa: E731
        return fastmeta.TaskBatch(flat(x[:, :, s]), flat(y[:, :, s]), flat(x[:, :, q]), flat(y[:, :, q]), ways=self.ways)


def omniglot_tasks(data, ways, shots, queries, seed=0):
    """An object whose ``sample(T)`` returns a :class:`fastmeta.TaskBatch` of T tasks."""
    if not data:
        return SyntheticOmniglot(ways, shots, queries, seed=seed)
    from fastmeta.data import Omniglot, OmniglotTasks

    omniglot = Omniglot(data, image_size=28)
    return OmniglotTasks(omniglot, omniglot.alphabets, ways, shots, queries, rotations=True, seed=seed)
