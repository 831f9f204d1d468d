"""ARMOR_D: the duals against their formulas evaluated by brute force, lambda's positivity, the inner
maximiser, rFGSM^k on binary features, the sample weights and the error rates."""

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from defenses_lib.attacks import best_of, rfgsm_k, signed_ascent
from defenses_lib.defenses.armor import (ArmorLoss, RFGSMAdversarialLoss, TransportCost, UniformArmorLoss,
                                         armor_losses, f_star_alpha)
from defenses_lib.evaluation import error_rates
from defenses_lib.training import train


def linear_model(d=12, k=3, seed=0):
    """A linear classifier on (N, 1, 2, d/2) inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k))


def batch(n=6, d=12, k=3, seed=1):
    """A small batch of inputs in [0, 1] and labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 2, d // 2, generator=g), torch.randint(0, k, (n,), generator=g)


def test_transport_cost_formula():
    x = torch.zeros(2, 1, 1, 3)
    x_adv = torch.tensor([[3.0, 4.0, 0.0], [1.0, -2.0, 2.0]]).view(2, 1, 1, 3)
    assert torch.allclose(TransportCost(0.5, 2, 1.5)(x, x_adv), 0.5 * torch.tensor([5.0, 3.0]) ** 1.5)
    assert torch.allclose(TransportCost(0.2, math.inf, 2)(x, x_adv), 0.2 * torch.tensor([16.0, 4.0]))
    with pytest.raises(ValueError, match="weight >= 0"):
        TransportCost(-1.0)


def test_kl_dual_equals_brute_force():
    loss = ArmorLoss(eps=0.05, cost=TransportCost(0.1), divergence="kl", lam_init=0.7)
    s = torch.tensor([0.3, -1.2, 2.5, 0.0, 40.0], dtype=torch.float64)  # 40: the max-shift must keep it finite
    lam = loss.lam.item()
    brute = 0.05 * lam + lam * math.log(sum(math.exp(v) for v in s.tolist()) / len(s))
    assert loss.dual(s, torch.tensor(lam, dtype=torch.float64)).item() == pytest.approx(brute, rel=1e-12)


def test_alpha_dual_equals_brute_force():
    alpha = 3.0
    loss = ArmorLoss(eps=0.07, cost=TransportCost(0.2), divergence="alpha", alpha=alpha, lam_init=1.3, nu_init=0.4)
    s = torch.tensor([0.1, 2.0, -0.5, 1.0], dtype=torch.float64)
    lam, nu = loss.lam.item(), loss.nu.item()

    def f_star(t):
        e = alpha / (alpha - 1)
        return alpha ** -1 * (alpha - 1) ** e * max(t, 0) ** e + 1 / (alpha * (alpha - 1))

    brute = 0.07 * lam + nu + lam * sum(f_star(v - nu / lam) for v in s.tolist()) / len(s)
    assert loss.dual(s, torch.tensor(lam, dtype=torch.float64)).item() == pytest.approx(brute, rel=1e-6)
    assert f_star_alpha(torch.tensor(-3.0), alpha).item() == pytest.approx(1 / 6)


