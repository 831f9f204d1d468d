"""One evaluation path for every chapter: clean and robust accuracy, the per-example worst case over
attacks, accuracy-vs-eps curves, an AutoAttack adapter and the gradient-masking sanity checks.

An *attack* is any callable ``attack(model, x, y) -> x_adv``; ``functools.partial(pgd, eps=0.1)``
is one.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .attacks import check_inputs, eval_mode, fgsm, pgd
from .runtime import model_device, progress, record
from .stats import Estimate, accuracy_interval


def _batches(n: int, batch_size: int):
    """Slices that cover range(n) in batches."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's predicted classes for x, in eval mode, in batches."""
    dev = model_device(model)
    with eval_mode(model):
        return torch.cat([model(x[s].to(dev)).argmax(1).cpu() for s in _batches(len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Clean accuracy of the model on (x, y)."""
    check_inputs(x, y)
    return (predict(model, x, batch_size) == y).float().mean().item()


def error_rates(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and the macro-averaged false-positive and false-negative rates of a confusion matrix
    (one-vs-rest per class, then averaged), as the ARMOR_D paper reports them."""
    cm = torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes).double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    return {"accuracy": (tp.sum() / cm.sum()).item(), "FPR": (fp / (fp + tn)).nanmean().item(),
            "FNR": (fn / (fn + tp)).nanmean().item()}


def run_attack(attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250,
               desc: str | None = None) -> torch.Tensor:
    """Run an attack over (x, y) in batches on the model's device, with a progress bar; returns x_adv."""
    check_inputs(x, y)
    dev = model_device(model)
    parts = [attack(model, x[s].to(dev), y[s].to(dev)).cpu()
             for s in progress(_batches(len(x), batch_size), desc, enabled=desc is not None)]
    return torch.cat(parts)


def correctness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """Per example: right or wrong (bool); with ``repeats`` > 1, the fraction of that many independent predictions that are right.

    For a randomized defense the fraction estimates the probability, over the defense's own
    randomness, that it classifies the example correctly: accuracy as an expectation over draws.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if repeats == 1:
        return predict(model, x) == y
    return torch.stack([predict(model, x) == y for _ in range(repeats)]).float().mean(0)


@dataclass
class RobustResult:
    """Per-example correctness (bool, or a probability for a randomized defense) under clean inputs and each attack."""

    correct: dict[str, torch.Tensor]
    seconds: dict[str, float] = field(default_factory=dict)
    setting: str = ""

    @property
    def n(self) -> int:
        """Number of test examples."""
        return len(next(iter(self.correct.values())))

    @property
    def worst_case(self) -> torch.Tensor:
        """An example counts as robust only if it is right clean and under every attack (the minimum probability, if estimated)."""
        values = list(self.correct.values())
        if all(v.dtype == torch.bool for v in values):
            return torch.stack(values).all(0)
        return torch.stack([v.float() for v in values]).amin(0)

    def accuracy(self) -> dict[str, float]:
        """Accuracy per row, the worst case last."""
        acc = {k: v.float().mean().item() for k, v in self.correct.items()}
        acc["worst case"] = self.worst_case.float().mean().item()
        return acc

    def outcomes(self) -> dict[str, torch.Tensor]:
        """Per-example outcomes per row, the worst case last (what paired tests compare)."""
        return {**self.correct, "worst case": self.worst_case}

    def intervals(self, level: float = 0.95) -> dict[str, Estimate]:
        """Accuracy per row with its interval (Wilson's, or a bootstrap for a randomized defense's probabilities)."""
        return {k: accuracy_interval(v, level) for k, v in self.outcomes().items()}

    def __str__(self) -> str:
        rows = [f"{k:<28}{100 * e.value:6.1f}%  [{100 * e.low:.1f}, {100 * e.high:.1f}]"
                for k, e in self.intervals().items()]
        return "\n".join([f"n = {self.n} {self.setting}, accuracy [95% interval]".strip()] + rows)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return table_html({k: {"accuracy (%) [95% interval]": e} for k, e in self.intervals().items()},
                          caption=f"n = {self.n} {self.setting}")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: dict, batch_size: int = 250,
             setting: str = "", attack_model: nn.Module | None = None, repeats: int = 1) -> RobustResult:
    """Clean accuracy, accuracy under each named attack, and the per-example worst case.

    The attacks are run against ``attack_model`` (default: the model itself), for instance an EOT
    average with fewer draws than the randomized defense predicts with; accuracy is always the model's,
    scored over ``repeats`` independent predictions (see :func:`correctness`).
    """
    check_inputs(x, y)
    correct = {"clean": correctness(model, x, y, repeats)}
    seconds = {}
    for name, attack in attacks.items():
        t0 = time.perf_counter()
        x_adv = run_attack(attack, attack_model or model, x, y, batch_size, desc=name)
        correct[name] = correctness(model, x_adv, y, repeats)
        seconds[name] = time.perf_counter() - t0
    result = RobustResult(correct, seconds, setting)
    record("evaluation", setting=setting, n=len(y), repeats=repeats, attacks={k: repr(a) for k, a in attacks.items()},
           accuracy=result.accuracy(), seconds=seconds)
    return result


def eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list, attacks_at, batch_size: int = 250,
              setting: str = "", attack_model: nn.Module | None = None, repeats: int = 1) -> dict[float, RobustResult]:
    """``evaluate`` at each eps with the attacks ``attacks_at(eps)`` returns (clean only at eps = 0)."""
    return {float(e): evaluate(model, x, y, attacks_at(e) if e > 0 else {}, batch_size, f"{setting} eps = {e:g}".strip(),
                               attack_model, repeats)
            for e in progress(list(eps_list), "eps sweep")}


def curve(sweep: dict[float, RobustResult], attack: str) -> dict[float, float]:
    """Accuracy against eps under one attack of an ``eps_sweep`` (clean accuracy at eps = 0)."""
    return {e: r.accuracy()[attack if e > 0 else "clean"] for e, r in sweep.items()}


def transfer_outcomes(models, x: torch.Tensor, y: torch.Tensor, attack, batch_size: int = 250) -> torch.Tensor:
    """O[i, j, k] = whether model j classifies example k right after the attack made it against model i (bool)."""
    check_inputs(x, y)
    rows = []
    for source in models:
        x_adv = run_attack(attack, source, x, y, batch_size)
        rows.append(torch.stack([predict(target, x_adv) == y for target in models]))
    return torch.stack(rows)


def transfer_matrix(models, x: torch.Tensor, y: torch.Tensor, attack, batch_size: int = 250) -> torch.Tensor:
    """M[i, j] = accuracy of model j on adversarial examples made against model i (the diagonal is white-box)."""
    return transfer_outcomes(models, x, y, attack, batch_size).float().mean(2)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               version: str = "standard", attacks=None, n_target_classes: int | None = None,
               square_queries: int | None = None, seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """AutoAttack (Croce and Hein, PyPI ``pyautoattack``) on the model; returns the adversarial examples.

    ``version`` is 'standard' (APGD-CE, APGD-T, FAB-T, Square), 'rand' (APGD-CE and APGD-DLR with
    EOT over 20 draws, for randomized defenses) or 'custom' with ``attacks`` a subset of
    ['apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square'], run with the standard version's settings.
    """
    from pyautoattack import AutoAttack

    check_inputs(x, y, eps, norm)
    dev = model_device(model)
    with eval_mode(model):
        aa = AutoAttack(model, eps=eps, norm={"linf": "Linf", "l2": "L2"}[norm],
                        version="standard" if version == "custom" else version, seed=seed, device=dev)
        if version == "custom":  # the standard version's settings (one APGD-CE restart, ...), fewer attacks
            aa.version, aa.attacks_to_run = "custom", list(attacks)
        aa.verbose = False
        if n_target_classes is not None:
            aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = n_target_classes
        if square_queries is not None:
            aa.square.n_queries = square_queries
        x_adv, _ = aa.run_standard_evaluation(x.to(dev), y.to(dev), batch_size=batch_size)
    return x_adv.detach().cpu()


def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
                  n_queries: int = 1000, seed: int = 0) -> torch.Tensor:
    """The black-box Square attack (Andriushchenko et al.), from AutoAttack's package."""
    from pyautoattack.square import SquareAttack

    check_inputs(x, y, eps, norm)
    with eval_mode(model), torch.no_grad():
        sq = SquareAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], n_queries=n_queries, eps=eps,
                          p_init=0.8, n_restarts=1, seed=seed, verbose=False, resc_schedule=False,
                          device=model_device(model))
        return sq.perturb(x.to(model_device(model)), y.to(model_device(model))).cpu()


