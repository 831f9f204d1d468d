"""ARMOR_D (Birrell and Ebrahimi 2023): adversarial training as distributionally robust optimisation
over an optimal-transport-regularized divergence (REFERENCE.md section 003).

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
* ``armor_losses`` and ``binary_losses``: chapter 4's recipes (natural, FGSM-AT, PGD-AT and ARMOR_D;
  natural, rFGSM^k-AT and ARMOR_D on binary features), trained by ``training.train_models``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from ..attacks import rfgsm_k, signed_ascent
from ..checks import check_choice
from ..training import CrossEntropy, PGDAdversarialLoss

DIVERGENCES = ("kl", "alpha")
DOMAINS = ("continuous", "binary")
POSITIVITY = ("softplus", "reset")


class TransportCost:
    """The transport cost c(x, x') = L * ||x - x'||_p^q, one value per example (inputs flattened)."""

    def __init__(self, weight: float, p: float = 2.0, q: float = 1.0):
        if not (weight >= 0 and p >= 1 and q > 0):
            raise ValueError(f"need weight >= 0, p >= 1 (or inf) and q > 0, got weight={weight}, p={p}, q={q}")
        self.weight, self.p, self.q = weight, p, q

    def __repr__(self) -> str:
        return f"TransportCost(weight={self.weight}, p={self.p}, q={self.q})"

    def __call__(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.linalg.vector_norm((x_adv - x).flatten(1), ord=self.p, dim=1) ** self.q


def f_star_alpha(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """The convex conjugate of the alpha-divergence's f, as the authors code it:
    alpha^-1 (alpha-1)^(alpha/(alpha-1)) max(t, 0)^(alpha/(alpha-1)) + 1 / (alpha (alpha-1))."""
    e = alpha / (alpha - 1)
    return (alpha - 1) ** e / alpha * F.relu(t) ** e + 1 / (alpha * (alpha - 1))


class ArmorLoss(nn.Module):
    """ARMOR_D's training loss: the OT-regularized divergence dual with learned lambda (and nu).

    ``lambda`` is kept positive either as softplus of a free parameter (``positivity="softplus"``,
    the book's default) or, as in the authors' code, as a free parameter reset to
    softplus_beta(lambda) whenever a step makes it negative (``"reset"``). ``t`` > 0 mixes in the
    natural cross-entropy: ``t * CE(x) + (1 - t) * ARMOR_D`` (the authors' "adv_s + nat"). ``lr`` is
    the Adam learning rate of lambda and nu that ``train_models`` uses (the authors' ``loss_learning_rate``).
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

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, cost={self.cost}, divergence={self.divergence!r}, alpha={self.alpha}, "
                f"steps={self.steps}, step_size={self.step_size}, t={self.t}, clip={self.clip}, "
                f"domain={self.domain!r}, positivity={self.positivity!r}, lr={self.lr}")

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
        """The divergence's dual objective given the per-example inner values s_i and lambda."""
        if self.divergence == "kl":
            return self.eps * lam + lam * (torch.logsumexp(s, 0) - math.log(len(s)))
        return self.eps * lam + self.nu + lam * f_star_alpha(s - self.nu / lam, self.alpha).mean()

    def transport(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The inner maximiser: x' maximising loss(x', y) / lambda - c(x, x'), lambda held fixed."""
        lam = self.lam.detach()

        def objective(z):
            return F.cross_entropy(model(z), y, reduction="none") / lam - self.cost(x, z)

        if self.domain == "binary":
            return rfgsm_k(model, x, y, self.steps, self.step_size, objective=objective)
        return signed_ascent(objective, x, self.steps, self.step_size, clip=self.clip, model=model)

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

    def sample_weights(self, losses: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
        """The implicit weight of each example in the robust objective: n * d(dual) / d(loss_i) (mean 1 for KL).

        For KL it is n * softmax(s)_i: the adversary re-weights towards the examples with the
        highest transported loss. For the alpha-divergence, f*'(s_i - nu / lambda).
        """
        losses = losses.detach().clone().requires_grad_(True)
        lam = self.lam.detach()
        with torch.enable_grad():
            grad, = torch.autograd.grad(self.dual(losses / lam - costs.detach(), lam), losses)
        return len(losses) * grad


class RFGSMAdversarialLoss(nn.Module):
    """Adversarial training on binary features (SLEIPNIR's rFGSM^k baseline): cross-entropy on rFGSM^k examples."""

    def __init__(self, steps: int = 50, step_size: float = 0.02):
        super().__init__()
        self.steps, self.step_size = steps, step_size

    def extra_repr(self) -> str:
        return f"steps={self.steps}, step_size={self.step_size}"

    def forward(self, model, x, y):
        return F.cross_entropy(model(rfgsm_k(model, x, y, self.steps, self.step_size)), y)


def binary_losses(P) -> dict[str, nn.Module]:
    """Chapter 4's binary-feature losses: natural, rFGSM^k adversarial training and ARMOR_D with rFGSM^k-style transport."""
    B = P.binary
    armor = dict(B["armor"], steps=B["train_steps"], step_size=B["train_step_size"])
    return {"natural": CrossEntropy(), "rFGSM^k-AT": RFGSMAdversarialLoss(B["train_steps"], B["train_step_size"]),
            "ARMOR_D": armor_loss(armor, domain="binary", positivity=P.armor_positivity)}


def armor_losses(P) -> dict[str, nn.Module]:
    """Chapter 4's MNIST training losses from a profile: natural, FGSM-AT, PGD-AT and the ARMOR_D variants."""
    losses = {"natural": CrossEntropy(),
              "FGSM-AT": PGDAdversarialLoss(P.train_eps, steps=1, alpha=P.train_eps, random_start=False),
              "PGD-AT": PGDAdversarialLoss(P.train_eps, steps=P.pgd_steps, alpha=P.pgd_alpha)}
    for name, v in P.armor.items():
        losses[name] = armor_loss(v, clip=P.armor_clip, positivity=P.armor_positivity)
    return {k: losses[k] for k in P.models}


def armor_loss(v: dict, **options) -> ArmorLoss:
    """An ``ArmorLoss`` from a hyper-parameter set (keys eps, L, p, q, divergence, steps, step_size, t, lr; alpha, beta)."""
    return ArmorLoss(v["eps"], TransportCost(v["L"], v["p"], v["q"]), divergence=v["divergence"],
                     alpha=v.get("alpha", 2.0), steps=v["steps"], step_size=v["step_size"], t=v["t"],
                     softplus_beta=v.get("beta", 1.0), lr=v["lr"], **options)
