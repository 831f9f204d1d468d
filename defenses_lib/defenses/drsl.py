"""DRSL (Wang et al. 2023): a loss that suppresses the diversity of the softmax over the wrong classes
(REFERENCE.md section 004).

    L = a * CE(z, y) + b * spread(z, y),   spread = variance over j != y of the wrong-class values

* ``wrong_class_spread``: the per-sample diagnostic the paper is built on; in ``"logit"`` space (the
  authors' choice) it is the same for the logits and for the log-softmax, which differ by a
  per-row constant; in ``"prob"`` space it is the variance of the softmax probabilities.
* ``DRSLLoss``: the loss, in a per-sample mean form whose strength does not depend on the batch size
  (``reduction="mean"``, the default), or as the authors code it (``"batch_sum"``: the sum over the
  batch of the summed squared deviations, b = 0.001).
* ``drsl_losses``: chapter 5's recipe (cross-entropy, DRSL at each b of the sweep, PGD-AT), trained
  by ``training.train_models`` on one network, data and schedule.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..checks import check_choice
from ..training import CrossEntropy, PGDAdversarialLoss

SPACES = ("logit", "prob")
REDUCTIONS = ("mean", "batch_sum")
CENTERS = ("wrong", "authors")


def _values(logits: torch.Tensor, y: torch.Tensor, space: str) -> torch.Tensor:
    """The logits or their softmax, after checking the space and the shapes."""
    check_choice("space", space, SPACES)
    if logits.dim() != 2 or y.shape != (logits.shape[0],):
        raise ValueError(f"logits must have shape (N, K) and y shape (N,), got {tuple(logits.shape)} and {tuple(y.shape)}")
    return logits if space == "logit" else logits.softmax(1)


def wrong_class_values(logits: torch.Tensor, y: torch.Tensor, space: str = "logit") -> torch.Tensor:
    """The (N, K-1) values of the wrong classes: logits (``"logit"``) or softmax probabilities (``"prob"``)."""
    values = _values(logits, y, space)
    keep = ~F.one_hot(y, logits.shape[1]).bool()
    return values[keep].view(len(y), -1)


def wrong_class_spread(logits: torch.Tensor, y: torch.Tensor, space: str = "logit") -> torch.Tensor:
    """Per sample: the (population) variance of the wrong-class values, the paper's "diversity"."""
    return wrong_class_values(logits, y, space).var(1, unbiased=False)


def squared_deviations(logits: torch.Tensor, y: torch.Tensor, space: str = "logit", center: str = "wrong") -> torch.Tensor:
    """Per sample: the sum over the wrong classes of (value - centre)^2.

    ``center="wrong"``: the mean of the K-1 wrong-class values (the authors' ``NewLoss``), so the sum
    is (K-1) times the variance. ``"authors"``: their class ``DRSL``, which divides the wrong-class sum
    by K; the sum then also grows with the wrong-class mean, (K-1) (mean / K)^2 more, and in logit
    space no longer equals its log-softmax value.
    """
    check_choice("center", center, CENTERS)
    values = _values(logits, y, space)
    k = logits.shape[1]
    wrong = 1.0 - F.one_hot(y, k).to(values.dtype)  # a mask rather than an index: no host sync in a training step
    c = (values * wrong).sum(1, keepdim=True) / (k - 1 if center == "wrong" else k)
    return ((values - c) ** 2 * wrong).sum(1)


class DRSLLoss(nn.Module):
    """a * cross-entropy + b * the spread of the wrong-class values.

    ``reduction="mean"`` (the book's default): b * the batch mean of the per-sample sum of squared
    deviations divided by K-1 (the variance, for ``center="wrong"``); its strength does not depend on
    the batch size. ``reduction="batch_sum"``: b * the sum over the batch of the per-sample sums, as in
    the authors' code (b = 0.001 there); with K classes and batch B it equals the mean form with
    b' = b * (K - 1) * B. The cross-entropy is a batch mean in both.
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, space: str = "logit", reduction: str = "mean",
                 center: str = "wrong"):
        super().__init__()
        check_choice("space", space, SPACES)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("center", center, CENTERS)
        if a < 0 or b < 0:
            raise ValueError(f"a and b must be >= 0, got a={a}, b={b}")
        self.a, self.b, self.space, self.reduction, self.center = a, b, space, reduction, center

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, space={self.space!r}, reduction={self.reduction!r}, center={self.center!r}"

    def penalty(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The spread term before the factor b, reduced over the batch."""
        dev = squared_deviations(logits, y, self.space, self.center)
        return dev.mean() / (logits.shape[1] - 1) if self.reduction == "mean" else dev.sum()

    def forward(self, model, x, y):
        logits = model(x)
        return self.a * F.cross_entropy(logits, y) + self.b * self.penalty(logits, y)


def drsl_losses(P) -> dict[str, nn.Module]:
    """Chapter 5's losses: "CE", "DRSL" (the profile's a and b), "DRSL b=..." for the rest of the sweep, "PGD-AT"."""
    def drsl(b):
        return DRSLLoss(P.a, b, space=P.space, reduction=P.reduction, center=P.center)

    losses = {"CE": CrossEntropy(), "DRSL": drsl(P.b)}
    losses.update({f"DRSL b={b:g}": drsl(b) for b in P.b_sweep if b != P.b})
    losses["PGD-AT"] = PGDAdversarialLoss(P.train_eps, steps=P.pgd_steps, alpha=P.pgd_alpha)
    return losses
