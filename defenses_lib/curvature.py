"""Curvature of the loss in input space: input gradients, search directions and Hessian-vector products.

The Hessian here is that of the per-example loss l(x) = CE(f(x), y) with respect to the input x.
``hvp_exact`` computes H z by double back-propagation; ``hvp_fd`` approximates it by one extra
gradient, [g(x + h z) - g(x)] / h, whose error is O(h) (CURE, Moosavi-Dezfooli et al. 2019).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
import torch.nn.functional as F

from .checks import check_choice

DIRECTIONS = ("sign", "random")


def loss_and_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = True):
    """Per-example cross-entropy and its input gradient (row i is example i's own gradient)."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="none")
    grad, = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    return loss, grad


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """g(x) = d/dx of the summed per-example cross-entropy (so row i is example i's own gradient)."""
    return loss_and_gradient(model, x, y, create_graph)[1]


def unit(v: torch.Tensor) -> torch.Tensor:
    """Each example's slice scaled to unit l_2 norm."""
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def direction(grad: torch.Tensor, kind: str = "sign",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A unit direction per example: CURE's normalised gradient sign, or a random one."""
    check_choice("kind", kind, DIRECTIONS)
    if kind == "sign":
        return unit(grad.detach().sign())
    noise = torch.randn(grad.shape, generator=generator, device=grad.device)
    return unit(noise)


def hvp_fd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
           h: float, create_graph: bool = True,
           grad: torch.Tensor | None = None) -> torch.Tensor:
    """Finite-difference Hessian-vector product [g(x + h z) - g(x)] / h.

    Differentiable for training with ``create_graph``. Pass ``grad`` = g(x) if it is
    already computed (with ``create_graph``) to save one gradient.
    """
    if h <= 0:
        raise ValueError(f"h must be > 0, got {h}")
    g0 = input_gradient(model, x, y, create_graph) if grad is None else grad
    x_h = (x + h * z).detach().requires_grad_(True)
    g1 = input_gradient(model, x_h, y, create_graph)
    return (g1 - g0) / h


def hvp_exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Exact Hessian-vector product H z by double back-propagation: d/dx (g(x) . z)."""
    x = x.detach().requires_grad_(True)
    g = input_gradient(model, x, y, create_graph=True)
    hz, = torch.autograd.grad((g * z).sum(), x)
    return hz


def curvature_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float | None = None,
                          kind: str = "sign", batch_size: int = 250) -> torch.Tensor:
    """Per example, ||H z|| (exact by double back-propagation, or finite-difference with step h)."""
    parts = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        z = direction(input_gradient(model, xb, yb), kind)
        hz = hvp_exact(model, xb, yb, z) if h is None else hvp_fd(model, xb, yb, z, h, create_graph=False)
        parts.append(hz.flatten(1).norm(dim=1).detach().cpu())
    return torch.cat(parts)


def mean_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float | None = None,
                   kind: str = "sign", batch_size: int = 250) -> float:
    """Mean over examples of ||H z|| (see :func:`curvature_per_example`)."""
    return curvature_per_example(model, x, y, h, kind, batch_size).mean().item()


def smooth_twin(model: nn.Module, beta: float = 10.0) -> nn.Module:
    """A copy of ``model`` with every ReLU replaced by Softplus(beta): twice differentiable, nearly the same."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=beta))
    return twin


def fd_relative_errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h_grid, kind: str = "sign",
                       dtype: torch.dtype = torch.float32) -> list[float]:
    """||hvp_fd - hvp_exact|| / ||hvp_exact|| over the batch, for each h of ``h_grid``, in ``dtype``."""
    model, x = copy.deepcopy(model).to(dtype), x.to(dtype)
    z = direction(input_gradient(model, x, y), kind)
    exact = hvp_exact(model, x, y, z)
    return [((hvp_fd(model, x, y, z, h, create_graph=False) - exact).norm() / exact.norm()).item()
            for h in h_grid]
