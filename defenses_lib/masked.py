"""Known gradient-masked models: the positive controls of the sanity checks.

Each wraps a working classifier (inputs in [0, 1], logits out) so that it predicts exactly as well
but hides its gradient in one of the ways Athalye et al. (2018) catalogue. A white-box attack on
any of them reports robustness the model does not have; the sanity checks of
:func:`defenses_lib.evaluation.sanity_checks` must fail on every one (``tests/test_masked.py``
shows they do), and pass on the unwrapped classifier.

* :class:`Shattered`: non-differentiable preprocessing (quantisation): the gradient is zero.
* :class:`Saturated`: vanishing gradients: logits so large that the softmax saturates and the
  cross-entropy's gradient is exactly zero on every correctly classified input.
* :class:`Undeclared`: stochastic gradients: dropout on the input, left on at test time, that the
  model does not declare (no fixed twin, no EOT).
* :class:`Steered`: a backward pass that points away from the adversarial direction.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import check_int, check_number


class Shattered(nn.Module):
    """Quantises its input to ``levels`` grey levels before the classifier: the gradient is zero."""

    def __init__(self, model: nn.Module, levels: int = 8):
        super().__init__()
        check_int("levels", levels, minimum=2)
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * (self.levels - 1)) / (self.levels - 1))


class Saturated(nn.Module):
    """The classifier's logits times ``scale``: the same predictions, a saturated softmax."""

    def __init__(self, model: nn.Module, scale: float = 1e4):
        super().__init__()
        check_number("scale", scale, strict=True)
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(x) * self.scale


class Undeclared(nn.Module):
    """Drops each input pixel with probability ``p`` at every call, in eval mode too, without saying so."""

    def __init__(self, model: nn.Module, p: float = 0.3):
        super().__init__()
        check_number("p", p)
        if not p < 1:
            raise ValueError(f"p must be < 1, got {p!r}")
        self.model, self.p = model, p

    def forward(self, x):
        keep = torch.rand_like(x) >= self.p
        return self.model(x * keep)


class _Reverse(torch.autograd.Function):
    """The identity forward; the gradient negated backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Steered(nn.Module):
    """The classifier with its input gradient negated: every gradient step moves toward the true class."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_Reverse.apply(x))


GALLERY = {"shattered": Shattered, "saturated": Saturated, "undeclared randomness": Undeclared, "steered": Steered}


def gallery(model: nn.Module) -> dict[str, nn.Module]:
    """Each masked version of ``model`` (sharing its weights), by name."""
    return {name: cls(model) for name, cls in GALLERY.items()}
