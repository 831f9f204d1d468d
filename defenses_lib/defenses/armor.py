"""ARMOR_D (Birrell and Ebrahimi 2023): adversarial training as distributionally robust optimisation
over an optimal-transport-regularized divergence.

The adversary may move the data distribution P_n to any Q with D^c(Q || P_n) <= eps, where
D^c(Q || P) = inf_eta { D(eta || P) + C(eta, Q) } mixes an information divergence D (which
re-weights samples) with an optimal-transport cost C (which moves them). Its dual, per batch:

    s_i(lambda)   = sup_x' { loss(x', y_i) / lambda - L * ||x_i - x'||_p^q }       (``transport``)
    KL:          eps * lambda + lambda * log mean_i exp(s_i)
    alpha-div:   eps * lambda + nu + lambda * mean_i f*_alpha(s_i - nu / lambda)

minimised over the network and the scalars lambda > 0 (and nu). Labels never move.

* ``TransportCost``: L * ||x - x'||_p^q per example.
* ``ArmorLoss``: the dual above (``divergence="kl"`` or ``"alpha"``), its inner maximiser (signed
  gradient ascent without projection, as the authors do; ``clip`` keeps pixels in [0, 1]; or
  rFGSM^k-style rounding for binary features), the mix ``t * natural + (1 - t) * ARMOR_D`` and the
  implicit sample weights.
* ``RFGSMAdversarialLoss``: adversarial training on binary features with rFGSM^k (SLEIPNIR's baseline).
* ``armor_losses`` and ``binary_losses``: chapter 4's losses (natural, FGSM-AT, PGD-AT and ARMOR_D;
  natural, rFGSM^k-AT and ARMOR_D on binary features); ``build`` and ``build_binary`` train them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from ..attacks import rfgsm_k, signed_ascent
from ..checks import check_choice
from ..config import Configured
from ..training import train_each
from .base import Defense, select
from .baselines import CrossEntropy, PGDAdversarialLoss

DIVERGENCES = ("kl", "alpha")
DOMAINS = ("continuous", "binary")
POSITIVITY = ("softplus", "reset")


class TransportCost(Configured):
    """The transport cost c(x, x') = L * ||x - x'||_p^q, one value per example (inputs flattened)."""

    def __init__(self, weight: float, p: float = 2.0, q: float = 1.0):
        if not (weight >= 0 and p >= 1 and q > 0):
            raise ValueError(f"need weight >= 0, p >= 1 (or inf) and q > 0, got weight={weight}, p={p}, q={q}")
        self.weight, self.p, self.q = weight, p, q

    def __call__(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.linalg.vector_norm((x_adv - x).flatten(1), ord=self.p, dim=1) ** self.q


def f_star_alpha(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """The convex conjugate of the alpha-divergence's f, as the authors code it:
    alpha^-1 (alpha-1)^(alpha/(alpha-1)) max(t, 0)^(alpha/(alpha-1)) + 1 / (alpha (alpha-1))."""
    e = alpha / (alpha - 1)
    return (alpha - 1) ** e / alpha * F.relu(t) ** e + 1 / (alpha * (alpha - 1))


class ArmorLoss(Configured, nn.Module):
    """ARMOR_D's training loss: the OT-regularized divergence dual with learned lambda (and nu).

    ``lambda`` is kept positive either as softplus of a free parameter (``positivity="softplus"``,
    the book's default) or, as in the authors' code, as a free parameter reset to
    softplus_beta(lambda) whenever a step makes it negative (``"reset"``). ``t`` > 0 mixes in the
    natural cross-entropy: ``t * CE(x) + (1 - t) * ARMOR_D`` (the authors' "adv_s + nat"). ``lr`` is
    the Adam learning rate of lambda and nu that ``training.train_each`` uses (the authors' ``loss_learning_rate``).
    """

    def __init__(self, eps: float, cost: TransportCost, divergence: str = "kl", alpha: float = 2.0,
                 steps: int = 20, step_size: float = 0.01, t: float = 0.0, clip: bool = False,
                 domain: str = "continuous", positivity: str = "softplus", softplus_beta: float = 1.0,
                 lam_init: float = 1.0, nu_init: float = 1.0, lr: float | None = None):
        super().__init__()
        check_choice("divergence", divergence, DIVERGENCES)
        check_choice("domain", domain, DOMAINS)
        check_choice("positivity", positivity, POSITIVITY)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        if divergence == "alpha" and not alpha > 1:
            raise ValueError(f"alpha must be > 1, got {alpha}")
        if not (0 <= t <= 1) or lam_init <= 0:
            raise ValueError(f"need 0 <= t <= 1 and lam_init > 0, got t={t}, lam_init={lam_init}")
        self.eps, self.cost, self.divergence, self.alpha = eps, cost, divergence, alpha
        self.steps, self.step_size, self.t, self.clip, self.domain = steps, step_size, t, clip, domain
        self.positivity, self.softplus_beta, self.lr = positivity, softplus_beta, lr
        raw = math.log(math.expm1(lam_init)) if positivity == "softplus" else lam_init
        self.raw_lam = nn.Parameter(torch.tensor(float(raw)))
        self.nu = nn.Parameter(torch.tensor(float(nu_init))) if divergence == "alpha" else None

    @property
    def lam(self) -> torch.Tensor:
        """lambda > 0, the dual variable of the divergence budget eps (differentiable)."""
        if self.positivity == "softplus":
            return F.softplus(self.raw_lam)
        if self.raw_lam.item() <= 0:  # the authors' failsafe, applied in place so lambda keeps training
            with torch.no_grad():
                self.raw_lam.copy_(F.softplus(self.raw_lam, beta=self.softplus_beta))
        return self.raw_lam

    def dual(self, s: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The divergence's dual objective given the inner values s_i and lambda."""
        if self.divergence == "kl":
            return self.eps * lam + lam * (torch.logsumexp(s, 0) - math.log(len(s)))
        f_star = f_star_alpha(s - self.nu / lam, self.alpha)
        return self.eps * lam + self.nu + lam * f_star.mean()

    def transport(self, model: nn.Module, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
        """The inner maximiser: x' maximising loss(x', y) / lambda - c(x, x')."""
        lam = self.lam.detach()   # held fixed during the ascent

        def objective(z):
            loss = F.cross_entropy(model(z), y, reduction="none")
            return loss / lam - self.cost(x, z)

        steps, size = self.steps, self.step_size
        if self.domain == "binary":
            return rfgsm_k(model, x, y, steps, size, objective=objective)
        return signed_ascent(objective, x, steps, size, clip=self.clip, model=model)

    def scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """(x', per-example losses at x', s_i = loss / lambda - cost), differentiable in the model and lambda."""
        x_adv = self.transport(model, x, y)
        losses = F.cross_entropy(model(x_adv), y, reduction="none")
        return x_adv, losses, losses / self.lam - self.cost(x, x_adv)

    def forward(self, model, x, y):
        _, _, s = self.scores(model, x, y)
        robust = self.dual(s, self.lam)
        if self.t == 0:
            return robust
        return self.t * F.cross_entropy(model(x), y) + (1 - self.t) * robust

    def sample_weights(self, losses: torch.Tensor,
                       costs: torch.Tensor) -> torch.Tensor:
        """Each example's implicit weight in the robust objective, n * d(dual) / d(loss_i).

        For KL it is n * softmax(s)_i (mean 1): the adversary re-weights towards the
        examples with the highest transported loss. For the alpha-divergence,
        f*'(s_i - nu / lambda).
        """
        losses = losses.detach().clone().requires_grad_(True)
        lam = self.lam.detach()
        with torch.enable_grad():
            dual = self.dual(losses / lam - costs.detach(), lam)
            grad, = torch.autograd.grad(dual, losses)
        return len(losses) * grad

    def diagnostics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 100) -> "TransportDiagnostics":
        """The inner maximiser and the implicit weights on (x, y), in training-sized batches."""
        parts = [self._batch_diagnostics(model, x[i:i + batch_size], y[i:i + batch_size])
                 for i in range(0, len(x), batch_size)]
        return TransportDiagnostics(x, *(torch.cat(p) for p in zip(*parts)), self.lam.item())

    def _batch_diagnostics(self, model, x, y) -> tuple[torch.Tensor, ...]:
        """One batch's transported x', losses before and after, costs and implicit weights."""
        x_tr = self.transport(model, x, y)
        with torch.no_grad():
            before = F.cross_entropy(model(x), y, reduction="none")
            after = F.cross_entropy(model(x_tr), y, reduction="none")
        cost = self.cost(x, x_tr).detach()
        return x_tr, before, after, cost, self.sample_weights(after, cost)


@dataclass
class TransportDiagnostics:
    """What ARMOR_D's adversary does to a set of samples: where it moves them and how it weighs them."""

    x: torch.Tensor
    x_transported: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    cost: torch.Tensor
    weights: torch.Tensor   # implicit weight per sample in the robust objective (mean 1 for KL)
    lam: float

    @property
    def moved(self) -> torch.Tensor:
        """x' - x, flattened per sample."""
        return (self.x_transported - self.x).flatten(1)

    def top_share(self, fraction: float = 0.1) -> float:
        """The share of the total weight held by the heaviest ``fraction`` of the samples."""
        top = self.weights.sort(descending=True).values
        return (top[:max(1, int(len(top) * fraction))].sum() / top.sum()).item()

    @property
    def effective_size(self) -> float:
        """Kish's effective sample size of the weights, as a fraction of the samples."""
        w = self.weights
        return (w.sum() ** 2 / (w ** 2).sum() / len(w)).item()

    def summary(self) -> str:
        """The numbers a reader looks at, in two lines."""
        d = self.moved
        outside = ((self.x_transported < 0) | (self.x_transported > 1)).float().mean()
        return (f"lambda = {self.lam:.3f}; moved by l_inf {d.abs().amax(1).mean():.3f} on average "
                f"(l_2 {d.norm(dim=1).mean():.2f}), cost {self.cost.mean():.4f}, "
                f"{100 * outside:.0f}% of pixels outside [0, 1]\n"
                f"loss {self.loss_before.mean():.3f} before transport, {self.loss_after.mean():.3f} after; "
                f"weights {self.weights.min():.2f} to {self.weights.max():.2f}, the top 10% hold "
                f"{100 * self.top_share():.0f}% of the weight; effective size {100 * self.effective_size:.0f}%")


class UniformArmorLoss(ArmorLoss):
    """The re-weighting ablation of ARMOR_D: the same transport and the same lambda (and nu), learned on
    the same dual, but the network trains on the transported losses with equal weights, as adversarial
    training does. Against :class:`ArmorLoss` it tells whether ARMOR_D's gain comes from the re-weighting
    or from the transport."""

    def forward(self, model, x, y):
        x_adv, losses, s = self.scores(model, x, y)
        cost = self.cost(x, x_adv).detach()
        dual = self.dual(losses.detach() / self.lam - cost, self.lam)   # trains lambda (and nu) only
        robust = losses.mean() + dual - dual.detach()                  # its value: the transported loss
        if self.t == 0:
            return robust
        return self.t * F.cross_entropy(model(x), y) + (1 - self.t) * robust

    def sample_weights(self, losses: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
        """Every example weighs 1."""
        return torch.ones_like(losses)


class RFGSMAdversarialLoss(Configured, nn.Module):
    """Adversarial training on binary features (SLEIPNIR's rFGSM^k baseline): cross-entropy on rFGSM^k examples."""

    def __init__(self, steps: int = 50, step_size: float = 0.02):
        super().__init__()
        self.steps, self.step_size = steps, step_size

    def forward(self, model, x, y):
        return F.cross_entropy(model(rfgsm_k(model, x, y, self.steps, self.step_size)), y)


def binary_losses(P) -> dict[str, nn.Module]:
    """Chapter 4's binary-feature losses: natural, rFGSM^k adversarial training and ARMOR_D with
    rFGSM^k-style transport (its ascent: the binary study's training steps)."""
    B = P.binary
    armor = B.armor.replace(ascent_steps=B.train_steps, ascent_step=B.train_step)
    return {"natural": CrossEntropy(), "rFGSM^k-AT": RFGSMAdversarialLoss(B.train_steps, B.train_step),
            "ARMOR_D": armor_loss(armor, domain="binary", positivity=P.armor_positivity)}


def armor_losses(P) -> dict[str, nn.Module]:
    """Chapter 4's MNIST training losses by name, those of ``P.models``: natural, FGSM-AT, PGD-AT, the
    ARMOR_D variants of ``P.armor``, and two ablations: each variant with uniform sample weights
    ("<variant> uniform") and PGD-AT at ``P.matched_eps``, the radius ARMOR_D's ascent reaches ("PGD-AT
    matched", its step scaled with the budget)."""
    matched_step = P.train_step * P.matched_eps / P.train_eps
    losses = {"natural": CrossEntropy(),
              "FGSM-AT": PGDAdversarialLoss(P.train_eps, steps=1, alpha=P.train_eps, random_start=False),
              "PGD-AT": PGDAdversarialLoss(P.train_eps, steps=P.train_steps, alpha=P.train_step),
              "PGD-AT matched": PGDAdversarialLoss(P.matched_eps, steps=P.train_steps, alpha=matched_step)}
    for name, v in P.armor.items():
        losses[name] = armor_loss(v, clip=P.armor_clip, positivity=P.armor_positivity)
        losses[f"{name} uniform"] = armor_loss(v, UniformArmorLoss, clip=P.armor_clip, positivity=P.armor_positivity)
    unknown = [m for m in P.models if m not in losses]
    if unknown:
        raise ValueError(f"models must be among {list(losses)}, got {unknown}")
    return {k: losses[k] for k in P.models}


def armor_loss(v, kind: type = ArmorLoss, **options) -> ArmorLoss:
    """An ``ArmorLoss`` (or the ``kind`` given, a subclass) from one ``profiles.ArmorVariant``."""
    return kind(v.budget, TransportCost(v.cost_weight, v.cost_norm, v.cost_power), divergence=v.divergence,
                alpha=v.order, steps=v.ascent_steps, step_size=v.ascent_step, t=v.natural_weight,
                softplus_beta=v.softplus_beta, lr=v.dual_lr, **options)


def build(P, train_set, device=None, names=None) -> dict[str, Defense]:
    """Chapter 4's MNIST models (``P.models``, each of ``names`` only); an ARMOR_D model's trained
    loss, with its lambda (and nu), is its training's ``loss``."""
    losses = armor_losses(P)
    chosen = {n: losses[n] for n in select(losses, names)}
    trained = train_each(P, train_set, chosen, chapter="armor", epochs=P.epochs, device=device)
    return {n: Defense(n, t.model, [t], chapter="armor") for n, t in trained.items()}


def build_binary(P, train_set, device=None, names=None) -> dict[str, Defense]:
    """Chapter 4's binary-feature models on a binarised training set."""
    B = P.binary
    losses = binary_losses(P)
    chosen = {n: losses[n] for n in select(losses, names)}
    trained = train_each(P, train_set, chosen, chapter="armor-binary", arch=B.arch, epochs=B.epochs,
                         device=device, optimizer=B.optimizer, lr=B.lr, milestones=())
    return {n: Defense(n, t.model, [t], chapter="armor") for n, t in trained.items()}
