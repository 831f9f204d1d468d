"""Randomized smoothing: CERTIFY against a linear classifier whose smoothed answer is known in closed form."""

import math
import re

import pytest
import torch
from torch import nn
from scipy.stats import beta, norm

from defenses_lib.attacks import pgd
from defenses_lib.defenses.smoothing import (ABSTAIN, GaussianNoiseLoss, NoiseSelector, SmoothedClassifier,
                                             VariationalSmoothing, VariationalSmoothingLoss, certify,
                                             certify_variational, lower_confidence_bound, percentile_bounds,
                                             sample_counts)


class Linear2(nn.Module):
    """Two classes split by the hyperplane w.x + b = 0: class 0 where w.x + b > 0."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([s, -s], 1)


def _setup(distance, sigma=0.5):
    """A 1x4x4 image at signed distance `distance` from the boundary of a Linear2 model."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    x = torch.full((1, 1, 4, 4), 0.5)
    b = distance * w.norm() - float(x.flatten() @ w)
    return Linear2(w, b), x


def test_certified_radius_is_the_distance_to_the_boundary_within_monte_carlo_error():
    d, sigma, n, alpha = 0.3, 0.5, 20_000, 0.001
    model, x = _setup(d, sigma)
    p = norm.cdf(d / sigma)  # P(w.(x + sigma e) + b > 0): the smoothed classifier's exact top-class probability
    cert = certify(model, x, sigma, n0=100, n=n, alpha=alpha, num_classes=2, generator=torch.Generator().manual_seed(1))
    assert int(cert.prediction) == 0
    r = float(cert.radius)
    assert r <= d + 1e-6  # sigma * Phi^-1(p) = d exactly, and p_lower < p with probability 1 - alpha
    worst_p = p - 5 * math.sqrt(p * (1 - p) / n)
    assert r >= sigma * norm.ppf(worst_p)
    assert cert.certified_accuracy(torch.tensor([0]), [0.0, r, d + 0.01]) == {0.0: 1.0, r: 1.0, d + 0.01: 0.0}


def test_certify_abstains_on_the_boundary_and_finds_the_other_class():
    model, x = _setup(0.0)
    cert = certify(model, x, 0.5, n0=100, n=2_000, alpha=0.001, num_classes=2,
                   generator=torch.Generator().manual_seed(2))
    assert int(cert.prediction) == ABSTAIN and float(cert.radius) == 0.0
    model, x = _setup(-0.4)
    cert = certify(model, x, 0.5, n0=100, n=2_000, num_classes=2, generator=torch.Generator().manual_seed(3))
    assert int(cert.prediction) == 1 and float(cert.radius) > 0


@pytest.mark.parametrize("k,n,alpha", [(0, 10, 0.05), (7, 10, 0.05), (10, 10, 0.001), (9_900, 10_000, 0.001)])
def test_lower_bound_is_the_clopper_pearson_one(k, n, alpha):
    exact = 0.0 if k == 0 else beta.ppf(alpha, k, n - k + 1)  # the one-sided Clopper-Pearson formula
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(exact, abs=1e-9)


def test_counts_add_up_and_timings_split():
    model, x = _setup(0.2)
    counts = sample_counts(model, x[0], 0.5, 1_234, num_classes=2, batch_size=500)
    assert counts.sum() == 1_234
    cert = certify(model, x.repeat(3, 1, 1, 1), torch.tensor([0.1, 0.2, 0.3]), n0=10, n=100, num_classes=2)
    assert cert.timings.samples == 3 * 110 and sum(cert.timings.split().values()) == pytest.approx(1.0)
    assert torch.equal(cert.sigma, torch.tensor([0.1, 0.2, 0.3]))