def _cell(v, digits: int) -> str:
    """One table cell: a float to ``digits`` decimals (NaN as a dash), an Estimate as its value over its interval."""
    if isinstance(v, float):
        return "<td>–</td>" if math.isnan(v) else f"<td>{v:.{digits}f}</td>"
    if isinstance(v, Estimate):
        f = lambda x: f"{v.scale * x:.{v.digits}f}"
        return f"<td>{f(v.value)}<br><small style='white-space:nowrap'>[{f(v.low)}, {f(v.high)}]</small></td>"
    return f"<td>{html.escape(str(v))}</td>"


def table_html(rows: dict[str, dict[str, float]], caption: str = "", digits: int = 1) -> str:
    """A small HTML table from {row: {column: value}}; a NaN shows as a dash (not defined), an
    :class:`~defenses_lib.stats.Estimate` as its value and 95% interval."""
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr><th>" + html.escape(str(r)) + "</th>"
        + "".join(_cell(v, digits) for v in (vals.get(c, "") for c in cols)) + "</tr>"
        for r, vals in rows.items())
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Check:
    """One sanity check: its name, whether it passed, and the numbers behind it."""

    name: str
    passed: bool | None  # None: not applicable
    detail: str


@dataclass
class SanityReport:
    """The gradient-masking sanity checks of EVALUATION.md, readable as text or HTML."""

    checks: list[Check]
    setting: str

    @property
    def passed(self) -> bool:
        """True when no applicable check failed."""
        return all(c.passed is not False for c in self.checks)

    def status(self, c: Check) -> str:
        """PASS, FAIL or N/A."""
        return "N/A" if c.passed is None else ("PASS" if c.passed else "FAIL")

    def __str__(self) -> str:
        lines = [f"Sanity checks ({self.setting}): {'all passed' if self.passed else 'FAILED'}"]
        lines += [f"  [{self.status(c):4}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        rows = {c.name: {"status": self.status(c), "evidence": c.detail} for c in self.checks}
        return table_html(rows, caption=f"Sanity checks ({self.setting}): {'all passed' if self.passed else 'FAILED'}")


class FixedRandomness(nn.Module):
    """A randomized model with its randomness fixed: every call re-seeds the global RNG (restored afterwards).

    For defenses that draw their noise from torch's global generator (smoothing, variational
    smoothing): the same input then meets the same noise at every call, the fifth sanity check's model.
    """

    def __init__(self, model: nn.Module, seed: int = 0):
        super().__init__()
        self.model, self.seed = model, seed

    def forward(self, x):
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(self.seed)
            return self.model(x)


def is_randomized(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether two forward passes on the same input give different outputs."""
    dev = model_device(model)
    with eval_mode(model), torch.no_grad():
        return not torch.allclose(model(x.to(dev)), model(x.to(dev)))


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
                  steps: int = 40, large_eps: float | None = None, n_queries: int = 1000,
                  fixed_model: nn.Module | None = None, tol: float = 0.03, num_classes: int = 10,
                  batch_size: int = 250, attack_model: nn.Module | None = None, repeats: int = 1) -> SanityReport:
    """Run the five gradient-masking checks of EVALUATION.md on (x, y) at budget eps; return a report.

    1. PGD is at least as strong as FGSM (l_inf) or a one-step attack (l_2).
    2. Accuracy falls with eps (at eps/2, eps, 2 eps, ``large_eps``) and is below chance + tol at ``large_eps``.
    3. Twice the steps and two restarts change PGD's accuracy by at most ``tol``.
    4. The black-box Square attack (``n_queries``) is not stronger than PGD by more than ``tol``.
    5. For a randomized model: PGD against ``fixed_model`` (the same defense with its randomness
       fixed) is at least as strong as against the randomized one. Not applicable to a deterministic model.

    On a randomized model two runs of the same attack differ by chance, so PGD is run twice, its
    accuracy is the mean of the two runs, and checks 3 to 5 allow ``tol`` plus the difference
    between the runs (the attack's measured run-to-run noise).

    Every attack, Square included, is run against ``attack_model`` (default: the model itself, e.g. an
    EOT average with fewer draws); every accuracy is the model's, scored over ``repeats`` predictions
    (see :func:`correctness`). On a randomized model PGD runs without early stopping (see
    :func:`~defenses_lib.attacks.pgd`).
    """
    check_inputs(x, y, eps, norm)
    large_eps = large_eps if large_eps is not None else (0.5 if norm == "linf" else 4 * eps)
    alpha = 2.5 * eps / steps
    randomized = is_randomized(model, x[:8])

    def acc(m, x_adv):
        return correctness(m, x_adv, y, repeats).float().mean().item()

    target = attack_model or model

    def atk(m, **kw):
        kw.setdefault("early_stop", not randomized)
        return run_attack(partial(pgd, norm=norm, **kw), m, x, y, batch_size)

    runs = [acc(model, atk(target, eps=eps, steps=steps, alpha=alpha)) for _ in range(2 if randomized else 1)]
    a_pgd, noise = sum(runs) / len(runs), max(runs) - min(runs)
    slack = tol + noise
    one_step = (run_attack(partial(fgsm, eps=eps), target, x, y, batch_size) if norm == "linf"
                else atk(target, eps=eps, steps=1, alpha=eps, random_start=False))
    a_one = acc(model, one_step)
    pgd_text = f"PGD-{steps} {100 * a_pgd:.1f}%" + (f" (two runs: {', '.join(f'{100 * a:.1f}%' for a in runs)})"
                                                    if randomized else "")
    checks = [Check("iterative beats single-step", a_pgd <= a_one + 1e-9,
                    f"{pgd_text} <= {'FGSM' if norm == 'linf' else 'one step'} {100 * a_one:.1f}%")]

    curve = {e: acc(model, atk(target, eps=e, steps=steps, alpha=2.5 * e / steps)) for e in (eps / 2, 2 * eps, large_eps)}
    curve[eps] = a_pgd
    curve = dict(sorted(curve.items()))
    vals = list(curve.values())
    monotone = all(b <= a + tol for a, b in zip(vals, vals[1:]))
    chance = 1 / num_classes
    checks.append(Check("accuracy falls with eps to chance", monotone and vals[-1] <= chance + tol,
                        ", ".join(f"eps {e:.3g}: {100 * a:.1f}%" for e, a in curve.items()) + f" (chance {100 * chance:.0f}%)"))

    a_more = acc(model, atk(target, eps=eps, steps=2 * steps, alpha=2.5 * eps / (2 * steps), restarts=2))
    checks.append(Check("attack has converged", abs(a_more - a_pgd) <= slack,
                        f"PGD-{steps} {100 * a_pgd:.1f}% vs PGD-{2 * steps} x 2 restarts {100 * a_more:.1f}%"
                        + (f" (allowed: {100 * slack:.1f} points, run-to-run noise included)" if randomized else "")))

    a_sq = acc(model, square_attack(target, x, y, eps, norm, n_queries))
    checks.append(Check("black-box not stronger than white-box", a_sq >= min(a_pgd, a_more) - slack,
                        f"Square ({n_queries} queries) {100 * a_sq:.1f}% >= PGD {100 * min(a_pgd, a_more):.1f}%"))

    if not randomized:
        checks.append(Check("fixed randomness: attack succeeds", None, "deterministic model: no randomness to fix"))
    elif fixed_model is None:
        checks.append(Check("fixed randomness: attack succeeds", False, "randomized model: pass fixed_model to run this check"))
    else:
        # no early stopping here either: a fixed seed may still draw other noise for a smaller batch
        a_fixed = acc(fixed_model, atk(fixed_model, eps=eps, steps=steps, alpha=alpha, early_stop=False))
        checks.append(Check("fixed randomness: attack succeeds", a_fixed <= a_pgd + slack,
                            f"PGD on the fixed-randomness model {100 * a_fixed:.1f}% <= on the randomized one {100 * a_pgd:.1f}%"))
    report = SanityReport(checks, f"{norm} eps = {eps:g}, n = {len(y)}")
    record("sanity checks", setting=report.setting, passed=report.passed,
           checks=[{"name": c.name, "status": report.status(c), "detail": c.detail} for c in checks])
    return report
