"""Evaluate and certify a small model, alone or under ``torchrun``, and save what every process saw (test helper).

``python ddp_eval.py OUT`` or ``torchrun --nproc_per_node=2 ddp_eval.py OUT``: the first process saves
the results and the number of examples each process's model was shown.
"""

import sys
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from defenses_lib import distributed
from defenses_lib.attacks import pgd
from defenses_lib.defenses.smoothing import certify
from defenses_lib.evaluation import evaluate


class Counting(nn.Module):
    """A model that counts the examples it is shown."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.net(x)


model = Counting()
x, y = torch.rand(37, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(37) % 10
result = evaluate(model, x, y, {"PGD": partial(pgd, eps=0.1, steps=3, random_start=False)}, batch_size=8)
cert = certify(model, x[:5], 0.25, n0=10, n=50, batch_size=25)
seen = [model.seen]
if distributed.world_size() > 1:
    seen = [None] * distributed.world_size()
    dist.all_gather_object(seen, model.seen)
if distributed.is_main():
    torch.save({"world_size": distributed.world_size(), "seen": seen, "correct": result.correct,
                "certified": len(cert.prediction)}, sys.argv[1])
