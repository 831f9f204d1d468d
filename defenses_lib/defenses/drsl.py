"""DRSL (Wang et al. 2023): a loss that suppresses the diversity of the softmax over the wrong classes.

    L = a * CE(z, y) + b * spread(z, y),   spread = variance over j != y of the wrong-class values

* ``wrong_class_spread``: the per-sample diagnostic the paper is built on; in ``"logit"`` space (the
  authors' choice) it is the same for the logits and for the log-softmax, which differ by a
  per-row constant; in ``"prob"`` space it is the variance of the softmax probabilities.
* ``DRSLLoss``: the loss, in a per-sample mean form whose strength does not depend on the batch size
  (``reduction="mean"``, the default), or as the authors code it (``"batch_sum"``: the sum over the
  batch of the summed squared deviations, b = 0.001).
* ``clean_scores`` and ``success_correlations``: the per-image scores of the paper's premise and how
  well each predicts an attack's success.
* ``drsl_losses`` and ``build``: chapter 5's recipe (cross-entropy, DRSL at each b of the sweep,
  PGD-AT), one network each from the same initial weights, data and schedule.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..attacks import eval_mode
from ..checks import check_choice
from ..config import Configured
from ..stats import Estimate, auc, fisher_interval, partial_spearman, spearman_interval
from ..training import train_each
from .base import Defense, select
from .baselines import CrossEntropy, PGDAdversarialLoss

SPACES = ("logit", "prob")
REDUCTIONS = ("mean", "batch_sum")
CENTERS = ("wrong", "authors")


def _values(logits: torch.Tensor, y: torch.Tensor, space: str) -> torch.Tensor:
    """The logits or their softmax, after checking the space and the shapes."""
    check_choice("space", space, SPACES)
    if logits.dim() != 2 or y.shape != (logits.shape[0],):
        raise ValueError(f"logits must have shape (N, K) and y shape (N,), got {tuple(logits.shape)} and "
                         f"{tuple(y.shape)}")
    return logits if space == "logit" else logits.softmax(1)


def wrong_class_values(logits: torch.Tensor, y: torch.Tensor, space: str = "logit") -> torch.Tensor:
    """The (N, K-1) values of the wrong classes: logits (``"logit"``) or softmax probabilities (``"prob"``)."""
    values = _values(logits, y, space)
    keep = ~F.one_hot(y, logits.shape[1]).bool()
    return values[keep].view(len(y), -1)


def wrong_class_spread(logits: torch.Tensor, y: torch.Tensor, space: str = "logit") -> torch.Tensor:
    """Per sample: the (population) variance of the wrong-class values, the paper's "diversity"."""
    return wrong_class_values(logits, y, space).var(1, unbiased=False)


def squared_deviations(logits: torch.Tensor, y: torch.Tensor, space: str = "logit",
                       center: str = "wrong") -> torch.Tensor:
    """Per sample: the sum over the wrong classes of (value - centre)^2.

    ``center="wrong"``: the mean of the K-1 wrong-class values (the authors'
    ``NewLoss``), so the sum is (K-1) times the variance. ``"authors"``: their class
    ``DRSL``, which divides the wrong-class sum by K; the sum then also grows with the
    wrong-class mean, (K-1) (mean / K)^2 more, and in logit space no longer equals
    its log-softmax value.
    """
    check_choice("center", center, CENTERS)
    values = _values(logits, y, space)
    k = logits.shape[1]
    # a mask rather than an index: no host sync in a training step
    wrong = 1.0 - F.one_hot(y, k).to(values.dtype)
    c = (values * wrong).sum(1, keepdim=True) / (k - 1 if center == "wrong" else k)
    return ((values - c) ** 2 * wrong).sum(1)


class DRSLLoss(Configured, nn.Module):
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

    def penalty(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The spread term before the factor b, reduced over the batch."""
        dev = squared_deviations(logits, y, self.space, self.center)
        if self.reduction == "mean":
            return dev.mean() / (logits.shape[1] - 1)
        return dev.sum()

    def forward(self, model, x, y):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return self.a * ce + self.b * self.penalty(logits, y)


def drsl_losses(P) -> dict[str, nn.Module]:
    """Chapter 5's losses: "CE", "DRSL" (the profile's a and b), "DRSL b=..." for the rest of the
    sweep, and "PGD-AT"."""
    def drsl(b):
        return DRSLLoss(P.ce_weight, b, space=P.space, reduction=P.reduction, center=P.center)

    losses = {"CE": CrossEntropy(), "DRSL": drsl(P.spread_weight)}
    losses.update({f"DRSL b={b:g}": drsl(b) for b in P.spread_weight_sweep if b != P.spread_weight})
    losses["PGD-AT"] = PGDAdversarialLoss(P.train_eps, steps=P.train_steps, alpha=P.train_step)
    return losses


def build(P, train_set, device=None, names=None) -> dict[str, Defense]:
    """Chapter 5's models (each of ``names`` only), one network per loss of :func:`drsl_losses`."""
    losses = drsl_losses(P)
    chosen = {n: losses[n] for n in select(losses, names)}
    trained = train_each(P, train_set, chosen, chapter="drsl", epochs=P.epochs, device=device)
    return {n: Defense(n, t.model, [t], chapter="drsl") for n, t in trained.items()}


@torch.no_grad()
def clean_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: the wrong-class softmax variance, the wrong-class log-softmax variance and the
    clean margin (true logit minus the best wrong one)."""
    with eval_mode(model):
        logits = model(x)
    true = logits.gather(1, y[:, None]).squeeze(1)
    margin = true - logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return {"softmax variance": wrong_class_spread(logits, y, "prob"),
            "log-softmax variance": wrong_class_spread(logits, y, "logit"), "clean margin": margin}


def success_correlations(scores: dict[str, torch.Tensor], success: torch.Tensor, control: str = "clean margin",
                         draws: int = 1_000, seed: int = 0) -> dict[str, dict]:
    """How well each clean score predicts attack success: Spearman's r with a bootstrap interval, the
    AUC, and the partial Spearman r once ``control`` is accounted for, with Fisher's interval."""
    out = {}
    for name, s in scores.items():
        row = {"Spearman r": spearman_interval(s.numpy(), success.numpy(), draws, seed=seed),
               "AUC": auc(s.numpy(), success.numpy())}
        if name != control:
            r = partial_spearman(s.numpy(), success.numpy(), scores[control].numpy())
            low, high = fisher_interval(r, len(s), controls=1)
            row[f"partial r | {control}"] = Estimate(r, low, high, len(s), "Fisher z", scale=1.0, digits=3)
        out[name] = row
    return out
