"""Code follows the model's device: every public attack, evaluation and certification function moves
its inputs to the model's parameters and draws its noise there.

Without a GPU, the second device is PyTorch's ``meta`` device: the spy model's parameters live
there, the inputs start on the CPU, and the spy raises ``Reached`` when an input arrives on its
device (the check passed) or fails the test when one arrives anywhere else. A torch function mode
records any random tensor drawn on the CPU on the way, which would be a draw made on one device and
copied to another. The GPU smoke run (``make gpu-smoke``) checks the rest on a real GPU.
"""

from functools import partial

import pytest
import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.overrides import TorchFunctionMode

from defenses_lib import attacks, evaluation
from defenses_lib.defenses.base import Defense
from defenses_lib.defenses.smoothing import (SmoothedClassifier, VariationalSmoothing, certify,
                                             certify_variational, sample_counts)
from defenses_lib.evaluation import FixedRandomness

META = torch.device("meta")
RANDOM = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randperm,
          torch.normal, torch.bernoulli, torch.Tensor.uniform_, torch.Tensor.normal_}


class Reached(Exception):
    """The spy got an input on its own device."""


class Spy(nn.Module):
    """Parameters on the meta device: raises Reached for an input there, and fails the test for any other."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(10, 64, device=META))

    def forward(self, x, *_):
        assert x.device == self.weight.device, f"input on {x.device}, parameters on {self.weight.device}"
        raise Reached


class CpuDraws(TorchFunctionMode):
    """Records every random tensor drawn on the CPU while it is active."""

    def __init__(self):
        super().__init__()
        self.drawn = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in RANDOM and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            self.drawn.append(getattr(func, "__name__", str(func)))
        return out


def _data(n=6, binary=False):
    torch.manual_seed(0)
    x = torch.rand(n, 1, 8, 8)
    return (x > 0.5).float() if binary else x, torch.arange(n) % 10


def _variational(selector):
    """A variational defense whose selector (what certification runs first) is the spy."""
    return VariationalSmoothing(Spy(), selector, 0.25, draws=2, median_draws=3, levels=(0.12, 0.25, 0.5))


def _forward(model, x, y):
    """An attack that only runs the model: run_attack must hand it inputs on the model's device."""
    return model(x)


CALLS = {
    "pgd": lambda m, x, y: attacks.pgd(m, x, y, eps=0.1, steps=2),
    "pgd l2": lambda m, x, y: attacks.pgd(m, x, y, eps=1.0, steps=2, norm="l2"),
    "fgsm": lambda m, x, y: attacks.fgsm(m, x, y, eps=0.1),
    "best_of": lambda m, x, y: attacks.best_of(partial(attacks.pgd, eps=0.1, steps=2), 2)(m, x, y),
    "top_k_targeted": lambda m, x, y: attacks.top_k_targeted(partial(attacks.pgd, eps=0.1, steps=2), 2)(m, x, y),
    "signed_ascent": lambda m, x, y: attacks.signed_ascent(lambda z: m(z).sum(1), x, 2, 0.1, model=m),
    "rfgsm_k": lambda m, x, y: attacks.rfgsm_k(m, (x > 0.5).float(), y, steps=2),
    "pgd on EOT": lambda m, x, y: attacks.pgd(attacks.EOT(m, 3, batch_size=4), x, y, eps=0.1, steps=2),
    "pgd on smoothing": lambda m, x, y: attacks.pgd(SmoothedClassifier(m, 0.25, 3, batch_size=4), x, y, eps=0.1),
    "pgd on fixed randomness": lambda m, x, y: attacks.pgd(FixedRandomness(SmoothedClassifier(m, 0.25, 2)), x, y,
                                                           eps=0.1),
    "predict": lambda m, x, y: evaluation.predict(m, x),
    "accuracy": lambda m, x, y: evaluation.accuracy(m, x, y),
    "correctness": lambda m, x, y: evaluation.correctness(m, x, y, repeats=2),
    "run_attack": lambda m, x, y: evaluation.run_attack(_forward, m, x, y),
    "evaluate": lambda m, x, y: evaluation.evaluate(m, x, y, {"PGD": partial(attacks.pgd, eps=0.1, steps=2)}),
    "eps_sweep": lambda m, x, y: evaluation.eps_sweep(m, x, y, [0.1], lambda e: {"PGD": partial(attacks.pgd, eps=e)}),
    "transfer_matrix": lambda m, x, y: evaluation.transfer_matrix([m], x, y, _forward),
    "autoattack": lambda m, x, y: evaluation.autoattack(m, x, y, eps=0.1, version="custom", attacks=["apgd-ce"]),
    "square_attack": lambda m, x, y: evaluation.square_attack(m, x, y, eps=0.1, n_queries=5),
    "sanity_checks": lambda m, x, y: evaluation.sanity_checks(m, x, y, eps=0.1, steps=2),
    "Defense.evaluate": lambda m, x, y: Defense("spy", m).evaluate(x, y, {"FGSM": partial(attacks.fgsm, eps=0.1)}),
    "Defense.autoattack": lambda m, x, y: Defense("spy", m).autoattack(x, y, eps=0.1, version="custom",
                                                                        attacks=["apgd-ce"]),
    "sample_counts": lambda m, x, y: sample_counts(m, x[0], 0.25, num=10, num_classes=10),
    "certify": lambda m, x, y: certify(m, x, 0.25, n0=5, n=10),
    "certify_variational": lambda m, x, y: certify_variational(_variational(m), x, [0.25], n0=5, n=10,
                                                               selector_draws=4),
}


@pytest.fixture(autouse=True)
def _no_cache(monkeypatch):
    """No evaluation cache: its key reads the weights, which a meta tensor does not have."""
    monkeypatch.setenv("DEFENSES_EVAL_CACHE", "0")


@pytest.fixture(autouse=True)
def _meta_nonzero():
    """Let nonzero() run on meta tensors (PGD's bookkeeping of the examples still running uses it)."""
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


@pytest.mark.parametrize("name", list(CALLS))
def test_inputs_and_draws_follow_the_model_to_its_device(name):
    x, y = _data()
    with CpuDraws() as mode, pytest.raises(Reached):
        CALLS[name](Spy(), x, y)
    assert mode.drawn == [], f"{name} drew {mode.drawn} on the CPU for a model on {META}"


def test_the_spy_fails_an_attack_that_leaves_the_inputs_where_they_are():
    """The positive control: a PGD that forgets to move its inputs is caught."""
    def stay_put(model, x, y):
        return model(x)

    x, y = _data()
    with pytest.raises(AssertionError, match="input on cpu, parameters on meta"):
        stay_put(Spy(), x, y)


def test_the_draw_recorder_catches_noise_drawn_on_the_cpu_and_copied_over():
    """The positive control: noise drawn with a CPU generator, then moved, is recorded."""
    x = torch.zeros(2, 1, 8, 8, device=META)
    with CpuDraws() as mode:
        x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(META)
    assert mode.drawn == ["randn"]


def test_results_come_back_on_the_inputs_device(tiny_model):
    """Attacks return x_adv where x was; evaluation returns per-example results on the CPU."""
    x, y = _data()
    assert attacks.pgd(tiny_model, x, y, eps=0.1, steps=2).device == x.device
    assert evaluation.predict(tiny_model, x).device.type == "cpu"
