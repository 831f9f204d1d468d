"""Curvature and ensembles: the finite-difference HVP against the exact one, directions, and the
ensemble losses (their gradients reach every member)."""

import pytest
import torch
from torch import nn

from defenses_lib.curvature import direction, hvp_exact, hvp_fd, input_gradient
from defenses_lib.defenses.ensembles import (DLCLoss, Ensemble, GALLoss, IndependentLoss, mean_pairwise_cos,
                                             pairwise_cos)


def smooth_net(seed=0, dtype=torch.float64):
    """A small softplus CNN: twice differentiable, so its input Hessian is well defined."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 64, 16),
                         nn.Softplus(), nn.Linear(16, 10)).to(dtype)


def _xy(n=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_finite_difference_hvp_matches_exact_within_5_percent():
    model, (x, y) = smooth_net(), _xy()
    z = direction(input_gradient(model, x, y), "sign")
    exact = hvp_exact(model, x, y, z)
    assert _rel(hvp_fd(model, x, y, z, h=1e-3, create_graph=False), exact) < 0.05


def test_finite_difference_error_shrinks_with_h():
    model, (x, y) = smooth_net(), _xy()
    z = direction(input_gradient(model, x, y), "random", torch.Generator().manual_seed(0))
    exact = hvp_exact(model, x, y, z)
    errors = [_rel(hvp_fd(model, x, y, z, h, create_graph=False), exact) for h in (1.0, 0.1, 0.01)]
    assert errors[0] > errors[1] > errors[2]


def test_directions_are_unit_and_checked():
    g = torch.randn(5, 1, 8, 8)
    for kind in ("sign", "random"):
        assert torch.allclose(direction(g, kind).flatten(1).norm(dim=1), torch.ones(5))
    assert torch.equal(direction(g, "sign").sign(), g.sign())
    with pytest.raises(ValueError, match="kind"):
        direction(g, "hessian")
    with pytest.raises(ValueError, match="h must be"):
        hvp_fd(smooth_net(), *_xy(), torch.zeros(8, 1, 8, 8, dtype=torch.float64), h=0.0)


def test_pairwise_cosine():
    a = torch.randn(4, 10)
    assert torch.isclose(mean_pairwise_cos([a, 2 * a]), torch.tensor(1.0))
    assert torch.isclose(mean_pairwise_cos([a, -a]), torch.tensor(1.0))
    assert torch.isclose(mean_pairwise_cos([a, -a], absolute=False), torch.tensor(-1.0))
    e1, e2 = torch.eye(2)[0].expand(3, 2), torch.eye(2)[1].expand(3, 2)
    assert torch.isclose(mean_pairwise_cos([e1, e2]), torch.tensor(0.0))
    mixed = pairwise_cos([torch.stack([e1[0], e1[0]]), torch.stack([e1[0], e2[0]])])   # per example
    assert torch.allclose(mixed, torch.tensor([1.0, 0.0]))


def test_ensemble_averages_softmax():
    members = [smooth_net(s, torch.float32) for s in range(3)]
    x, _ = _xy(dtype=torch.float32)
    out = Ensemble(members)(x)
    expect = torch.stack([m(x).softmax(1) for m in members]).mean(0).log()
    assert torch.allclose(out, expect, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble(members[:1])


@pytest.mark.parametrize("loss", [
    DLCLoss(alpha=1.0, beta=1.0, h=0.1),
    DLCLoss(alpha=1.0, beta=1.0, h=0.1, shared_direction=False, abs_cos=False, gamma=1.0, direction="random"),
    GALLoss(0.5),
    IndependentLoss(),
])
def test_every_loss_reaches_every_member(loss):
    ens = Ensemble([smooth_net(s, torch.float32) for s in range(3)])
    x, y = _xy(dtype=torch.float32)
    loss(ens, x, y).backward()
    for m in ens.members:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_regularizer_alone_reaches_every_member():
    ens = Ensemble([smooth_net(s, torch.float32) for s in range(3)])
    x, y = _xy(dtype=torch.float32)
    t = DLCLoss(h=0.1).terms(ens, x, y)
    (t["curvature"] + t["dispersion"]).backward()
    for m in ens.members:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_h_schedule_follows_the_epoch():
    loss = DLCLoss(h=[0.01, 0.1, 0.5])
    assert loss.h == 0.01
    loss.set_epoch(1)
    assert loss.h == 0.1
    loss.set_epoch(7)
    assert loss.h == 0.5
    with pytest.raises(ValueError, match="h must be"):
        DLCLoss(h=[0.1, -1])


def test_mean_curvature_exact_and_finite_difference_agree():
    from defenses_lib.curvature import mean_curvature

    model, (x, y) = smooth_net(), _xy(20)
    exact, fd = mean_curvature(model, x, y, batch_size=7), mean_curvature(model, x, y, h=1e-4, batch_size=7)
    assert exact > 0 and abs(fd - exact) / exact < 0.05


def test_curvature_per_example_is_each_images_norm():
    from defenses_lib.curvature import curvature_per_example, direction, hvp_exact, input_gradient

    model, (x, y) = smooth_net(), _xy(9)
    per = curvature_per_example(model, x, y, batch_size=4)
    one = hvp_exact(model, x[3:4], y[3:4], direction(input_gradient(model, x[3:4], y[3:4]))).norm()
    assert per.shape == (9,) and torch.isclose(per[3], one, rtol=1e-4)


def test_transfer_matrix_rows_are_sources(mnist_small):
    from functools import partial

    from defenses_lib.attacks import pgd
    from defenses_lib.evaluation import accuracy, transfer_matrix, transfer_outcomes

    model, x, y = mnist_small
    x, y = x[:60], y[:60]
    blind = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # a model whose own attack is easy to run
    torch.manual_seed(0)
    m = transfer_matrix([model, blind], x, y, partial(pgd, eps=0.3, steps=20))
    assert m.shape == (2, 2) and ((0 <= m) & (m <= 1)).all()
    torch.manual_seed(0)
    per = transfer_outcomes([model, blind], x, y, partial(pgd, eps=0.3, steps=20))
    assert per.shape == (2, 2, 60) and per.dtype == torch.bool and torch.equal(per.float().mean(2), m)
    assert m[0, 0] <= 0.05  # white-box at eps = 0.3 breaks the trained CNN
    assert abs(m[1, 1] - accuracy(blind, pgd(blind, x, y, 0.3, steps=20), y)) <= 0.05


def test_heatmaps_figure():
    import matplotlib

    matplotlib.use("Agg")
    from defenses_lib.plots import plot_heatmaps

    fig = plot_heatmaps({"a": torch.rand(3, 3), "b": torch.rand(3, 3)}, ["m1", "m2", "m3"])
    assert len(fig.axes) == 3  # two heatmaps and the colour bar


def test_transfer_explorer_has_a_view_per_pair_and_eps(tiny_model):
    import matplotlib

    matplotlib.use("Agg")
    from defenses_lib.widgets import transfer_explorer

    members = [tiny_model, smooth_net(1, torch.float32), smooth_net(2, torch.float32)]
    x, y = _xy(3, torch.float32)
    box = transfer_explorer({"toy": members}, x, y, eps_grid=[0.1, 0.2], steps=2)
    chooser, slider = box.children[0].children
    assert len(chooser.options) == 6 and len(slider.options) == 2  # ordered pairs of 3 members, 2 budgets
    assert all(len(stack.children) == 2 for stack in box.children[1].children)


def test_alignment_is_the_dlc_dispersion_per_example():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Softplus(), nn.Linear(8, 3)) for _ in range(3)]
    ens, x, y = Ensemble(members), torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    loss = DLCLoss(h=0.1)
    per = loss.alignment(ens, x, y)
    assert per["|cos| of HVPs"].shape == (6,)
    assert per["|cos| of HVPs"].mean().item() == pytest.approx(loss.terms(ens, x, y)["dispersion"].item(), rel=1e-5)
    assert per["|cos| of gradients"].mean().item() == pytest.approx(loss.terms(ens, x, y)["first_order"].item(),
                                                                    rel=1e-5)


def test_the_smooth_twin_swaps_relus_and_the_fd_error_falls_with_h_on_it():
    from defenses_lib.curvature import fd_relative_errors, smooth_twin
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    twin = smooth_twin(net, beta=5.0)
    assert isinstance(twin[2], nn.Softplus) and isinstance(net[2], nn.ReLU)
    assert torch.equal(twin[1].weight, net[1].weight)
    x, y = torch.rand(4, 1, 4, 4), torch.randint(0, 3, (4,))
    errs = fd_relative_errors(twin, x, y, [1e-1, 1e-2, 1e-3], dtype=torch.float64)
    assert errs[0] > errs[1] > errs[2]   # O(h) truncation error on a smooth net
