"""Attack strength: the L-shaped sweep over EOT draws and steps, and where it flattens."""

from functools import partial

import pytest
import torch

from defenses_lib.attacks import EOT, pgd, with_draws
from defenses_lib.masked import Undeclared
from defenses_lib.strength import StrengthSweep, strength_sweep


def _outcomes(accuracies, n=400):
    """Binary outcomes with the given accuracies, nested (a stronger attack breaks a superset)."""
    return [torch.arange(n) < int(a * n) for a in accuracies]


def test_the_plateau_is_the_fewest_draws_not_shown_weaker_than_the_strongest_by_tol():
    draws = (1, 2, 4, 8, 16)
    rows = dict(zip([(d, 40) for d in draws], _outcomes([0.8, 0.5, 0.31, 0.30, 0.30])))
    rows.update({(16, 100): _outcomes([0.30])[0], (16, 200): _outcomes([0.30])[0]})
    sweep = StrengthSweep(rows, draws, (40, 100, 200))
    assert sweep.plateau("draws", tol=0.03) == 4         # 1 point above the strongest, 20 at 2 draws
    assert sweep.within("draws", 4, tol=0.03)            # and resolved within 3 points on 400 images
    assert not sweep.within("draws", 4, tol=0.005)       # but not within half a point
    assert sweep.plateau("steps") == 40 and sweep.flattened("steps")
    gap = sweep.gap("draws", 2)
    assert gap.value == pytest.approx(0.2) and gap.low > 0.15


def test_on_a_few_images_the_plateau_catches_only_a_gross_gap():
    rows = dict(zip([(d, 40) for d in (1, 2)], _outcomes([0.5, 0.4], n=20)))
    sweep = StrengthSweep(rows, (1, 2), (40,))
    assert sweep.plateau("draws") == 1 and not sweep.within("draws", 1)   # 10 points on 20: not resolved
    rows = dict(zip([(d, 40) for d in (1, 2)], _outcomes([0.9, 0.2], n=20)))
    assert StrengthSweep(rows, (1, 2), (40,)).plateau("draws") == 2      # 70 points: shown weaker


def test_a_sweep_that_keeps_falling_has_no_plateau_before_its_end():
    draws = (1, 2, 4)
    rows = dict(zip([(d, 10) for d in draws], _outcomes([0.9, 0.6, 0.3])))
    sweep = StrengthSweep(rows, draws, (10,))
    assert sweep.plateau("draws") == 4 and not sweep.flattened("draws")
    assert "by draws (at 10 steps): 1: 90.0%" in str(sweep)


def test_with_draws_changes_only_the_number_of_draws(tiny_model):
    eot = EOT(tiny_model, 2, batch_size=7)
    more = with_draws(eot, 9)
    assert isinstance(more, EOT) and more.draws == 9 and more.batch_size == 7 and more.model is tiny_model
    wrapped = with_draws(tiny_model, 3)
    assert isinstance(wrapped, EOT) and wrapped.model is tiny_model
    with pytest.raises(ValueError, match="draws"):
        with_draws(tiny_model, 0)


def test_more_draws_per_step_break_an_undeclared_random_model_that_one_draw_does_not(mnist_small):
    model, x, y = mnist_small
    noisy = Undeclared(model, p=0.5)
    torch.manual_seed(0)
    sweep = strength_sweep(noisy, x[:60], y[:60], lambda s: partial(pgd, eps=0.1, alpha=0.25 / s, steps=s,
                                                                    early_stop=False),
                           draws=(1, 8), steps=(5, 10), repeats=4)
    acc = {k: v.mean().item() for k, v in sweep.arm("draws").items()}
    assert acc[8] < acc[1] - 0.05, sweep
    assert set(sweep.outcomes) == {(1, 5), (8, 5), (8, 10)}


@pytest.mark.parametrize("kw, message", [({"draws": (2, 1)}, "draws must be a non-empty increasing"),
                                         ({"steps": ()}, "steps must be a non-empty increasing"),
                                         ({"draws": (0, 1)}, "draws must be an integer >= 1")])
def test_strength_sweep_names_its_bad_arguments(tiny_model, kw, message):
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        strength_sweep(tiny_model, x, y, lambda s: partial(pgd, eps=0.1, steps=s), **kw)


def test_plateau_names_its_bad_arguments():
    sweep = StrengthSweep({(1, 1): torch.ones(3, dtype=torch.bool)}, (1,), (1,))
    with pytest.raises(ValueError, match="along"):
        sweep.plateau("restarts")
    with pytest.raises(ValueError, match="tol"):
        sweep.plateau("draws", tol=0)