def test_forward_is_the_dual_of_the_transported_losses_mixed_with_the_natural_loss():
    model, (x, y) = linear_model(), batch()
    loss = ArmorLoss(eps=0.01, cost=TransportCost(0.05, 2, 1.0), steps=4, step_size=0.02, t=0.3)
    x_adv = loss.transport(model, x, y)
    s = F.cross_entropy(model(x_adv), y, reduction="none") / loss.lam - loss.cost(x, x_adv)
    expected = 0.3 * F.cross_entropy(model(x), y) + 0.7 * (0.01 * loss.lam + loss.lam * (s.exp().mean().log()))
    assert loss(model, x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_uniform_ablation_weighs_examples_equally_and_learns_lambda_as_armor_does():
    """Its network gradient is that of the mean transported cross-entropy (mixed with the natural one); its
    lambda gradient is ARMOR_D's; its value is the transported loss."""
    (x, y), args = batch(), dict(eps=0.01, cost=TransportCost(0.05, 2, 1.0), steps=4, step_size=0.02, t=0.3)
    grads = {}
    for kind in (ArmorLoss, UniformArmorLoss):
        model, loss = linear_model(), kind(**args)
        x_adv = loss.transport(model, x, y)
        value = loss(model, x, y)
        value.backward()
        grads[kind] = (model[1].weight.grad.clone(), loss.raw_lam.grad.clone(), value.item(), x_adv)
    model = linear_model()
    x_adv = grads[UniformArmorLoss][3]
    plain = 0.3 * F.cross_entropy(model(x), y) + 0.7 * F.cross_entropy(model(x_adv), y)
    plain.backward()
    assert torch.equal(grads[ArmorLoss][3], x_adv), "the same transport"
    assert torch.allclose(grads[UniformArmorLoss][0], model[1].weight.grad, atol=1e-6)
    assert not torch.allclose(grads[ArmorLoss][0], model[1].weight.grad, atol=1e-4), "ARMOR_D re-weights"
    assert torch.allclose(grads[UniformArmorLoss][1], grads[ArmorLoss][1], atol=1e-6), "the same dual for lambda"
    assert grads[UniformArmorLoss][2] == pytest.approx(plain.item(), rel=1e-5)
    assert torch.equal(UniformArmorLoss(**args).sample_weights(torch.rand(5), torch.rand(5)), torch.ones(5))


def test_the_ablations_are_named_models_and_an_unknown_one_is_refused():
    from defenses_lib.profiles import get_profile
    P = get_profile("armor", "reference")
    losses = armor_losses(P)
    assert isinstance(losses["ARMOR_D KL uniform"], UniformArmorLoss)
    assert losses["PGD-AT matched"].eps == P.matched_eps == 0.2 and list(losses) == list(P.models)
    with pytest.raises(ValueError, match="models must be among"):
        armor_losses(P.replace(models=("ARMOR_D typo",)))


def test_lambda_stays_positive_under_both_parametrisations():
    soft = ArmorLoss(eps=0.1, cost=TransportCost(0.1))
    with torch.no_grad():
        soft.raw_lam.fill_(-50.0)  # where a large step could push the free parameter
    assert soft.lam.item() > 0
    reset = ArmorLoss(eps=0.1, cost=TransportCost(0.1), positivity="reset", softplus_beta=2.0)
    with torch.no_grad():
        reset.raw_lam.fill_(-0.3)
    assert reset.lam.item() == pytest.approx(F.softplus(torch.tensor(-0.3), beta=2.0).item())
    assert reset.lam.item() > 0 and reset.raw_lam.requires_grad  # still a trained parameter


def test_lambda_positive_through_training_with_a_large_learning_rate():
    model, (x, y) = linear_model(), batch(n=32)
    loss = ArmorLoss(eps=5.0, cost=TransportCost(0.1), steps=2, step_size=0.01, lr=1.0)  # eps large: pushes lambda down
    train(model, torch.utils.data.TensorDataset(x, y), loss, epochs=3, batch_size=8, loss_lr=loss.lr,
          show_progress=False)
    assert loss.lam.item() > 0
    assert loss.lam.item() < 1.0, "a large eps must pull lambda below its initial value"


def test_inner_maximiser_increases_its_objective():
    model, (x, y) = linear_model(), batch()
    loss = ArmorLoss(eps=0.01, cost=TransportCost(0.5, 2, 2.0), steps=10, step_size=0.005)

    def objective(z):
        return F.cross_entropy(model(z), y, reduction="none") / loss.lam.detach() - loss.cost(x, z)

    x_adv = loss.transport(model, x, y)
    assert (objective(x_adv) > objective(x)).all()
    assert (x_adv - x).abs().max().item() == pytest.approx(0.05, abs=1e-6), "no projection: steps * step_size away"


def test_signed_ascent_clips_only_when_asked():
    x = torch.full((2, 1, 1, 3), 0.99)
    up = signed_ascent(lambda z: z.flatten(1).sum(1), x, steps=3, step_size=0.01)
    assert torch.allclose(up, torch.full_like(x, 1.02))
    assert signed_ascent(lambda z: z.flatten(1).sum(1), x, steps=3, step_size=0.01, clip=True).max().item() == 1.0


def test_rfgsm_k_is_binary_and_only_adds_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 2))
    x = (torch.rand(64, 1, 1, 20) > 0.6).float()
    y = torch.randint(0, 2, (64,))
    x_adv = rfgsm_k(model, x, y, steps=20, step_size=0.05, generator=torch.Generator().manual_seed(0))
    assert ((x_adv == 0) | (x_adv == 1)).all()
    assert (x_adv >= x).all(), "rFGSM^k only switches features on"
    before = F.cross_entropy(model(x), y, reduction="none")
    after = F.cross_entropy(model(x_adv), y, reduction="none")
    assert (after >= before).all(), "an example whose loss would drop keeps x"
    assert (x_adv != x).any()
    with pytest.raises(ValueError, match="x must be binary"):
        rfgsm_k(model, x * 0.5 + 0.1, y)


