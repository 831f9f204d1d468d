"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019) and variational, sample-wise smoothing
(Hase et al. 2024; the paper's objective is not fully specified, so the selector's training loss
and the certificate here are the book's reconstruction, each choice a named option).

* ``GaussianNoiseLoss``: cross-entropy on x + sigma * noise (the fixed-sigma baseline's training).
* ``SmoothedClassifier``: log of the softmax averaged over ``draws`` noisy copies, differentiable in x
  (what a PGD+EOT attacker differentiates, and what soft-smoothing losses train).
* ``sample_counts`` and ``certify``: the hard smoothed classifier g(x) = argmax_c P(f(x + sigma * noise) = c)
  and its certified l_2 radius sigma * Phi^-1(p_lower), with the one-sided Clopper-Pearson bound from SciPy.
* ``NoiseSelector``, ``VariationalSmoothing`` and ``VariationalSmoothingLoss``: a per-input noise level
  sigma(x) conditioned on a target sigma_t, protected by median smoothing, trained with the classifier.
* ``percentile_bounds`` and ``certify_variational``: a certificate that lets the attacker move sigma(x).
* ``build``: chapter 3's recipe, every model as a defense with its attacker and its certificate.

``sigma`` may be a number or one value per image (a sample-wise noise level).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
import torch.nn.functional as F
from scipy.stats import binom, binomtest, norm

from .. import distributed, estimate
from ..cache import cached
from ..attacks import check_inputs, chunked, eval_mode, log_mean_softmax
from ..checks import check_int, check_number
from ..config import Configured
from ..evaluation import FixedRandomness
from ..models import build_model
from ..runtime import draw, generator_for, model_device, progress, record, seed_everything
from ..training import fit
from .base import Defense, select

ABSTAIN = -1


def _sigmas(sigma, n: int) -> torch.Tensor:
    """sigma as a tensor of n per-image noise levels, each checked to be >= 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, (numbers.Real, torch.Tensor, list, tuple)):
        raise ValueError(f"sigma must be a number or one number per image, got {sigma!r}")
    s = torch.as_tensor(sigma, dtype=torch.float32).flatten()
    s = s.expand(n) if s.numel() == 1 else s
    if s.numel() != n:
        raise ValueError(f"sigma must be a number or one value per image ({n}), got {s.numel()} values")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"sigma must be finite and >= 0, got min {float(s.min()):.3g}")
    return s


def soft_smoothed(base: nn.Module, x: torch.Tensor, sigma, draws: int, batch_size: int | None = None) -> torch.Tensor:
    """log mean_m softmax(base(x + sigma * noise_m)) over ``draws`` draws; sigma a number or one per image.

    ``batch_size`` bounds the images one forward pass of ``base`` sees (see ``attacks.chunked``).
    """
    n = len(x)
    sigma = sigma.repeat(draws).view(-1, 1, 1, 1) if torch.is_tensor(sigma) else sigma
    noisy = x.repeat(draws, 1, 1, 1) + sigma * torch.randn((draws * n, *x.shape[1:]), device=x.device)
    logits = chunked(base, noisy, batch_size, recompute=not base.training)
    return log_mean_softmax(logits.view(draws, n, -1))


class GaussianNoiseLoss(Configured, nn.Module):
    """Training for smoothing at a fixed sigma: cross-entropy on x + sigma * N(0, I) (Cohen et al.)."""

    def __init__(self, sigma: float):
        super().__init__()
        _sigmas(sigma, 1)
        self.sigma = sigma

    def forward(self, model, x, y):
        return F.cross_entropy(model(x + self.sigma * torch.randn_like(x)), y)


class SmoothedClassifier(Configured, nn.Module):
    """The soft smoothed classifier: log mean_m softmax(f(x + sigma * noise_m)) over ``draws`` draws.

    Differentiable in x, so PGD on it is PGD with EOT through the noise; ``randomized`` tells the
    attacks not to stop early on a lucky draw. Noise is added in pixel space and not clipped.
    ``batch_size`` bounds the images one forward pass of ``base`` sees.
    """

    randomized = True

    def __init__(self, base: nn.Module, sigma: float, draws: int = 16, batch_size: int | None = None):
        super().__init__()
        _sigmas(sigma, 1)
        check_int("draws", draws)
        self.base, self.sigma, self.draws, self.batch_size = base, sigma, draws, batch_size

    def forward(self, x):
        return soft_smoothed(self.base, x, self.sigma, self.draws, self.batch_size)


@dataclass
class Timings:
    """Where CERTIFY's time goes: the base model's forward passes, drawing noise, and counting."""

    forward: float = 0.0
    sampling: float = 0.0
    bookkeeping: float = 0.0
    samples: int = 0

    def split(self) -> dict[str, float]:
        """Each part's share of the total time."""
        total = self.forward + self.sampling + self.bookkeeping
        return {k: getattr(self, k) / total for k in ("forward", "sampling", "bookkeeping")} if total else {}


@torch.no_grad()
def sample_counts(base: nn.Module, x: torch.Tensor, sigma: float, num: int, num_classes: int, batch_size: int = 1000,
                  generator: torch.Generator | None = None, timings: Timings | None = None) -> torch.Tensor:
    """How often the base classifier predicts each class on ``num`` noisy copies of one image x (C, H, W),
    drawn and classified on the model's device ``batch_size`` at a time (``generator`` on that device
    draws there; a generator elsewhere draws on its own device and the noise is moved)."""
    dev = model_device(base)
    counts = torch.zeros(num_classes, dtype=torch.long, device=dev)
    t = timings if timings is not None else Timings()
    x = x.to(dev)
    starts = range(0, num, batch_size)
    run = estimate.cap(len(starts), 1)   # every batch of noise, except in estimate mode
    with eval_mode(base), estimate.stage("certificates", len(starts), run):
        for start in starts[:run]:
            m = min(batch_size, num - start)
            t0 = time.perf_counter()
            batch = x.unsqueeze(0) + sigma * draw("randn", (m, *x.shape), dev, generator)
            t1 = time.perf_counter()
            logits = base(batch)
            if logits.shape[1] != num_classes:
                raise ValueError(f"num_classes must be the number of the model's outputs, {logits.shape[1]}, "
                                 f"got {num_classes}")
            t2 = time.perf_counter()
            counts += torch.bincount(logits.argmax(1), minlength=num_classes)
            t3 = time.perf_counter()
            t.sampling += t1 - t0
            t.forward += t2 - t1
            t.bookkeeping += t3 - t2
            t.samples += m
    return counts.cpu()


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion (SciPy's exact interval)."""
    return binomtest(int(successes), int(trials)).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low


def _check(x, n, alpha, n0: int = 1, batch_size: int = 1, num_classes: int = 2):
    """Clear errors for CERTIFY's arguments."""
    check_inputs(x)
    check_int("n", n)
    check_int("n0", n0)
    check_int("batch_size", batch_size)
    check_int("num_classes", num_classes, minimum=2)
    check_number("alpha", alpha, strict=True)
    if not alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")


@dataclass
class Certificate:
    """CERTIFY's answer per image: the class (ABSTAIN = -1), the certified l_2 radius and p_lower."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    sigma: torch.Tensor
    n: int
    alpha: float
    timings: Timings = field(default_factory=Timings)

    def certified(self, y: torch.Tensor, r: float) -> torch.Tensor:
        """Per image: classified correctly with a certified radius of at least r (bool)."""
        return (self.prediction == y) & (self.radius >= r)

    def certified_accuracy(self, y: torch.Tensor, radii) -> dict[float, float]:
        """Fraction of images classified correctly with radius >= r, for each r."""
        return {float(r): self.certified(y, r).float().mean().item() for r in radii}


def certify(base: nn.Module, x: torch.Tensor, sigma, n0: int = 100, n: int = 100_000,
            alpha: float = 0.001, num_classes: int = 10, batch_size: int = 1000,
            generator: torch.Generator | None = None,
            desc: str | None = None) -> Certificate:
    """Cohen et al.'s CERTIFY for each image of x: the class from n0 draws, its
    probability bounded from n more.

    Abstains (prediction -1, radius 0) when the lower bound p_lower on the top
    class's probability is below 1/2; otherwise the radius is sigma * Phi^-1(p_lower),
    with probability >= 1 - alpha per image.
    """
    _check(x, n, alpha, n0, batch_size, num_classes)
    sig, timings = _sigmas(sigma, len(x)), Timings()

    def certify_here(xs, sigs):
        """CERTIFY on this process's images (all of them without torchrun)."""
        pred, radius, p_low = torch.full((len(xs),), ABSTAIN), torch.zeros(len(xs)), torch.zeros(len(xs))
        run = estimate.cap(len(xs), 1)   # every image, except in estimate mode
        with estimate.stage("certificates", len(xs), run):
            for i in progress(range(run), desc, enabled=desc is not None):
                s = float(sigs[i])
                counts = partial(sample_counts, base, xs[i], s, num_classes=num_classes,
                                 batch_size=batch_size, generator=generator, timings=timings)
                c = int(counts(n0).argmax())            # guess the top class with n0 draws
                p_low[i] = lower_confidence_bound(int(counts(n)[c]), n, alpha)   # bound it
                if p_low[i] >= 0.5:
                    pred[i], radius[i] = c, s * float(norm.ppf(float(p_low[i])))
        return pred, radius, p_low

    def compute():
        """The certificates and where their time went."""
        return (*distributed.split_work(certify_here, x, sig), dataclasses.asdict(timings))

    parts = (base, x, sig, n0, n, alpha, num_classes, batch_size)
    (pred, radius, p_low, spent), hit = cached("certify", parts, compute, [generator] if generator else [])
    record("certificate", n=len(x), draws=n, cached=hit, device=str(model_device(base)))
    return Certificate(pred, radius, p_low, sig, n, alpha, Timings(**spent))


# --- Variational, sample-wise smoothing (Hase et al. 2024, as the book reconstructs it) ---


class NoiseSelector(Configured, nn.Module):
    """The noise-level selector h(x, sigma_t) -> sigma_s(x) in [sigma_min, sigma_max].

    A small CNN; the target level sigma_t enters as an extra constant input channel, so one selector
    serves a range of targets (the paper's conditional meta-learning). The output is squashed by a
    sigmoid into the clip range, so it can never leave it.
    """

    def __init__(self, channels: int = 1, width: int = 16, sigma_min: float = 0.05, sigma_max: float = 1.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.net = nn.Sequential(nn.Conv2d(channels + 1, width, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1))

    def forward(self, x: torch.Tensor, sigma_t) -> torch.Tensor:
        t = _sigmas(sigma_t, len(x)).to(x.device)
        h = self.net(torch.cat([x, t.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])], 1)).squeeze(1)
        return self.sigma_min + (self.sigma_max - self.sigma_min) * torch.sigmoid(h)


class VariationalSmoothing(Configured, nn.Module):
    """The sample-wise defense as one module: a noise level sigma_hat(x) per image, then soft smoothing at it.

    sigma_hat(x) = median over ``median_draws`` draws of selector(x + sigma_h * noise, sigma_t): median
    smoothing (Chiang et al. 2020) bounds how far an l_2 perturbation can move it, and the selector's
    sigmoid keeps it in [sigma_min, sigma_max] (the clipping). ``forward`` is the soft smoothed
    classifier at sigma_hat(x), differentiable through the selector too, so an attacker can steer the
    noise level as well as the prediction.

    ``levels`` (the book's choice, an option): round sigma_hat to the nearest of a few levels, in log
    scale (a monotone rounding, so median smoothing's bounds carry over). Then an attacker can only
    move the noise level between finitely many values,
    and :func:`certify_variational` certifies each of them exactly; with ``levels=None`` the level is
    continuous and no certificate is offered. The rounding passes gradients straight through (BPDA).
    """

    randomized = True

    def __init__(self, base: nn.Module, selector: NoiseSelector, sigma_t: float, draws: int = 16,
                 median_draws: int = 32, sigma_h: float = 0.12, levels: tuple[float, ...] | None = None,
                 batch_size: int | None = None):
        super().__init__()
        _sigmas(sigma_t, 1)
        if draws < 1 or median_draws < 1 or sigma_h < 0:
            raise ValueError(f"need draws >= 1, median_draws >= 1 and sigma_h >= 0, got draws={draws}, "
                             f"median_draws={median_draws}, sigma_h={sigma_h}")
        if levels is not None and (len(levels) < 1 or list(levels) != sorted(set(levels)) or min(levels) <= 0):
            raise ValueError(f"levels must be increasing positive noise levels, got {levels}")
        self.base, self.selector = base, selector
        self.sigma_t, self.draws, self.median_draws, self.sigma_h = sigma_t, draws, median_draws, sigma_h
        self.levels = None if levels is None else tuple(float(v) for v in levels)
        self.batch_size = batch_size   # images per forward pass of the classifier (None: all draws at once)

    def quantize(self, sigma: torch.Tensor) -> torch.Tensor:
        """Round each noise level to the nearest of ``levels`` in log scale; the identity when levels is None."""
        if self.levels is None:
            return sigma
        grid = torch.tensor(self.levels, device=sigma.device)
        edges = (grid[:-1] * grid[1:]).sqrt()  # geometric midpoints between neighbouring levels
        rounded = grid[torch.searchsorted(edges, sigma.detach().contiguous(), right=True)]
        return sigma + (rounded - sigma).detach()  # straight-through: forward rounds, backward is the identity

    def selector_samples(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """k draws of the selector at x + sigma_h * noise, shape (k, N)."""
        noisy = x.repeat(k, 1, 1, 1) + self.sigma_h * torch.randn((k * len(x), *x.shape[1:]), device=x.device)
        return self.selector(noisy, self.sigma_t).view(k, len(x))

    def noise_level(self, x: torch.Tensor, smoothed: bool = True) -> torch.Tensor:
        """sigma_hat(x) per image: the median-smoothed, rounded selector (or the raw
        one, ``smoothed=False``)."""
        if not smoothed:
            return self.selector(x, self.sigma_t)
        samples = self.selector_samples(x, self.median_draws)
        return self.quantize(samples.median(0).values)

    def forward(self, x):
        return soft_smoothed(self.base, x, self.noise_level(x), self.draws, self.batch_size)

    def with_target(self, sigma_t: float) -> "VariationalSmoothing":
        """The same networks (shared weights) asked for another target level sigma_t."""
        return type(self)(**{**self._config, "sigma_t": sigma_t})


class VariationalSmoothingLoss(Configured, nn.Module):
    """Joint training of classifier and selector: the soft smoothed classifier's cross-entropy at sigma_s(x)
    plus ``beta`` * (log sigma_s(x) - log sigma_t)^2, which pulls the selector toward the target.

    sigma_t is drawn uniformly from ``sigma_t_range`` for each batch (the conditioning that lets one model
    serve every target). ``tau`` > 0 is the stochastic regularisation: the level used is sigma_s(x) times a
    log-normal factor exp(tau * N(0, 1)). The selector sees x + sigma_h * noise, as median smoothing will show
    it at test time. Without the regulariser the selector collapses toward sigma_min (clean accuracy is
    highest with no noise).
    """

    def __init__(self, sigma_t_range: tuple[float, float] = (0.12, 0.5), draws: int = 4, beta: float = 1.0,
                 tau: float = 0.0):
        super().__init__()
        lo, hi = sigma_t_range
        if not 0 < lo <= hi or draws < 1 or beta < 0 or tau < 0:
            raise ValueError(f"need 0 < sigma_t_range[0] <= sigma_t_range[1], draws >= 1, beta >= 0 and tau >= 0, "
                             f"got sigma_t_range={sigma_t_range}, draws={draws}, beta={beta}, tau={tau}")
        self.sigma_t_range, self.draws, self.beta, self.tau = (lo, hi), draws, beta, tau

    def forward(self, model: VariationalSmoothing, x, y):
        lo, hi = self.sigma_t_range
        sigma_t = lo + (hi - lo) * torch.rand(()).item()
        s = model.selector(x + model.sigma_h * torch.randn_like(x), sigma_t)
        level = s * torch.exp(self.tau * torch.randn_like(s)) if self.tau else s
        pull = ((s.log() - math.log(sigma_t)) ** 2).mean()
        return F.nll_loss(soft_smoothed(model.base, x, level, self.draws), y) + self.beta * pull


def percentile_bounds(samples: torch.Tensor, q_low: float, q_high: float, alpha: float,
                      floor: float, ceil: float) -> tuple[float, float]:
    """Order statistics of ``samples`` that bound the population q_low-percentile from below and the
    q_high-percentile from above, each with probability >= 1 - alpha (``floor`` / ``ceil`` when there
    are too few samples for such a bound)."""
    s = samples.flatten().sort().values
    k = len(s)
    cdf_low = torch.from_numpy(binom.cdf(range(k), k, q_low))   # P(at most j samples fall below the percentile)
    cdf_high = torch.from_numpy(binom.cdf(range(k), k, q_high))
    ok_low = (cdf_low <= alpha).nonzero().flatten()
    ok_high = (cdf_high >= 1 - alpha).nonzero().flatten()
    low = float(s[ok_low[-1]]) if len(ok_low) else floor
    high = float(s[ok_high[0]]) if len(ok_high) else ceil
    return low, high


def certify_variational(model: VariationalSmoothing, x: torch.Tensor, radii, n0: int = 100, n: int = 10_000,
                        alpha: float = 0.001, selector_draws: int = 1_000, num_classes: int = 10,
                        batch_size: int = 1000, generator: torch.Generator | None = None,
                        desc: str | None = None) -> Certificate:
    """A certified l_2 radius for the sample-wise defense that accounts for the attacker moving the noise level.

    For each image: the class c is picked with n0 draws at sigma_hat(x). For a radius r, median smoothing
    (Chiang et al. 2020) says that for every ||delta|| <= r the selector's median at x + delta lies
    between its Phi(-r / sigma_h) and Phi(r / sigma_h) percentiles at x; ``selector_draws`` samples bound
    those percentiles (order statistics), so the rounded level an attacker can reach is one of the
    ``model.levels`` in that range. r is certified when, at every reachable level l, Cohen's bound holds:
    l * Phi^-1(p_lower(l)) >= r with p_lower from n draws. The answer is the largest certified r of
    ``radii`` (0 included); the image is abstained on when not even r = 0 holds.

    Assumptions, all stated: the defense is the population version (the exact median of the selector and
    the exact smoothed classifier, as Cohen et al. certify g and not its Monte Carlo estimate); the
    selector and classifier see the same x (no other randomness); the failure probability is at most
    alpha per image, half for the percentile bounds (split over the radii), half for the levels' p_lower
    (split over the levels).
    """
    if model.levels is None:
        raise ValueError("certify_variational needs a model with levels (a continuous noise level has no "
                         "certificate here)")
    if model.sigma_h <= 0:
        raise ValueError(f"median smoothing needs sigma_h > 0, got {model.sigma_h}")
    _check(x, n, alpha, n0, batch_size, num_classes)
    check_int("selector_draws", selector_draws)
    radii = sorted({0.0, *(float(r) for r in radii)})
    a_sel, a_lvl = alpha / 2 / len(radii), alpha / 2 / len(model.levels)
    timings = Timings()

    @torch.no_grad()
    def certify_here(xs):
        """The certificate of this process's images (all of them without torchrun)."""
        pred, radius, p_min, sig = (torch.full((len(xs),), ABSTAIN), torch.zeros(len(xs)), torch.zeros(len(xs)),
                                    torch.zeros(len(xs)))
        run = estimate.cap(len(xs), 1)   # every image, except in estimate mode
        with eval_mode(model), estimate.stage("certificates", len(xs), run):
            for i in progress(range(run), desc, enabled=desc is not None):
                samples = model.selector_samples(xs[i:i + 1].to(model_device(model)), selector_draws)[:, 0].cpu()
                sig[i] = model.quantize(samples.median())
                counts = partial(sample_counts, model.base, xs[i], num_classes=num_classes, batch_size=batch_size,
                                 generator=generator, timings=timings)
                c = int(counts(float(sig[i]), n0).argmax())
                p_low: dict[float, float] = {}   # each reachable level's p_lower, computed once
                for r in radii:
                    reach = _reachable_levels(model, samples, r, a_sel)
                    for v in reach:
                        if v not in p_low:
                            p_low[v] = lower_confidence_bound(int(counts(v, n)[c]), n, a_lvl)
                    if not reach or not all(p_low[v] >= 0.5 and v * norm.ppf(p_low[v]) >= r for v in reach):
                        break
                    pred[i], radius[i], p_min[i] = c, r, min(p_low[v] for v in reach)
        return pred, radius, p_min, sig

    def compute():
        """The certificates and where their time went."""
        return (*distributed.split_work(certify_here, x), dataclasses.asdict(timings))

    parts = (model, x, radii, n0, n, alpha, selector_draws, num_classes, batch_size)
    (pred, radius, p_min, sig, spent), hit = cached("certify-variational", parts, compute,
                                                    [generator] if generator else [])
    record("certificate", n=len(x), draws=n, cached=hit, device=str(model_device(model)))
    return Certificate(pred, radius, p_min, sig, n, alpha, Timings(**spent))


def selector_radius_limit(sigma_h: float, n_radii: int, alpha: float, selector_draws: int) -> float:
    """The largest radius :func:`certify_variational` can certify: beyond it no order statistic of
    ``selector_draws`` samples bounds the selector's Phi(-r / sigma_h) percentile at the failure
    probability it spends per radius (alpha / 2 over ``n_radii`` radii, 0 included)."""
    per_radius = alpha / 2 / n_radii
    return float(-sigma_h * norm.ppf(1 - per_radius ** (1 / selector_draws)))


def _reachable_levels(model: VariationalSmoothing, samples: torch.Tensor, r: float,
                      alpha: float) -> list[float]:
    """The rounded noise levels an l_2 perturbation of norm <= r can move the
    selector's median to, from percentile bounds on its ``samples`` (each bound
    holds with probability >= 1 - alpha)."""
    q_low, q_high = norm.cdf(-r / model.sigma_h), norm.cdf(r / model.sigma_h)
    low, high = percentile_bounds(samples, q_low, q_high, alpha,
                                  model.selector.sigma_min, model.selector.sigma_max)
    levels = torch.tensor(model.levels)
    lo, hi = (model.quantize(torch.tensor(v)) for v in (low, high))
    return [float(v) for v in levels[(levels >= lo) & (levels <= hi)]]


def fewer_draws(model: nn.Module, draws: int, median_draws: int | None = None) -> nn.Module:
    """The same smoothed defense (shared weights) averaging fewer draws: what an EOT attacker differentiates."""
    if draws < 1 or (median_draws is not None and median_draws < 1):
        raise ValueError(f"draws and median_draws must be >= 1, got draws={draws}, median_draws={median_draws}")
    changes = {"draws": draws}
    if median_draws is not None and "median_draws" in model._config:
        changes["median_draws"] = median_draws
    return type(model)(**{**model._config, **changes})


def _gaussian(P, sigma: float, training) -> Defense:
    """Cohen et al.'s smoothed classifier at ``sigma`` as a defense, with its certificate."""
    model = SmoothedClassifier(training.model, sigma, P.smooth_draws, P.forward_batch)
    attacker = fewer_draws(model, P.attack_draws)

    def certificate(x, desc=None):
        """CERTIFY at sigma, noise seeded."""
        return certify(training.model, x, sigma, n0=P.cert_n0, n=P.cert_n, alpha=P.cert_failure_prob,
                       generator=generator_for(training.model, P.seed), desc=desc)

    return Defense(f"sigma = {sigma:g}", model, [training], attack_model=attacker, randomized=True,
                   repeats=P.score_repeats, fixed_model=FixedRandomness(attacker, P.seed), certify=certificate,
                   chapter="smoothing")


def _variational(P, sigma_t: float, training) -> Defense:
    """The variational model asked for target ``sigma_t``, as a defense with its certificate."""
    model = type(training.model)(**{**training.model._config, "sigma_t": sigma_t, "batch_size": P.forward_batch})
    attacker = fewer_draws(model, P.attack_draws, P.attack_median_draws)

    def certificate(x, desc=None):
        """The sample-wise certificate, selector draws and noise seeded."""
        torch.manual_seed(P.seed)
        return certify_variational(model, x, P.radii, n0=P.cert_n0, n=P.cert_n, alpha=P.cert_failure_prob,
                                   selector_draws=P.selector_draws, generator=generator_for(model, P.seed),
                                   desc=desc)

    return Defense(f"variational, sigma_t = {sigma_t:g}", model, [training], attack_model=attacker,
                   randomized=True, repeats=P.score_repeats, fixed_model=FixedRandomness(attacker, P.seed),
                   certify=certificate, chapter="smoothing")


def build(P, train_set, device=None, names=None) -> dict[str, Defense]:
    """Chapter 3's recipe: a base classifier trained with Gaussian noise per sigma of ``P.sigmas``
    ("sigma = 0.25": Cohen's smoothed classifier), and the variational model (classifier and selector
    trained jointly from the same initialisation) at each target ("variational, sigma_t = 0.25")."""
    fixed = {f"sigma = {s:g}": s for s in P.sigmas}
    targets = {f"variational, sigma_t = {t:g}": t for t in P.sigmas}
    chosen = select({**fixed, **targets}, names)
    recipe = dict(dataset=P.dataset, n_train=len(train_set), data_seed=P.seed)
    kw = dict(P.schedule(), device=device)
    out = {}
    for name in (n for n in chosen if n in fixed):
        seed_everything(P.seed)
        t = fit(build_model(P.arch, P.dataset), train_set, GaussianNoiseLoss(fixed[name]), chapter="smoothing",
                name=f"gaussian-{fixed[name]:g}", recipe=recipe, epochs=P.epochs, **kw)
        out[name] = _gaussian(P, fixed[name], t)
    if any(n in targets for n in chosen):
        seed_everything(P.seed)
        selector = NoiseSelector(train_set[0][0].shape[0], P.selector_width, P.sigma_min, P.sigma_max)
        model = VariationalSmoothing(build_model(P.arch, P.dataset), selector, P.sigmas[len(P.sigmas) // 2],
                                     P.smooth_draws, P.median_draws, P.sigma_h, P.levels)
        loss = VariationalSmoothingLoss(P.sigma_t_range, P.train_draws, P.selector_weight, P.selector_jitter)
        t = fit(model, train_set, loss, chapter="smoothing", name="variational", recipe=recipe, epochs=P.epochs, **kw)
        out.update({n: _variational(P, targets[n], t) for n in chosen if n in targets})
    return {n: out[n] for n in chosen}
