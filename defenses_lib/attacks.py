"""White-box attacks in pixel space: FGSM, PGD (l_inf and l_2) and an EOT wrapper;
unprojected signed-gradient ascent and rFGSM^k for binary features.

Conventions (those of torchattacks and RobustBench): images in [0, 1], ``eps`` in that scale, the
model returns logits (or log-probabilities) and owns its normalisation. Every attack switches the
model to eval mode and restores the mode it found; it never leaves the eps ball or [0, 1] (except
``signed_ascent`` with ``clip=False``, which has no ball by design); one
PGD step costs exactly one forward and one backward pass (plus one forward per restart when
``early_stop=False`` and ``restarts > 1``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .checks import check_choice, check_int, check_number
from . import estimate
from .runtime import draw, model_device

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "dlr")


@contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore each submodule's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def attack_mode(model: nn.Module):
    """Eval mode and no parameter gradients for the block (an attack needs only the input's); both restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def check_inputs(x: torch.Tensor, y: torch.Tensor | None = None, eps: float | None = None, norm: str | None = None):
    """Raise a clear ValueError unless x is (N, C, H, W) in [0, 1], y is (N,) and eps >= 0."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (N, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor with pixels in [0, 1], got dtype {x.dtype}")
    if len(x) == 0:
        raise ValueError(f"x must hold at least one image, got shape {tuple(x.shape)}")
    lo, hi = float(x.detach().min()), float(x.detach().max())   # NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(x.detach())).sum())
        raise ValueError(f"x must hold finite pixels in [0, 1], got {bad} NaN or infinite values")
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError("x must hold pixels in [0, 1] (normalisation belongs inside the model), "
                         f"got range [{lo:.3g}, {hi:.3g}]")
    if y is not None and (not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a tensor of shape ({x.shape[0]},) to match x, got {shape}")
    if y is not None and (y.is_floating_point() or y.is_complex()):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if eps is not None:
        check_eps(eps)
    if norm is not None:
        check_choice("norm", norm, NORMS)


_UNSET = object()


def check_eps(eps, norm=_UNSET) -> None:
    """Raise a clear ValueError unless ``eps`` is a finite number >= 0 (and ``norm``, when given, a known norm)."""
    check_number("eps", eps)
    if norm is not _UNSET:
        check_choice("norm", norm, NORMS)


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce", targeted: bool = False) -> torch.Tensor:
    """Per-example loss the attacker maximises: cross-entropy, CW margin or DLR (Croce and Hein)."""
    check_choice("loss", loss, LOSSES)
    if loss == "ce":
        out = F.cross_entropy(logits, y, reduction="none")
        return -out if targeted else out
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -torch.inf).amax(1)
    margin = (true - other) if targeted else (other - true)
    if loss == "margin":
        return margin
    top = logits.sort(1, descending=True).values
    return margin / (top[:, 0] - top[:, 2] + 1e-12)


def _l2(v: torch.Tensor) -> torch.Tensor:
    """Each example's l_2 norm (at least 1e-12), shaped to broadcast over (N, C, H, W)."""
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project onto the eps ball around x, then onto [0, 1] (staying in the ball)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2(delta)).clamp(max=1.0)
    return (x + delta).clamp(0, 1)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform random point of the eps ball (l_inf cube or l_2 ball), clipped to [0, 1]."""
    if norm == "linf":
        delta = (draw("rand", x.shape, x.device, generator) * 2 - 1) * eps
    else:
        d = draw("randn", x.shape, x.device, generator)
        d = d / _l2(d)
        r = draw("rand", x.shape[:1], x.device, generator) ** (1.0 / x[0].numel())
        delta = d * (eps * r).view(-1, 1, 1, 1)
    return (x + delta).clamp(0, 1)


def _step(grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """The steepest-ascent step of size alpha for the norm."""
    if norm == "linf":
        return alpha * grad.sign()
    return alpha * grad / _l2(grad)


def _success(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Which examples the attack has already won: misclassified, or classified as the target."""
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce") -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al.): one signed-gradient step of size eps."""
    return pgd(model, x, y, eps, alpha=eps, steps=1, norm="linf", random_start=False, loss=loss)


