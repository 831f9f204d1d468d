"""The sanity checks fail on known gradient-masked models and pass on the model they wrap."""

import pytest
import torch

from defenses_lib.evaluation import sanity_checks
from defenses_lib.masked import GALLERY, Saturated, Shattered, Steered, Undeclared, gallery

EPS, N, STEPS, QUERIES = 0.1, 50, 20, 300
NAMES = ["iterative beats single-step", "accuracy falls with eps to chance", "attack has converged",
         "black-box not stronger than white-box", "fixed randomness: attack succeeds"]

# the checks each masked model must fail (it may fail more)
EXPECTED = {"shattered": {NAMES[1], NAMES[3]}, "saturated": {NAMES[1], NAMES[3]},
            "undeclared randomness": {NAMES[4]}, "steered": {NAMES[1], NAMES[3]}}


@pytest.fixture(scope="module")
def reports(mnist_small):
    """The sanity report of the trained MNIST CNN and of each masked version of it."""
    model, x, y = mnist_small
    models = {"unmasked": model, **gallery(model)}
    out = {}
    for name, m in models.items():
        torch.manual_seed(0)
        out[name] = sanity_checks(m, x[:N], y[:N], EPS, steps=STEPS, n_queries=QUERIES)
    return out


def test_the_model_the_gallery_wraps_passes_every_check(reports):
    assert reports["unmasked"].passed, reports["unmasked"]


@pytest.mark.parametrize("name", list(GALLERY))
def test_each_masked_model_fails_the_checks_that_catch_its_masking(reports, name):
    failed = {c.name for c in reports[name].checks if c.passed is False}
    assert not reports[name].passed, reports[name]
    assert EXPECTED[name] <= failed, reports[name]


def test_masked_models_predict_as_the_model_does(mnist_small):
    model, x, y = mnist_small
    with torch.no_grad():
        clean = model(x).argmax(1)
        for m in (Shattered(model, levels=256), Saturated(model), Steered(model)):
            assert (m(x).argmax(1) == clean).float().mean() > 0.97
        assert (Undeclared(model, p=0.0)(x).argmax(1) == clean).all()


def test_the_masking_is_what_it_says(mnist_small):
    """Zero gradient through the quantiser and the saturated softmax (on what it classifies right),
    the true gradient negated through the steering."""
    model, x, y = mnist_small
    with torch.no_grad():
        right = model(x).argmax(1) == y
    xs, ys = x[right][:8].clone().requires_grad_(), y[right][:8]

    def grad(m):
        """The input gradient of the cross-entropy of m."""
        return torch.autograd.grad(torch.nn.functional.cross_entropy(m(xs), ys), xs)[0]

    assert grad(Shattered(model)).abs().max() == 0 and grad(Saturated(model)).abs().max() == 0
    g_true = grad(model)
    assert g_true.abs().max() > 0 and torch.allclose(grad(Steered(model)), -g_true)


@pytest.mark.parametrize("make, message", [(lambda m: Shattered(m, levels=1), "levels"),
                                           (lambda m: Saturated(m, scale=0.0), "scale"),
                                           (lambda m: Undeclared(m, p=1.0), "p must be < 1")])
def test_masked_models_name_their_bad_arguments(tiny_model, make, message):
    with pytest.raises(ValueError, match=message):
        make(tiny_model)


def test_on_a_randomized_model_the_convergence_check_varies_the_draws(reports):
    assert "x 2 draws per step" in reports["undeclared randomness"].checks[2].detail
    assert "x 2 restarts" in reports["unmasked"].checks[2].detail


def test_the_large_budget_is_three_times_eps_not_one_where_a_grey_image_wins(reports):
    assert "eps 0.3:" in reports["unmasked"].checks[1].detail and "eps 0.5" not in reports["unmasked"].checks[1].detail
