"""Audit your own defense: the book's whole evaluation of any classifier in one call.

    from defenses_lib.audit import audit
    report = audit(model, x, y, eps=8 / 255)     # model: inputs in [0, 1], logits out
    print(report)                                # a table in a notebook

    python -m defenses_lib.audit mypackage.models:build --data cifar10 --n 500 --eps 0.0314 --out audit.json

The audit runs what every chapter of the book runs on its defenses (see ``EVALUATION.md`` in the
book's notes): FGSM (l_inf), PGD with the cross-entropy and with the margin loss, the per-example
worst case over them and AutoAttack, every accuracy with its 95% interval, and the five
gradient-masking sanity checks. A randomized model (two passes on one input differ) is attacked
through an EOT average of ``draws`` passes per step, scored over ``repeats`` predictions per
example, AutoAttack's ``rand`` version decides with its expected prediction, and its randomness
is fixed (by re-seeding torch's generator at every call) for the fifth check. The report lists what
it did not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .attacks import check_eps, check_inputs, eval_mode, fgsm, pgd, with_draws
from .checks import check_int
from .evaluation import (FixedRandomness, RobustResult, SanityReport, autoattack, evaluate, is_randomized,
                         sanity_checks, table_html)
from .runtime import model_device

AA_N, SANITY_N = 1_000, 500   # the examples AutoAttack and the sanity checks see, at most, by default


@dataclass
class Audit:
    """What :func:`audit` found: the robust result, the sanity report, what ran and what did not."""

    result: RobustResult      # every attack, AutoAttack included, on the examples AutoAttack ran on
    whitebox: RobustResult    # FGSM and PGD on every example
    sanity: SanityReport
    randomized: bool
    settings: dict
    not_run: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every applicable sanity check passed (the numbers are worth quoting only then)."""
        return self.sanity.passed

    def __str__(self) -> str:
        head = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        lines = [f"Audit ({head})", str(self.result)]
        if self.whitebox.n > self.result.n:
            lines.append(f"FGSM and PGD on all {self.whitebox.n}:\n{self.whitebox}")
        lines += [str(self.sanity), "Not run:"]
        return "\n".join(lines + [f"  - {s}" for s in self.not_run])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = table_html({k: {"": str(v)} for k, v in self.settings.items()}, caption="audit settings")
        missing = "".join(f"<li>{s}</li>" for s in self.not_run)
        whitebox = self.whitebox._repr_html_() if self.whitebox.n > self.result.n else ""
        return (head + self.result._repr_html_() + whitebox + self.sanity._repr_html_()
                + f"<p>Not run:</p><ul>{missing}</ul>")

    def to_dict(self) -> dict:
        """The audit as JSON-able data: settings, accuracies with intervals, per-example outcomes, checks."""
        rows = {k: {"accuracy": e.value, "low": e.low, "high": e.high, "n": e.n}
                for k, e in self.result.intervals().items()}
        whitebox = {k: {"accuracy": e.value, "low": e.low, "high": e.high, "n": e.n}
                    for k, e in self.whitebox.intervals().items()}
        return {"settings": self.settings, "randomized": self.randomized, "accuracy": rows,
                "outcomes": {k: v.float().tolist() for k, v in self.result.outcomes().items()},
                "whitebox accuracy": whitebox,
                "sanity": {"passed": self.passed, "checks": [
                    {"name": c.name, "status": self.sanity.status(c), "detail": c.detail} for c in self.sanity.checks]},
                "not_run": self.not_run}


def _attacks(eps: float, norm: str, steps: int, randomized: bool) -> dict:
    """The white-box attacks of the audit: FGSM (l_inf) and PGD with two losses (no early stop if randomized)."""
    pgd_at = partial(pgd, eps=eps, norm=norm, steps=steps, alpha=2.5 * eps / steps, early_stop=not randomized)
    attacks = {"FGSM": partial(fgsm, eps=eps)} if norm == "linf" else {}
    return {**attacks, f"PGD-{steps} CE": pgd_at, f"PGD-{steps} margin": partial(pgd_at, loss="margin")}


