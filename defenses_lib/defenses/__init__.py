"""The defenses, one module per paper, and the registry that builds any of them by chapter.

Every module exposes ``build(P, train_set, device=None, names=None) -> {name: Defense}`` (see
:mod:`.base`). Adding a defense to the book is one module, one chapter and one ``register`` line
(plus its profiles, :func:`defenses_lib.profiles.register_profiles`).
"""

from __future__ import annotations

from typing import Callable

from ..checks import check_choice
from . import armor, baselines, drsl, ensembles, purification, smoothing
from .base import Defense, cross_check

__all__ = ["REGISTRY", "Defense", "build", "cross_check", "register"]

REGISTRY: dict[str, Callable] = {}


def register(chapter: str, build: Callable) -> None:
    """Make ``build(P, train_set, device=None, names=None) -> {name: Defense}`` the builder of ``chapter``."""
    if not callable(build):
        raise ValueError(f"build must be callable, got {build!r}")
    REGISTRY[chapter] = build


def build(chapter: str, P, train_set, device=None, names=None) -> dict[str, Defense]:
    """The trained defenses of ``chapter`` from its profile ``P`` (each of ``names`` only)."""
    check_choice("chapter", chapter, sorted(REGISTRY))
    return REGISTRY[chapter](P, train_set, device=device, names=names)


register("foundations", baselines.build)
register("ensembles", ensembles.build)
register("purification", purification.build)
register("smoothing", smoothing.build)
register("armor", armor.build)
register("drsl", drsl.build)
