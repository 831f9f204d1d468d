"""Attack strength that converges: a randomized defense's accuracy as the attack's EOT draws per step
and its steps grow, and where that curve has flattened.

An attack on a randomized defense follows a gradient estimated from a few random passes per step.
Too few, or too few steps, and the accuracy it reports is the attack's weakness, not the defense's
strength. :func:`strength_sweep` runs the same PGD on an L-shaped grid: every number of draws at the
fewest steps, then every number of steps at the most draws. :meth:`StrengthSweep.plateau` is the
cheapest setting on each arm that the data do not show to be more than ``tol`` weaker than the
strongest attack on that arm (a paired 95% interval on the same images): the least a table may use.
:meth:`StrengthSweep.within` says whether the data also resolve it to be within ``tol``, which
takes far more images than a quick run has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attacks import check_inputs, with_draws
from .checks import check_choice, check_int, check_number
from .evaluation import evaluate
from .runtime import progress, record
from .stats import Estimate, accuracy_interval, paired_difference

ARMS = ("draws", "steps")


@dataclass
class StrengthSweep:
    """Per-example outcomes of one attack at each (draws per step, steps) of an L-shaped grid."""

    outcomes: dict[tuple[int, int], torch.Tensor]
    draws: tuple[int, ...]
    steps: tuple[int, ...]
    setting: str = ""

    def arm(self, along: str) -> dict[int, torch.Tensor]:
        """The outcomes along one arm: by draws (at the fewest steps) or by steps (at the most draws)."""
        check_choice("along", along, ARMS)
        if along == "draws":
            return {d: self.outcomes[(d, self.steps[0])] for d in self.draws}
        return {s: self.outcomes[(self.draws[-1], s)] for s in self.steps}

    def intervals(self, along: str) -> dict[int, Estimate]:
        """Accuracy with its 95% interval at each point of one arm."""
        return {k: accuracy_interval(v) for k, v in self.arm(along).items()}

    def _strongest(self, along: str) -> int:
        """The point of the arm with the lowest accuracy (the most draws or steps among ties)."""
        arm = self.arm(along)
        return min(arm, key=lambda k: (arm[k].float().mean().item(), -k))

    def gap(self, along: str, k: int) -> Estimate:
        """How far the accuracy at ``k`` lies above the arm's strongest point: a paired 95% interval."""
        arm, best = self.arm(along), self._strongest(along)
        if torch.equal(arm[k], arm[best]):   # the same outcomes: no gap, and no spread to resample
            return Estimate(0.0, 0.0, 0.0, len(arm[k]), "identical outcomes")
        return paired_difference(arm[k], arm[best])

    def plateau(self, along: str, tol: float = 0.03) -> int:
        """The fewest draws (or steps) that the data do not show to be more than ``tol`` weaker than the
        arm's strongest point: the lower end of the paired 95% interval of the gap is at most ``tol``.

        On a small subset that interval is wide, so this catches only a gross weakness; whether the
        data also resolve the gap to be under ``tol`` is :meth:`within`."""
        check_number("tol", tol, strict=True)
        arm, best = self.arm(along), self._strongest(along)
        return next(k for k in arm if k == best or torch.equal(arm[k], arm[best]) or self.gap(along, k).low <= tol)

    def within(self, along: str, k: int, tol: float = 0.03) -> bool:
        """Whether the data resolve the accuracy at ``k`` to be less than ``tol`` above the strongest point."""
        check_number("tol", tol, strict=True)
        return k == self._strongest(along) or self.gap(along, k).high < tol

    def flattened(self, along: str, tol: float = 0.03) -> bool:
        """Whether the arm flattened before its last point (its plateau is not only its end)."""
        values = self.draws if along == "draws" else self.steps
        return self.plateau(along, tol) != values[-1]

    def __str__(self) -> str:
        lines = [f"attack strength {self.setting}".strip()]
        for along in ARMS:
            fixed = f"at {self.steps[0]} steps" if along == "draws" else f"at {self.draws[-1]} draws"
            cells = ", ".join(f"{k}: {100 * e.value:.1f}% [{100 * e.low:.1f}, {100 * e.high:.1f}]"
                              for k, e in self.intervals(along).items())
            lines.append(f"  by {along} ({fixed}): {cells}")
        return "\n".join(lines)

    __repr__ = __str__


def _grid(draws, steps) -> list[tuple[int, int]]:
    """The L-shaped grid: every draws at the fewest steps, then every steps at the most draws."""
    return [(d, steps[0]) for d in draws] + [(draws[-1], s) for s in steps[1:]]


def _checked(name: str, values) -> tuple[int, ...]:
    """A strictly increasing tuple of positive integers, or a ValueError naming the argument."""
    values = tuple(values)
    for v in values:
        check_int(name, v)
    if not values or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be a non-empty increasing sequence of integers >= 1, got {values}")
    return values


def strength_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_at, draws=(1, 2, 4, 8, 16, 32),
                   steps=(40, 100, 200), attack_model: nn.Module | None = None, repeats: int = 1,
                   setting: str = "", batch_size: int = 250) -> StrengthSweep:
    """The accuracy of a randomized ``model`` under ``attack_at(steps)`` (an attack), run against its attack
    model (default: the model) averaged over each number of ``draws`` (see ``attacks.with_draws``),
    scored over ``repeats`` predictions, on the L-shaped grid of draws and steps."""
    check_inputs(x, y)
    draws, steps = _checked("draws", draws), _checked("steps", steps)
    target = attack_model if attack_model is not None else model
    outcomes = {}
    for d, s in progress(_grid(draws, steps), "attack strength"):
        name = f"PGD-{s}, EOT-{d}"
        result = evaluate(model, x, y, {name: attack_at(s)}, batch_size, f"{setting}, {name}".strip(", "),
                          with_draws(target, d), repeats)
        outcomes[(d, s)] = result.correct[name]
    sweep = StrengthSweep(outcomes, draws, steps, setting)
    record("attack strength", setting=setting, n=len(y),
           accuracy={f"{d}x{s}": v.float().mean().item() for (d, s), v in outcomes.items()})
    return sweep
