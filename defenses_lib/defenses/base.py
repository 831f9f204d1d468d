"""The one shape of a trained defense, whatever its chapter: a :class:`Defense`.

Every defense module exposes ``build(P, train_set, device=None, names=None) -> {name: Defense}``
(trained, or loaded from a finished checkpoint) and is listed in the registry of
:mod:`defenses_lib.defenses`. A ``Defense`` says what predicts, what an attacker differentiates,
whether its prediction is random, how it certifies if it does, and what its training cost; its
methods run the book's one evaluation path on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import nn

from ..evaluation import RobustResult, autoattack, eps_sweep, evaluate, sanity_checks
from ..training import Training


@dataclass
class Defense:
    """A trained defense and how to evaluate it honestly."""

    name: str
    model: nn.Module                          # what predicts (a randomized defense: its average over draws)
    trainings: list[Training] = field(default_factory=list)   # every stage of its recipe
    attack_model: nn.Module | None = None     # what the attacker differentiates (None: the model itself)
    randomized: bool = False                  # whether two predictions of one input can differ
    repeats: int = 1                          # predictions each example is scored by
    fixed_model: nn.Module | None = None      # the attack model with its randomness fixed (sanity check 5)
    certify: Callable | None = None           # x -> Certificate, for a defense that certifies
    chapter: str = ""                         # the chapter that derives it

    def __post_init__(self):
        if self.randomized and self.fixed_model is None:
            raise ValueError(f"defense {self.name!r} is randomized: give fixed_model, its attack model with "
                             "the randomness fixed (the fifth sanity check attacks it)")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    @property
    def attacked(self) -> nn.Module:
        """What an attacker differentiates."""
        return self.attack_model if self.attack_model is not None else self.model

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, attacks: dict, setting: str | None = None,
                 batch_size: int = 250) -> RobustResult:
        """Clean and per-attack accuracy and the per-example worst case (see ``evaluation.evaluate``)."""
        return evaluate(self.model, x, y, attacks, batch_size, self.name if setting is None else setting,
                        self.attack_model, self.repeats)

    def sweep(self, x: torch.Tensor, y: torch.Tensor, eps_list, attacks_at) -> dict[float, RobustResult]:
        """``evaluate`` at each eps with the attacks ``attacks_at(eps)`` (see ``evaluation.eps_sweep``)."""
        return eps_sweep(self.model, x, y, eps_list, attacks_at, setting=self.name,
                         attack_model=self.attack_model, repeats=self.repeats)

    def autoattack(self, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", n: int | None = None,
                   seed: int = 0, **settings) -> RobustResult:
        """AutoAttack on the first ``n`` examples (all by default), as a result with the row "AutoAttack";
        ``settings`` are ``evaluation.autoattack``'s (version, attacks, n_target_classes)."""
        n = len(y) if n is None else n
        aa = partial(autoattack, eps=eps, norm=norm, seed=seed, **settings)
        return self.evaluate(x[:n], y[:n], {"AutoAttack": aa}, setting=f"{self.name}, AutoAttack")

    def sanity_checks(self, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", steps: int = 40,
                      n_queries: int = 5000, large_eps: float | None = None, seed: int = 0):
        """The five gradient-masking checks on this defense (see ``evaluation.sanity_checks``)."""
        torch.manual_seed(seed)
        return sanity_checks(self.model, x, y, eps=eps, norm=norm, steps=steps, large_eps=large_eps,
                             n_queries=n_queries, fixed_model=self.fixed_model, attack_model=self.attack_model,
                             repeats=self.repeats)

    @property
    def training_seconds(self) -> float:
        """Wall time of its training stages as recorded."""
        return sum(t.seconds for t in self.trainings)


def select(available: dict[str, Callable], names) -> list[str]:
    """The names to build: all of ``available`` by default, else ``names``, each checked to exist."""
    if names is None:
        return list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"names must be among {list(available)}, got {unknown}")
    return list(names)


def cross_check(defenses: dict[str, Defense], results: dict, x: torch.Tensor, y: torch.Tensor, eps: float,
                n: int, norm: str = "linf", seed: int = 0, **settings) -> dict:
    """AutoAttack as the independent cross-check: each named defense's result at eps merged with
    AutoAttack's on the first ``n`` examples (``settings``: version, attacks, n_target_classes)."""
    return {name: r.merge(defenses[name].autoattack(x, y, eps, norm, n=n, seed=seed, **settings))
            for name, r in results.items()}
