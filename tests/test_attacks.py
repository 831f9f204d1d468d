"""Attacks: budgets, box, model mode, cost, strength and input checking."""

import re

import pytest
import torch
from torch import nn

from defenses_lib.attacks import EOT, attack_loss, eval_mode, fgsm, pgd
from defenses_lib.evaluation import accuracy


def _xy(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("restarts", [1, 3])
def test_pgd_stays_in_ball_and_box(tiny_model, norm, eps, restarts):
    x, y = _xy()
    x_adv = pgd(tiny_model, x, y, eps, steps=10, norm=norm, restarts=restarts)
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_fgsm_is_one_signed_step(tiny_model):
    x, y = _xy()
    x_adv = fgsm(tiny_model, x, y, 0.05)
    assert ((x_adv - x).abs() <= 0.05 + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1


def test_attacks_restore_each_modules_mode(tiny_model):
    tiny_model.train()
    tiny_model[1].eval()  # a mixed state must survive too
    x, y = _xy()
    pgd(tiny_model, x, y, 0.1, steps=3)
    assert tiny_model.training and tiny_model[0].training and not tiny_model[1].training


def test_eval_mode_restores_after_an_exception(tiny_model):
    tiny_model.train()
    with pytest.raises(RuntimeError):
        with eval_mode(tiny_model):
            assert not tiny_model.training
            raise RuntimeError("boom")
    assert tiny_model.training


class Counting(nn.Module):
    """Counts forward and backward passes through a model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.forwards, self.backwards = model, 0, 0

    def forward(self, x):
        self.forwards += 1
        out = self.model(x)
        if out.requires_grad:
            out.register_hook(lambda g: setattr(self, "backwards", self.backwards + 1))
        return out


@pytest.mark.parametrize("early_stop", [True, False])
def test_pgd_costs_steps_forward_and_backward(tiny_model, early_stop):
    model = Counting(tiny_model)
    x, y = _xy()
    pgd(model, x, y, 0.1, steps=7, early_stop=early_stop)
    assert model.forwards <= 7 and model.backwards == model.forwards
    if not early_stop:
        assert model.forwards == 7


def test_a_declared_randomized_model_is_attacked_without_early_stopping(tiny_model):
    model = Counting(tiny_model)
    model.randomized = True
    x, y = _xy()
    pgd(model, x, y, 0.1, steps=7)
    assert model.forwards == 7 and model.backwards == 7


def test_restarts_without_early_stopping_keep_the_highest_loss(tiny_model):
    x, y = _xy()

    def final_loss(x_adv):
        return attack_loss(tiny_model(x_adv), y)

    one = pgd(tiny_model, x, y, 0.1, steps=3, early_stop=False, generator=torch.Generator().manual_seed(0))
    three = pgd(tiny_model, x, y, 0.1, steps=3, restarts=3, early_stop=False,
                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (final_loss(three) >= final_loss(one) - 1e-6).all()
        assert (final_loss(three) > final_loss(one) + 1e-6).any()


def test_restarts_cost_at_most_restarts_times_steps(tiny_model):
    model = Counting(tiny_model)
    x, y = _xy()
    pgd(model, x, y, 0.05, steps=5, restarts=3)
    assert model.forwards <= 15 and model.backwards == model.forwards


def test_pgd_at_least_as_strong_as_fgsm_on_a_trained_model(mnist_small):
    model, x, y = mnist_small
    a_fgsm = accuracy(model, fgsm(model, x, y, 0.1), y)
    a_pgd = accuracy(model, pgd(model, x, y, 0.1, steps=20, alpha=0.01), y)
    assert a_pgd <= a_fgsm
    assert a_pgd < accuracy(model, x, y)


def test_targeted_pgd_reaches_the_target(mnist_small):
    model, x, y = mnist_small
    target = (y + 1) % 10
    x_adv = pgd(model, x, target, 0.3, steps=40, alpha=0.02, targeted=True)
    hit = (model(x_adv).argmax(1) == target).float().mean()
    assert hit > 0.8


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(eps=0.1, norm="l3"), "norm"),
    (dict(eps=0.1, steps=0), "steps"),
])
def test_bad_arguments_raise_clear_errors(tiny_model, kwargs, match):
    x, y = _xy()
    with pytest.raises(ValueError, match=match):
        pgd(tiny_model, x, y, **kwargs)


def test_bad_inputs_raise_clear_errors(tiny_model):
    x, y = _xy()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(tiny_model, x * 2 - 0.5, y, 0.1)
    with pytest.raises(ValueError, match="shape"):
        pgd(tiny_model, x[:, 0], y, 0.1)
    with pytest.raises(ValueError, match="y must be a tensor of shape"):
        pgd(tiny_model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="floating-point"):
        pgd(tiny_model, (x * 255).to(torch.uint8), y, 0.1)


def test_attack_losses():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(attack_loss(logits, y, "margin"), torch.tensor([-2.0, 2.0]))
    assert torch.allclose(attack_loss(logits, y, "dlr"), torch.tensor([-2.0 / 3.0, 2.0 / 2.0]))
    assert torch.allclose(attack_loss(logits, y, "ce", targeted=True), -attack_loss(logits, y, "ce"))
    with pytest.raises(ValueError, match="loss"):
        attack_loss(logits, y, "hinge")


class Noisy(nn.Module):
    """A randomized model: Gaussian noise before a fixed network."""

    def __init__(self, model, sigma=0.5):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


def test_eot_averages_probabilities_over_draws(tiny_model):
    x, _ = _xy(4)
    torch.manual_seed(1)
    out = EOT(Noisy(tiny_model), draws=500)(x)
    assert out.shape == (4, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)
    torch.manual_seed(2)
    again = EOT(Noisy(tiny_model), draws=500)(x)
    assert (out.exp() - again.exp()).abs().max() < 0.05  # the expectation, not one draw
    with pytest.raises(ValueError, match="draws"):
        EOT(tiny_model, draws=0)


def test_attacks_restore_parameter_gradients(tiny_model):
    tiny_model[0].weight.requires_grad_(False)  # a partly frozen model stays partly frozen
    x, y = _xy()
    pgd(tiny_model, x, y, 0.1, steps=2)
    assert not tiny_model[0].weight.requires_grad
    assert tiny_model[0].bias.requires_grad and tiny_model[3].weight.requires_grad


def test_top_k_targeted_tries_the_most_likely_wrong_classes_in_order():
    from defenses_lib.attacks import top_k_targeted

    calls = []

    def attack(model, x, target, targeted):
        assert targeted
        calls.append(target.tolist())
        return x + (target.view(-1, 1) == 2).float() * 10  # only a push towards class 2 fools this model

    model = torch.nn.Linear(1, 4, bias=True)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [0.0], [1.0], [0.0]]))
        model.bias.copy_(torch.tensor([3.0, 2.0, 1.0, 0.0]))  # clean: class 0, then wrong classes 1, 2, 3
    x, y = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
    out = top_k_targeted(attack, 2)(model, x, y)
    assert calls == [[1, 1], [2, 2]] and (model(out).argmax(1) == 2).all()
    assert top_k_targeted(attack, 1)(model, x, y).eq(0).all(), "with k = 1 only class 1 is tried"


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=-0.01), "alpha must be a finite number > 0, got -0.01"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(eps="0.1"), "eps must be a finite number >= 0, got '0.1'"),
    (dict(eps=-0.1), "eps must be a finite number >= 0, got -0.1"),
    (dict(steps=2.5), "steps must be an integer >= 1, got 2.5"),
    (dict(steps=True), "steps must be an integer >= 1, got True"),
    (dict(restarts=0), "restarts must be an integer >= 1, got 0"),
    (dict(norm="l1"), "norm must be one of"),
])
def test_pgd_names_every_bad_argument(tiny_model, kwargs, message):
    x, y = _xy()
    args = {**dict(eps=0.1, steps=2), **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        pgd(tiny_model, x, y, **args)


def test_bad_images_and_labels_are_refused_before_any_work(tiny_model):
    x, y = _xy()
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        pgd(tiny_model, nan, y, 0.1, steps=2)
    inf = x.clone()
    inf[1, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fgsm(tiny_model, inf, y, 0.1)
    with pytest.raises(ValueError, match="at least one image"):
        pgd(tiny_model, x[:0], y[:0], 0.1, steps=2)
    with pytest.raises(ValueError, match="integer class labels"):
        pgd(tiny_model, x, y.float(), 0.1, steps=2)
    with pytest.raises(ValueError, match="y must be a tensor"):
        pgd(tiny_model, x, y.tolist(), 0.1, steps=2)


def test_a_zero_budget_is_the_identity_even_for_fgsm(tiny_model):
    x, y = _xy()
    assert torch.equal(fgsm(tiny_model, x, y, 0.0), x)
    assert torch.equal(pgd(tiny_model, x, y, 0.0, steps=2), x)