def is_declared_random(model: nn.Module) -> bool:
    """Whether the model declares itself randomized (``randomized = True``), as EOT and randomized defenses do."""
    return bool(getattr(model, "randomized", False))


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float | None = None,
        steps: int = 40, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        loss: str = "ce", targeted: bool = False, early_stop: bool | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) with random start and restarts.

    With ``early_stop`` each step evaluates the current iterate (one forward), keeps it and stops on
    that example if it already fools the model, and moves the others along the gradient (one
    backward); a restart attacks only the examples no earlier restart fooled. ``early_stop=False``
    runs every step on every example and keeps each example's last iterate; with restarts, the
    restart whose last iterate has the highest loss. ``early_stop`` defaults to True, and to False
    for a model that declares ``randomized = True`` (``EOT``, randomized defenses): there one noisy
    evaluation cannot tell that an example is fooled, and stopping on a lucky draw would hand the
    defense back every example that a fresh draw classifies correctly.
    With ``targeted=True``, ``y`` holds the target classes. ``alpha`` defaults to 2.5 * eps / steps.
    The attack runs on the model's device; the adversarial examples come back on x's.
    """
    check_inputs(x, y)
    check_eps(eps, norm)
    check_int("steps", steps)
    check_int("restarts", restarts)
    if alpha is not None:   # a negative step would descend the loss; zero moves only at eps = 0
        check_number("alpha", alpha, strict=eps > 0)
    early_stop = not is_declared_random(model) if early_stop is None else early_stop
    alpha = 2.5 * eps / steps if alpha is None else alpha
    home, dev = x.device, model_device(model)
    x, y = x.detach().to(dev), y.detach().to(dev)
    best = x.clone()
    best_loss = torch.full((len(x),), -torch.inf, device=x.device)
    todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
    run = estimate.cap(steps, estimate.ATTACK_STEPS)   # every step, except in estimate mode
    with attack_mode(model), estimate.stage("attacks", steps, run):
        for _ in range(restarts):
            idx = todo.nonzero().flatten()
            if len(idx) == 0:
                break
            start = _random_start(x[idx], eps, norm, generator) if random_start else x[idx].clone()
            idx, x_adv = _descend(model, start, x, y, idx, best, todo, eps, alpha, run, norm, loss, targeted,
                                  early_stop)
            if early_stop or restarts == 1:
                best[idx] = x_adv
            elif len(idx):
                _keep_higher_loss(model, x_adv, y[idx], idx, best, best_loss, loss, targeted)
    return best.detach().to(home)


def _descend(model, x_adv, x, y, idx, best, todo, eps, alpha, steps, norm, loss,
             targeted, early_stop):
    """``steps`` PGD steps on the examples ``idx`` from ``x_adv``. With ``early_stop``
    an iterate that already wins is written to ``best`` and its example leaves
    ``todo`` and the run. Returns the examples still running, their last iterates."""
    xs, ys = x[idx], y[idx]
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        hit = _success(logits.detach(), ys, targeted) & early_stop
        best[idx[hit]] = x_adv.detach()[hit]
        todo[idx[hit]] = False
        objective = attack_loss(logits, ys, loss, targeted).sum()
        grad, = torch.autograd.grad(objective, x_adv)
        x_adv = project(x_adv.detach() + _step(grad, alpha, norm), xs, eps, norm)
        idx, xs, ys, x_adv = idx[~hit], xs[~hit], ys[~hit], x_adv[~hit]
        if len(idx) == 0:
            break
    return idx, x_adv


def _keep_higher_loss(model, x_adv, ys, idx, best, best_loss, loss, targeted) -> None:
    """Keep each restart's last iterate where its loss beats the best restart's so far."""
    with torch.no_grad():
        final = attack_loss(model(x_adv), ys, loss, targeted)
    better = final > best_loss[idx]
    best[idx[better]], best_loss[idx[better]] = x_adv[better], final[better]


def signed_ascent(objective, x: torch.Tensor, steps: int, step_size: float, clip: bool = False,
                  model: nn.Module | None = None) -> torch.Tensor:
    """``steps`` signed-gradient ascent steps on a per-example ``objective(x')``, started at x, with no eps ball.

    With ``clip`` the iterate is clipped to [0, 1] after every step. ``model`` (whose ``objective``
    is evaluated) is put in eval mode for the ascent and restored afterwards, and x is moved to its
    device (the result comes back on x's).
    """
    if steps < 0 or not (math.isfinite(step_size) and step_size >= 0):
        raise ValueError(f"steps must be >= 0 and step_size a finite number >= 0, got steps={steps}, "
                         f"step_size={step_size}")
    home = x.device
    x_adv = x.detach().clone().to(model_device(model) if model is not None else home)
    with attack_mode(model) if model is not None else torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(objective(x_adv).sum(), x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = x_adv.clamp(0, 1) if clip else x_adv
    return x_adv.detach().to(home)


def check_binary(x: torch.Tensor, name: str = "x") -> None:
    """Raise a ValueError unless every entry of x is 0 or 1."""
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must be binary (every entry 0 or 1), got values in "
                         f"[{x.min().item():g}, {x.max().item():g}]")


def rfgsm_k(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 50, step_size: float = 0.02,
            objective=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """rFGSM^k on binary features (Al-Dujaili et al., SLEIPNIR): the attacker may only switch features on.

    ``steps`` signed steps clipped to [0, 1], then randomized rounding (coordinate i becomes 1 with
    probability x'_i), then OR with the original x; an example whose objective did not increase
    keeps x. ``objective(x')`` defaults to the per-example cross-entropy of ``model``.
    """
    check_inputs(x, y)
    check_binary(x)
    home, dev = x.device, model_device(model)
    x, y = x.detach().to(dev), y.to(dev)
    if objective is None:
        def objective(z):
            return F.cross_entropy(model(z), y, reduction="none")
    x_cont = signed_ascent(objective, x, steps, step_size, clip=True, model=model)
    u = draw("rand", x.shape, dev, generator)
    x_adv = torch.maximum((x_cont > u).to(x.dtype), x)
    with torch.no_grad(), eval_mode(model):
        worse = objective(x_adv) < objective(x)
    x_adv[worse] = x[worse]
    return x_adv.to(home)


def best_of(attack, runs: int):
    """Run a random attack ``runs`` times; keep, per example, the first result that fools the model (else the last)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")

    def attack_runs(model, x, y):
        dev = model_device(model)
        best = attack(model, x, y)
        for _ in range(runs - 1):
            with torch.no_grad(), eval_mode(model):
                todo = model(best.to(dev)).argmax(1).to(y.device) == y
            if not todo.any():
                break
            best[todo] = attack(model, x[todo], y[todo])
        return best

    return attack_runs


def top_k_targeted(attack, k: int):
    """A targeted attack (called with ``targeted=True``) against each of the k wrong classes the model finds
    most likely on the clean input, in that order; per example, the first result that fools the model."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")

    def attack_targets(model, x, y):
        dev = model_device(model)
        with torch.no_grad(), eval_mode(model):
            logits = model(x.to(dev)).to(x.device)
        order = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -torch.inf).argsort(1, descending=True)
        best, todo = x.clone(), torch.ones(len(x), dtype=torch.bool, device=x.device)
        for t in range(min(k, logits.shape[1] - 1)):
            idx = todo.nonzero().flatten()
            if len(idx) == 0:
                break
            best[idx] = attack(model, x[idx], order[idx, t], targeted=True)
            with torch.no_grad(), eval_mode(model):
                todo[idx[model(best[idx].to(dev)).argmax(1).to(x.device) != y[idx]]] = False
        return best

    return attack_targets


def against(target: nn.Module, attack):
    """``attack`` made against ``target`` whichever model it is called with: a weaker threat model
    (an attacker who sees only part of the defense) or a transfer attack."""
    def attack_target(model, x, y):
        return attack(target, x, y)

    return attack_target


def chunked(fn, x: torch.Tensor, batch_size: int | None = None, recompute: bool = False) -> torch.Tensor:
    """``fn(x)`` computed on chunks of at most ``batch_size`` rows and concatenated (at once when None).

    With ``recompute`` and autograd on, each chunk's activations are recomputed in the backward pass
    instead of kept (activation checkpointing, its random draws replayed), so memory holds about one
    chunk's: what bounds an EOT attack's memory. Only for a model in eval mode (BatchNorm would count
    a recomputed chunk twice in training).
    """
    if batch_size is not None:
        check_int("batch_size", batch_size)
    if batch_size is None or len(x) <= batch_size:
        return fn(x)
    keep = recompute and torch.is_grad_enabled()
    return torch.cat([checkpoint(fn, c, use_reentrant=False) if keep else fn(c) for c in x.split(batch_size)])


def log_mean_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log of the softmax averaged over the first dimension of (K, N, C) logits: K draws or members, N inputs."""
    return logits.softmax(-1).mean(0).clamp_min(1e-12).log()


class EOT(nn.Module):
    """Expectation over transformation: log of the softmax averaged over ``draws`` runs of a random model.

    Any attack run on ``EOT(model, draws)`` follows the gradient of the expected prediction, and its
    accuracy is the accuracy of the expected prediction, not of one lucky draw (Athalye et al.).
    ``batch_size`` bounds the images one forward pass of ``model`` sees (see :func:`chunked`).
    """

    def __init__(self, model: nn.Module, draws: int = 20, batch_size: int | None = None):
        super().__init__()
        check_int("draws", draws)
        if batch_size is not None:
            check_int("batch_size", batch_size)
        self.model, self.draws, self.batch_size = model, draws, batch_size
        self.randomized = True

    def forward(self, x):
        n = x.shape[0]
        copies = x.repeat(self.draws, *([1] * (x.dim() - 1)))
        logits = chunked(self.model, copies, self.batch_size, recompute=not self.model.training)
        return log_mean_softmax(logits.view(self.draws, n, -1))


def with_draws(model: nn.Module, draws: int) -> nn.Module:
    """The same randomized model (its weights shared) averaging ``draws`` random passes per call: an
    ``EOT`` with another number of draws, a model built with a ``draws`` setting rebuilt with this one,
    any other randomized model wrapped in ``EOT(model, draws)``."""
    check_int("draws", draws)
    if isinstance(model, EOT):
        return EOT(model.model, draws, model.batch_size)
    config = getattr(model, "_config", None)
    if isinstance(config, dict) and "draws" in config:
        return type(model)(**{**config, "draws": draws})
    return EOT(model, draws)