def test_smoothed_classifier_is_differentiable_and_attackable():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    smooth = SmoothedClassifier(base, 0.25, draws=8)
    x, y = torch.rand(5, 1, 4, 4), torch.randint(0, 10, (5,))
    out = smooth(x)
    assert out.shape == (5, 10) and torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)
    x_adv = pgd(smooth, x, y, 0.5, steps=3, norm="l2")
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    loss = GaussianNoiseLoss(0.25)(base, x, y)
    loss.backward()
    assert base[1].weight.grad is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=-0.1), "sigma"),
    (dict(sigma=[0.1, 0.2]), "one value per image"),
    (dict(sigma=0.1, alpha=0.7), "alpha"),
    (dict(sigma=0.1, n=0), "n must be"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    model, x = _setup(0.2)
    with pytest.raises(ValueError, match=match):
        certify(model, x.repeat(3, 1, 1, 1), num_classes=2, **kwargs)


def _variational(sigma_t=0.25):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return VariationalSmoothing(base, NoiseSelector(1, width=4, sigma_min=0.1, sigma_max=0.8), sigma_t, draws=4,
                                median_draws=9)


def test_selector_stays_in_its_clip_range_even_with_huge_weights():
    model = _variational()
    with torch.no_grad():
        for p in model.selector.parameters():
            p.mul_(1e3)
    x = torch.rand(20, 1, 8, 8)
    for smoothed in (False, True):
        s = model.noise_level(x, smoothed=smoothed)
        assert s.shape == (20,) and s.min() >= 0.1 and s.max() <= 0.8


def test_median_smoothing_uses_the_raw_selector_values_and_targets_are_shared():
    model = _variational()
    x = torch.rand(3, 1, 8, 8)
    model.sigma_h = 0.0
    # no noise: the median is the value
    assert torch.allclose(model.noise_level(x), model.noise_level(x, smoothed=False))
    other = model.with_target(0.5)
    assert other.selector is model.selector and other.sigma_t == 0.5
    assert not torch.allclose(other.noise_level(x, smoothed=False), model.noise_level(x, smoothed=False))


def test_variational_loss_reaches_both_networks_and_the_regulariser_pulls_toward_the_target():
    model = _variational()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    VariationalSmoothingLoss((0.2, 0.4), draws=2, beta=1.0, tau=0.1)(model, x, y).backward()
    assert model.base[1].weight.grad.abs().sum() > 0 and model.selector.net[0].weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(model.selector.parameters(), lr=0.05)
    only_reg = VariationalSmoothingLoss((0.6, 0.6), draws=1, beta=100.0)
    for _ in range(60):
        opt.zero_grad()
        only_reg(model, x, y).backward()
        opt.step()
    assert (model.with_target(0.6).noise_level(x, smoothed=False) - 0.6).abs().max() < 0.05


def test_variational_model_is_attackable_through_the_selector():
    model = _variational()
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    sel_x = torch.rand(4, 1, 8, 8, requires_grad=True)
    model.noise_level(sel_x).sum().backward()
    assert sel_x.grad.abs().sum() > 0  # the attacker can steer the noise level


@pytest.mark.parametrize("make,match", [
    (lambda: NoiseSelector(sigma_min=0.5, sigma_max=0.2), "sigma_min"),
    (lambda: VariationalSmoothingLoss((0.5, 0.2)), "sigma_t_range"),
    (lambda: _variational(sigma_t=-1.0), "sigma"),
])
def test_variational_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_percentile_bounds_cover_the_true_percentiles():
    g = torch.Generator().manual_seed(0)
    misses = 0
    for _ in range(200):
        low, high = percentile_bounds(torch.rand(300, generator=g), 0.3, 0.8, 0.05, floor=0.0, ceil=1.0)
        misses += (low > 0.3) + (high < 0.8)  # Uniform(0, 1): the q-percentile is q
    assert misses <= 2 * 200 * 0.05 * 1.6  # each bound fails with probability <= 5%
    low, high = percentile_bounds(torch.rand(5, generator=g), 0.01, 0.99, 0.001, floor=-1.0, ceil=2.0)
    assert (low, high) == (-1.0, 2.0)  # too few samples for a bound: the clip range


def _linear_variational(selector_scale, distance=0.6, levels=(0.12, 0.25, 0.5)):
    """A Linear2 base at `distance` from its boundary, and a selector whose output moves with x by selector_scale."""
    base, x = _setup(distance)
    sel = NoiseSelector(1, width=2, sigma_min=0.05, sigma_max=1.0)
    with torch.no_grad():
        for p in sel.parameters():
            p.zero_()
        sel.net[-1].bias.fill_(1.0)  # sigmoid(1) * 0.95 + 0.05 = 0.74: the level rounds down to 0.5
        sel.net[0].weight[:, 0].fill_(selector_scale)
        sel.net[2].weight.fill_(selector_scale)
        sel.net[-1].weight.fill_(-selector_scale)
    return VariationalSmoothing(base, sel, 0.25, sigma_h=0.25, levels=levels), x


def test_variational_certificate_with_a_constant_selector_is_cohens():
    model, x = _linear_variational(0.0)
    radii = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    cert = certify_variational(model, x, radii, n=20_000, num_classes=2, selector_draws=2_000,
                               generator=torch.Generator().manual_seed(0))
    assert float(cert.sigma) == 0.5 and int(cert.prediction) == 0
    # at sigma 0.5 the exact radius is the distance 0.6; the Monte Carlo bound gives a little less, and
    # 2,000 selector draws are enough to bound the Phi(-0.5 / 0.25) = 2.3% percentile at this confidence
    assert float(cert.radius) == 0.5


def test_a_selector_the_attacker_can_move_shrinks_the_certificate():
    radii = [0.1, 0.2, 0.3, 0.4, 0.5]
    kw = dict(n=5_000, num_classes=2, selector_draws=400)
    fixed, x = _linear_variational(0.0)
    moving, _ = _linear_variational(3.0)
    torch.manual_seed(0)
    r_fixed = float(certify_variational(fixed, x, radii, generator=torch.Generator().manual_seed(0), **kw).radius)
    torch.manual_seed(0)
    r_moving = float(certify_variational(moving, x, radii, generator=torch.Generator().manual_seed(0), **kw).radius)
    assert r_moving < r_fixed
    with pytest.raises(ValueError, match="levels"):
        certify_variational(_linear_variational(0.0, levels=None)[0], x, radii)


def test_levels_round_to_the_nearest_in_log_scale_and_pass_gradients_straight_through():
    model = _variational()
    model.levels = (0.12, 0.25, 0.5)
    sigma = torch.tensor([0.1, 0.17, 0.18, 0.3, 0.36, 0.9], requires_grad=True)
    rounded = model.quantize(sigma)
    assert torch.allclose(rounded, torch.tensor([0.12, 0.12, 0.25, 0.25, 0.5, 0.5]))
    rounded.sum().backward()
    assert torch.equal(sigma.grad, torch.ones(6))
    with pytest.raises(ValueError, match="levels"):
        VariationalSmoothing(model.base, model.selector, 0.25, levels=(0.5, 0.25))


def test_certified_per_image_is_right_and_within_radius():
    from defenses_lib.defenses.smoothing import Certificate

    c = Certificate(prediction=torch.tensor([1, 2, -1, 3]), radius=torch.tensor([0.5, 0.1, 0.0, 0.9]),
                    p_lower=torch.zeros(4), sigma=torch.full((4,), 0.25), n=100, alpha=0.001)
    y = torch.tensor([1, 2, 0, 0])
    assert c.certified(y, 0.25).tolist() == [True, False, False, False]
    assert c.certified_accuracy(y, [0.0, 0.25]) == {0.0: 0.5, 0.25: 0.25}


def test_beyond_the_radius_limit_no_percentile_bound_exists():
    from defenses_lib.defenses.smoothing import selector_radius_limit
    sigma_h, radii, alpha, k = 0.25, 8, 0.001, 2_000
    limit = selector_radius_limit(sigma_h, radii, alpha, k)
    samples = torch.linspace(0.1, 0.6, k)
    for r, bounded in ((0.95 * limit, True), (1.05 * limit, False)):
        low, _ = percentile_bounds(samples, norm.cdf(-r / sigma_h), 0.5, alpha / 2 / radii, -1.0, 2.0)
        assert (low != -1.0) == bounded, r


@pytest.mark.parametrize("kwargs, message", [
    (dict(n0=0), "n0 must be an integer >= 1, got 0"),
    (dict(n=2.5), "n must be an integer >= 1, got 2.5"),
    (dict(batch_size=-1), "batch_size must be an integer >= 1, got -1"),
    (dict(alpha=0.7), "alpha must be in (0, 0.5), got 0.7"),
    (dict(alpha="0.001"), "alpha must be a finite number > 0"),
    (dict(num_classes=1), "num_classes must be an integer >= 2, got 1"),
    (dict(sigma="0.25"), "sigma must be a number or one number per image, got '0.25'"),
    (dict(sigma=-0.1), "sigma must be finite and >= 0"),
])
def test_certify_names_every_bad_argument(kwargs, message):
    model, x = _setup(0.5)
    args = {**dict(sigma=0.25, n0=10, n=20, num_classes=2), **kwargs}
    sigma = args.pop("sigma")
    with pytest.raises(ValueError, match=re.escape(message)):
        certify(model, x, sigma, **args)


def test_certify_refuses_an_empty_batch():
    model, x = _setup(0.5)
    with pytest.raises(ValueError, match="at least one image"):
        certify(model, x[:0], 0.25, n0=10, n=20, num_classes=2)
