"""Chapter 0's baselines: standard training, PGD adversarial training (Madry et al.) and TRADES
(Zhang et al.), as losses for ``training.train`` and as defenses built from a profile.

* ``CrossEntropy``: cross-entropy on clean inputs.
* ``PGDAdversarialLoss``: cross-entropy on PGD examples made against the current model
  (``steps=1, alpha=eps, random_start=False`` is FGSM adversarial training).
* ``TradesLoss``: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL in the l_inf ball.
* ``build``: the three trained models of a ``foundations`` profile, as defenses.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..attacks import attack_mode, check_eps, pgd, project
from ..config import Configured
from ..training import train_each
from .base import Defense, select


class CrossEntropy(Configured, nn.Module):
    """Standard training: cross-entropy on clean inputs."""

    def forward(self, model, x, y):
        return F.cross_entropy(model(x), y)


class PGDAdversarialLoss(Configured, nn.Module):
    """Madry et al.'s adversarial training: cross-entropy on PGD examples made against the current model.

    ``steps=1, alpha=eps, random_start=False`` is FGSM adversarial training (Goodfellow et al.).
    """

    def __init__(self, eps: float, steps: int = 7, alpha: float | None = None, norm: str = "linf",
                 random_start: bool = True):
        super().__init__()
        check_eps(eps, norm)
        self.eps, self.steps, self.alpha, self.norm, self.random_start = eps, steps, alpha, norm, random_start

    def forward(self, model, x, y):
        x_adv = pgd(model, x, y, self.eps, self.alpha, self.steps, self.norm,
                    random_start=self.random_start, early_stop=False)
        return F.cross_entropy(model(x_adv), y)


class TradesLoss(Configured, nn.Module):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL in the l_inf ball."""

    def __init__(self, eps: float, beta: float = 6.0, steps: int = 7, alpha: float | None = None):
        super().__init__()
        check_eps(eps)
        self.eps, self.beta, self.steps = eps, beta, steps
        self.alpha = 2.5 * eps / steps if alpha is None else alpha

    def adversary(self, model, x):
        """The KL-maximising x' (TRADES' inner problem), from x + 0.001 * noise."""
        with attack_mode(model):
            p_clean = F.softmax(model(x), 1).detach()
            x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                log_p = F.log_softmax(model(x_adv), 1)
                kl = F.kl_div(log_p, p_clean, reduction="sum")
                grad, = torch.autograd.grad(kl, x_adv)
                step = x_adv.detach() + self.alpha * grad.sign()
                x_adv = project(step, x, self.eps, "linf")
        return x_adv

    def forward(self, model, x, y):
        x_adv = self.adversary(model, x)
        logits = model(x)
        log_p_adv = F.log_softmax(model(x_adv), 1)
        kl = F.kl_div(log_p_adv, F.softmax(logits, 1), reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * kl


def losses(P) -> dict[str, nn.Module]:
    """The three training losses of a ``foundations`` profile."""
    at = dict(steps=P.train_steps, alpha=P.train_step)
    return {"standard": CrossEntropy(), "PGD-AT": PGDAdversarialLoss(P.train_eps, **at),
            "TRADES": TradesLoss(P.train_eps, beta=P.trades_weight, **at)}


def build(P, train_set, device=None, names=None) -> dict[str, Defense]:
    """Standard training, PGD-AT and TRADES (each of ``names`` only), from the same initial weights."""
    chosen = losses(P)
    out = {}
    for name in select(chosen, names):
        epochs = P.epochs_standard if name == "standard" else P.epochs_at
        t = train_each(P, train_set, {name: chosen[name]}, chapter="foundations", epochs=epochs,
                       device=device)[name]
        out[name] = Defense(name, t.model, [t], chapter="foundations")
    return out