def _randomness(model, x, draws, repeats, fixed_model, seed) -> tuple[bool, nn.Module, int, nn.Module | None]:
    """Whether the model is randomized; then its attack model, its repeats and its fixed twin."""
    if not is_randomized(model, x[:8]):
        if (draws or 1) != 1 or (repeats or 1) != 1:
            raise ValueError(f"the model is deterministic: draws and repeats must be None or 1, got {draws}, {repeats}")
        return False, model, 1, None
    draws, repeats = draws or 8, repeats or 4
    check_int("draws", draws)
    check_int("repeats", repeats)
    attacker = with_draws(model, draws)
    fixed = fixed_model if fixed_model is not None else FixedRandomness(attacker, seed)
    if is_randomized(fixed, x[:8]):
        raise ValueError("the model is randomized and re-seeding torch's generator does not fix its randomness: "
                         "pass fixed_model, its attack model with the randomness fixed")
    return True, attacker, repeats, fixed


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", *, steps: int = 100,
          draws: int | None = None, repeats: int | None = None, aa_n: int | None = None,
          sanity_n: int | None = None, square_queries: int = 5_000, fixed_model: nn.Module | None = None,
          seed: int = 0, batch_size: int = 250) -> Audit:
    """The book's whole evaluation of ``model`` (inputs in [0, 1], logits out) on (x, y) at ``eps``.

    Clean accuracy and accuracy under FGSM (l_inf) and PGD-``steps`` (cross-entropy and margin losses)
    on every example; AutoAttack (the standard version, or on a randomized model the ``rand`` version
    deciding with its expected prediction) on the first ``aa_n`` (default: up to 1,000); the
    per-example worst case over all of them; the sanity checks on the first ``sanity_n`` (up to 500).
    A randomized model is attacked through the average of ``draws`` passes (default 8) and scored
    over ``repeats`` predictions (default 4); ``fixed_model`` is its attack model with the randomness
    fixed (default: re-seeding torch's generator at every call, checked to work).
    """
    check_inputs(x, y)
    check_eps(eps, norm)
    for name, value in (("steps", steps), ("square_queries", square_queries), ("batch_size", batch_size)):
        check_int(name, value)
    aa_n, sanity_n = min(aa_n or AA_N, len(y)), min(sanity_n or SANITY_N, len(y))
    check_int("aa_n", aa_n)
    check_int("sanity_n", sanity_n)
    with eval_mode(model), torch.no_grad():
        num_classes = model(x[:1].to(model_device(model))).shape[1]
    torch.manual_seed(seed)
    randomized, attacker, repeats, fixed = _randomness(model, x, draws, repeats, fixed_model, seed)
    whitebox = evaluate(model, x, y, _attacks(eps, norm, steps, randomized), batch_size, "audit", attacker, repeats)
    version = "rand" if randomized else "standard"
    aa = partial(autoattack, eps=eps, norm=norm, version=version, seed=seed, batch_size=batch_size)
    result = whitebox.merge(evaluate(model, x[:aa_n], y[:aa_n], {f"AutoAttack ({version})": aa}, batch_size,
                                   repeats=repeats), setting=f"audit, AutoAttack on the first {aa_n}")
    sanity = sanity_checks(model, x[:sanity_n], y[:sanity_n], eps, norm, steps=steps, n_queries=square_queries,
                           fixed_model=fixed, num_classes=num_classes, batch_size=batch_size,
                           attack_model=attacker if randomized else None, repeats=repeats)
    settings = {"threat": f"{norm} eps = {eps:g}", "n": len(y), "PGD steps": steps,
                "AutoAttack": f"{version}, first {aa_n}",
                "sanity checks": f"first {sanity_n}, Square {square_queries} queries", "seed": seed}
    if randomized:
        settings["randomized"] = f"EOT over {draws or 8} draws per step, scored over {repeats} predictions"
    return Audit(result, whitebox, sanity, randomized, settings, _not_run(len(y), aa_n, sanity_n, randomized))


def _not_run(n: int, aa_n: int, sanity_n: int, randomized: bool) -> list[str]:
    """What the audit leaves to its user, in words."""
    out = ["adaptive attacks designed for this defense (Tramer et al. 2020): the audit's attacks are generic",
           "BPDA: the attacks differentiate the model as it is; non-differentiable parts need a differentiable "
           "stand-in (a failed sanity check 2 or 4 is the sign)",
           "certification: the audit is empirical (a smoothed model certifies with smoothing.certify)",
           "transfer attacks from other models, and training seeds: one model, as given"]
    if aa_n < n:
        out.append(f"AutoAttack on {n - aa_n} of the {n} examples (it ran on the first {aa_n})")
    if sanity_n < n:
        out.append(f"the sanity checks on {n - sanity_n} of the {n} examples (they ran on the first {sanity_n})")
    if randomized:
        out.append("a sweep over the EOT draws and steps showing more would not lower the accuracy "
                   "(strength.strength_sweep)")
    return out


def _load_model(spec: str, checkpoint: str | None, device: str | None) -> nn.Module:
    """``package.module:callable`` called with no arguments, its weights from ``checkpoint`` (a state dict)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"model must be 'package.module:callable', got {spec!r}")
    model = getattr(importlib.import_module(module), name)()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} must return a torch.nn.Module, got {type(model).__name__}")
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.to(device) if device else model


def main(argv=None) -> Audit:
    """The command line: audit a model built by an importable function on a data set's first test images."""
    from .data import DATASETS, balanced_subset, load_dataset

    ap = argparse.ArgumentParser(prog="python -m defenses_lib.audit", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="package.module:callable returning the model (inputs in [0, 1], logits out)")
    ap.add_argument("--checkpoint", help="a state dict to load into it (loaded with weights_only=True)")
    ap.add_argument("--data", choices=DATASETS, required=True)
    ap.add_argument("--root", help="data folder (default: $DEFENSES_DATA, else download)")
    ap.add_argument("--n", type=int, default=1_000, help="test images, a class-balanced subset")
    ap.add_argument("--eps", type=float, required=True)
    ap.add_argument("--norm", choices=("linf", "l2"), default="linf")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--draws", type=int, help="EOT draws per step, for a randomized model (default 8)")
    ap.add_argument("--aa-n", type=int)
    ap.add_argument("--sanity-n", type=int)
    ap.add_argument("--square-queries", type=int, default=5_000)
    ap.add_argument("--device", help="for example cuda (default: where the model's weights are)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the audit as JSON here")
    a = ap.parse_args(argv)
    model = _load_model(a.model, a.checkpoint, a.device)
    x, y = balanced_subset(load_dataset(a.data, "test", a.root), a.n, seed=a.seed).tensors()
    report = audit(model, x, y, a.eps, a.norm, steps=a.steps, draws=a.draws, aa_n=a.aa_n, sanity_n=a.sanity_n,
                   square_queries=a.square_queries, seed=a.seed)
    print(report)
    if a.out:
        from pathlib import Path

        from .runtime import atomic_write
        atomic_write(Path(a.out), lambda p: Path(p).write_text(json.dumps(report.to_dict(), indent=1)))
    return report


if __name__ == "__main__":
    main()
