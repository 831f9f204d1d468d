"""Ensembles of sub-models (paper 1, Zhao et al. 2024) and the losses that train them.

``Ensemble`` averages its members' softmax and returns log-probabilities, so every attack and
AutoAttack see exactly what the defense predicts. The losses plug into ``training.train``:

* ``IndependentLoss``: each member's cross-entropy, nothing shared (the plain baseline);
* ``GALLoss``: plus GAL's penalty on aligned input gradients (Kariyappa and Qureshi, 2019);
* ``DLCLoss``: plus low curvature per member and dispersion of the members' Hessian-vector
  products (the paper's idea; the paper gives no formula, so the objective here is a
  reconstruction from CURE's curvature term and TRS's cosine term; every choice is a named option).
* ``build``: chapter 1's recipe (independent pre-training, then fine-tuning with each loss).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from ..attacks import log_mean_softmax
from ..config import Configured
from ..curvature import direction, hvp_fd, loss_and_gradient
from ..models import build_model
from ..runtime import seed_everything
from ..training import fit
from .base import Defense, select


class Ensemble(nn.Module):
    """The members' softmax averaged, as log-probabilities."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(self.members)}")

    def forward(self, x):
        return log_mean_softmax(torch.stack([m(x) for m in self.members]))


def pairwise_cos(vectors: list[torch.Tensor], absolute: bool = True) -> torch.Tensor:
    """Per example, the mean over member pairs of the cosine (or |cosine|) between their vectors."""
    cos = [F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)
           for a, b in itertools.combinations(vectors, 2)]
    cos = torch.stack(cos)
    return (cos.abs() if absolute else cos).mean(0)


def mean_pairwise_cos(vectors: list[torch.Tensor], absolute: bool = True) -> torch.Tensor:
    """Mean over member pairs and examples of the cosine (or |cosine|) between per-example vectors."""
    return pairwise_cos(vectors, absolute).mean()


class IndependentLoss(Configured, nn.Module):
    """The sum of the members' cross-entropies: members trained side by side, independently."""

    def forward(self, model: Ensemble, x, y):
        return sum(F.cross_entropy(m(x), y) for m in model.members)


class GALLoss(Configured, nn.Module):
    """Members' cross-entropy + coeff * log sum over pairs of exp(cos of their input gradients) (GAL)."""

    def __init__(self, coeff: float = 0.5):
        super().__init__()
        self.coeff = coeff

    def forward(self, model: Ensemble, x, y):
        parts = [loss_and_gradient(m, x, y) for m in model.members]
        cos = [F.cosine_similarity(a[1].flatten(1), b[1].flatten(1), dim=1, eps=1e-12).mean()
               for a, b in itertools.combinations(parts, 2)]
        return sum(loss.mean() for loss, _ in parts) + self.coeff * torch.logsumexp(torch.stack(cos), 0)


