"""Train a small CNN for a few steps, alone or under ``torchrun``, and save the weights (test helper).

``python ddp_train.py OUT`` or ``torchrun --nproc_per_node=2 ddp_train.py OUT``, once per loss: the same
data, seed and initial weights either way, so the two runs should end with the same model. The 105
samples in batches of 20 end with a batch of 5, which two processes split unequally (3 and 2).
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from defenses_lib import distributed
from defenses_lib.defenses.baselines import CrossEntropy, PGDAdversarialLoss
from defenses_lib.training import atomic_save, train


class ScaledCrossEntropy(nn.Module):
    """Cross-entropy of logits times a learned scale: a loss with a parameter of its own."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, model, x, y):
        return F.cross_entropy(model(x) * self.scale, y)


def trained(loss_name: str) -> dict:
    """Train for 2 epochs of 6 batches (5 of 20, 1 of 5); the model's and the loss's final state."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(105, 1, 12, 12, generator=g), torch.randint(0, 3, (105,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 3))
    loss = LOSSES[loss_name]()
    train(model, TensorDataset(x, y), loss, epochs=2, batch_size=20, optimizer="sgd", lr=0.5,
          loss_lr=0.1 if list(loss.parameters()) else None, device="cpu", show_progress=False)
    return {"model": model.state_dict(), "loss": loss.state_dict()}


LOSSES = {"cross-entropy": CrossEntropy,
          "PGD-AT (zero start)": lambda: PGDAdversarialLoss(0.1, 2, 0.05, random_start=False),
          "learned scale": ScaledCrossEntropy}


if __name__ == "__main__":
    states = {name: trained(name) for name in LOSSES}
    if distributed.is_main():
        atomic_save({"world_size": distributed.world_size(), "states": states}, sys.argv[1])