def test_binary_armor_transport_and_rfgsm_training_stay_binary():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 2))
    x = (torch.rand(16, 1, 1, 20) > 0.6).float()
    y = torch.randint(0, 2, (16,))
    loss = ArmorLoss(eps=0.01, cost=TransportCost(0.01), steps=5, step_size=0.2, domain="binary")
    x_adv = loss.transport(model, x, y)
    assert ((x_adv == 0) | (x_adv == 1)).all() and (x_adv >= x).all()
    assert torch.isfinite(RFGSMAdversarialLoss(steps=3, step_size=0.3)(model, x, y))


def test_kl_sample_weights_are_n_times_softmax_of_s():
    loss = ArmorLoss(eps=0.01, cost=TransportCost(0.1), lam_init=0.5)
    losses, costs = torch.tensor([0.2, 1.0, 3.0, 0.1]), torch.tensor([0.0, 0.1, 0.2, 0.05])
    w = loss.sample_weights(losses, costs)
    assert torch.allclose(w, 4 * torch.softmax(losses / 0.5 - costs, 0), atol=1e-6)
    assert w.mean().item() == pytest.approx(1.0) and w.argmax().item() == 2


def test_alpha_sample_weights_are_the_conjugate_derivative():
    loss = ArmorLoss(eps=0.01, cost=TransportCost(0.1), divergence="alpha", alpha=3.0, nu_init=0.5)
    losses, costs = torch.tensor([0.2, 1.0, 3.0]), torch.zeros(3)
    t = losses / loss.lam.item() - 0.5 / loss.lam.item()
    expected = 2 ** 1.5 / 3 * 1.5 * t.clamp_min(0) ** 0.5  # d/dt of f*_3(t) = (2^1.5 / 3) t^1.5
    assert torch.allclose(loss.sample_weights(losses, costs), expected, atol=1e-5)


def test_armor_loss_refuses_bad_options():
    with pytest.raises(ValueError, match="divergence must be one of"):
        ArmorLoss(0.1, TransportCost(0.1), divergence="js")
    with pytest.raises(ValueError, match="eps must be"):
        ArmorLoss(-0.1, TransportCost(0.1))
    with pytest.raises(ValueError, match="alpha must be > 1"):
        ArmorLoss(0.1, TransportCost(0.1), divergence="alpha", alpha=1.0)
    with pytest.raises(ValueError, match="domain must be one of"):
        ArmorLoss(0.1, TransportCost(0.1), domain="graph")
    with pytest.raises(ValueError, match="0 <= t <= 1"):
        ArmorLoss(0.1, TransportCost(0.1), t=1.5)


def test_error_rates_on_a_hand_made_confusion_matrix():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    r = error_rates(pred, y, 3)
    # per class FN/(FN+TP): 1/3, 1/2, 0; FP/(FP+TN): 0/3, 1/4, 1/5
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["FNR"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert r["FPR"] == pytest.approx((0 + 1 / 4 + 1 / 5) / 3)


def test_best_of_keeps_the_first_run_that_fools():
    calls = []

    def attack(model, x, y):
        calls.append(len(x))
        return x + len(calls)  # run k shifts the inputs by k

    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0], [1.0]]))
        model[1].bias.copy_(torch.tensor([2.5, 0.0]))  # class 1 once the input exceeds 2.5
    x, y = torch.zeros(3, 1, 1, 1), torch.zeros(3, dtype=torch.long)
    out = best_of(attack, runs=5)(model, x, y)
    assert calls == [3, 3, 3] and torch.all(out == 3)


def test_diagnostics_are_the_transport_and_weights_batch_by_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    loss = ArmorLoss(eps=0.1, cost=TransportCost(0.1), steps=2, step_size=0.05)
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,))
    d = loss.diagnostics(model, x, y, batch_size=5)
    x_tr = torch.cat([loss.transport(model, x[i:i + 5], y[i:i + 5]) for i in (0, 5)])
    assert torch.allclose(d.x_transported, x_tr) and d.weights.shape == (10,)
    after = torch.nn.functional.cross_entropy(model(x_tr), y, reduction="none").detach()
    first = loss.sample_weights(after[:5], loss.cost(x[:5], x_tr[:5]))
    assert torch.allclose(d.weights[:5], first) and d.weights[:5].mean().item() == pytest.approx(1.0)  # KL: mean 1
    w = d.weights
    assert d.effective_size == pytest.approx((w.sum() ** 2 / (w ** 2).sum() / 10).item())
    assert 0.1 <= d.top_share(0.1) <= 1 and "effective size" in d.summary()