class DLCLoss(Configured, nn.Module):
    """Dispersed low-curvature ensemble loss (reconstructed objective of Zhao et al., 2024).

    sum_m CE_m + alpha * mean_m ||H_m z||^2 + beta * mean_pairs |cos(H_m z, H_n z)|
               [+ gamma * mean_pairs |cos(g_m, g_n)|]

    with H_m z the finite-difference Hessian-vector product of member m. Named options:
    ``direction`` ('sign': CURE's normalised gradient sign; 'random'), ``shared_direction`` (one z
    for all members, from the sign of the summed members' gradients, so the cosine compares
    responses to the same step; else each member's own), ``abs_cos`` (penalise |cos| as TRS does,
    else the signed cosine), ``gamma`` (TRS-style first-order gradient term; 0 turns it off) and
    ``h`` (a float, or a per-epoch schedule that the training loop advances through ``set_epoch``).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, h=0.1, direction: str = "sign",
                 shared_direction: bool = True, abs_cos: bool = True, gamma: float = 0.0):
        super().__init__()
        self.schedule = list(h) if isinstance(h, (list, tuple)) else [float(h)]
        if min(self.schedule) <= 0:
            raise ValueError(f"h must be > 0, got {h}")
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.direction, self.shared_direction, self.abs_cos = direction, shared_direction, abs_cos
        self.h = self.schedule[0]

    def set_epoch(self, epoch: int) -> None:
        """Use the schedule's h for this epoch (the last one after the schedule ends)."""
        self.h = self.schedule[min(epoch, len(self.schedule) - 1)]

    def responses(self, model: Ensemble, x, y, create_graph: bool = True):
        """Each member's per-example losses, input gradients g_m and FD-HVPs H_m z."""
        parts = [loss_and_gradient(m, x, y, create_graph) for m in model.members]
        grads = [g for _, g in parts]
        if self.shared_direction:   # one z, from the sign of the summed gradients
            shared = direction(sum(g.detach() for g in grads), self.direction)
            zs = [shared] * len(grads)
        else:
            zs = [direction(g, self.direction) for g in grads]
        hvps = [hvp_fd(m, x, y, z, self.h, create_graph=create_graph, grad=g)
                for m, z, g in zip(model.members, zs, grads)]
        return [loss for loss, _ in parts], grads, hvps

    def terms(self, model: Ensemble, x, y) -> dict[str, torch.Tensor]:
        """The loss's parts: cross-entropy, curvature, dispersion, first-order alignment."""
        losses, grads, hvps = self.responses(model, x, y)
        curvature = [v.flatten(1).pow(2).sum(1).mean() for v in hvps]   # ||H_m z||^2
        return {
            "ce": sum(loss.mean() for loss in losses),
            "curvature": torch.stack(curvature).mean(),
            "dispersion": mean_pairwise_cos(hvps, self.abs_cos),
            "first_order": mean_pairwise_cos(grads, True),
        }

    def alignment(self, model: Ensemble, x, y) -> dict[str, torch.Tensor]:
        """Per example, the mean |cos| over member pairs of their HVPs and of their gradients (no graph)."""
        _, grads, hvps = self.responses(model, x, y, create_graph=False)
        return {"|cos| of HVPs": pairwise_cos(hvps).detach(), "|cos| of gradients": pairwise_cos(grads).detach()}

    def forward(self, model: Ensemble, x, y):
        t = self.terms(model, x, y)
        loss = t["ce"] + self.alpha * t["curvature"] + self.beta * t["dispersion"]
        return loss + self.gamma * t["first_order"] if self.gamma else loss


def ensemble_losses(P) -> dict[str, nn.Module]:
    """The chapter's three fine-tuning losses, built from a profile of the ``ensembles`` chapter."""
    return {
        "independent": IndependentLoss(),
        "GAL": GALLoss(P.gal_coeff),
        "DLC": DLCLoss(alpha=P.dlc_curvature_weight, beta=P.dlc_dispersion_weight, h=list(P.dlc_h),
                       direction=P.dlc_direction, shared_direction=P.dlc_shared, abs_cos=P.dlc_abs,
                       gamma=P.dlc_gradient_weight),
    }


def build(P, train_set, device=None, names=None) -> dict[str, Defense]:
    """Chapter 1's recipe: pre-train P.members members independently, then fine-tune a copy with
    each loss (each of ``names`` only). The ensembles differ only in the fine-tuning loss; the
    pre-trained ensemble itself is "pre-trained"."""
    losses = ensemble_losses(P)
    chosen = select({"pre-trained": None, **losses}, names)
    recipe = dict(dataset=P.dataset, n_train=len(train_set), data_seed=P.seed)
    seed_everything(P.seed)   # the members' initial weights differ from each other but not from run to run
    pre = Ensemble([build_model(P.arch, P.dataset) for _ in range(P.members)])
    first = fit(pre, train_set, IndependentLoss(), chapter="ensembles", name="pre-trained", recipe=recipe,
                epochs=P.epochs_pretrain, device=device, **P.schedule())
    out = {"pre-trained": Defense("pre-trained", first.model, [first], chapter="ensembles")}
    init = dict(recipe, pretrained=Path(first.record["checkpoint"]).name)  # names the starting point
    for name in chosen:
        if name != "pre-trained":
            t = fit(copy.deepcopy(first.model), train_set, losses[name], chapter="ensembles", name=name,
                    recipe=init, epochs=P.epochs_finetune, device=device, **dict(P.schedule(), seed=P.seed + 1))
            out[name] = Defense(name, t.model, [first, t], chapter="ensembles")
    return {n: out[n] for n in chosen}
