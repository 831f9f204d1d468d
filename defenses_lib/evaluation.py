"""One evaluation path for every chapter: clean and robust accuracy, the per-example worst case over
attacks, accuracy-vs-eps curves, an AutoAttack adapter and the gradient-masking sanity checks.

An *attack* is any callable ``attack(model, x, y) -> x_adv``; ``functools.partial(pgd, eps=0.1)``
is one.
"""

from __future__ import annotations

import dataclasses
import html
import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from . import distributed, estimate
from .cache import cached
from .attacks import EOT, check_eps, check_inputs, eval_mode, fgsm, log_mean_softmax, pgd, with_draws
from .checks import check_choice, check_int, check_number
from .runtime import model_device, progress, record
from .stats import Estimate, OverSeeds, accuracy_interval


WORST = "worst case"   # the row of a result that takes, per example, the worst over every row


def _batches(n: int, batch_size: int):
    """Slices that cover range(n) in batches."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's predicted classes for x (on the CPU), in eval mode, in batches on the model's device
    (under torchrun, each process predicts its share)."""
    check_int("batch_size", batch_size)
    return distributed.split_work(partial(_predict, model, batch_size=batch_size), x)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``predict`` in this process (in estimate mode its first few images, the rest predicted as class 0)."""
    dev, m = model_device(model), estimate.cap(len(x), estimate.IMAGES)
    with eval_mode(model), estimate.stage("predictions", len(x), m):
        pred = torch.cat([model(x[s].to(dev)).argmax(1).cpu() for s in _batches(m, batch_size)])
    return torch.cat([pred, torch.zeros(len(x) - m, dtype=pred.dtype)])


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
    """Run an attack over (x, y) in batches on the model's device, with a progress bar; returns x_adv
    on the CPU (under torchrun, each process attacks its share of the examples)."""
    check_inputs(x, y)
    check_int("batch_size", batch_size)

    def attack_here(xs, ys):
        """The attack on this process's examples (the first few in estimate mode; the others unchanged)."""
        dev, m = model_device(model), estimate.cap(len(xs), estimate.IMAGES)
        with estimate.stage("attacks", len(xs), m):
            adv = [attack(model, xs[s].to(dev), ys[s].to(dev)).cpu()
                   for s in progress(_batches(m, batch_size), desc, enabled=desc is not None)]
        return torch.cat([*adv, xs[m:].cpu()])

    return distributed.split_work(attack_here, x, y)


def correctness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """Per example: right or wrong (bool); with ``repeats`` > 1, the fraction of that many predictions that are right.

    For a randomized defense the fraction estimates the probability, over the defense's own
    randomness, that it classifies the example correctly: accuracy as an expectation over draws.
    """
    check_int("repeats", repeats)
    y = y.cpu()
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
        """Robust only if right clean and under every attack (the smallest probability, if estimated)."""
        values = list(self.correct.values())
        if all(v.dtype == torch.bool for v in values):
            return torch.stack(values).all(0)
        return torch.stack([v.float() for v in values]).amin(0)

    def accuracy(self) -> dict[str, float]:
        """Accuracy per row, the worst case last."""
        acc = {k: v.float().mean().item() for k, v in self.correct.items()}
        acc[WORST] = self.worst_case.float().mean().item()
        return acc

    def only(self, *rows: str) -> "RobustResult":
        """The clean row and ``rows`` alone, so the worst case is over those attacks only."""
        missing = [r for r in rows if r not in self.correct]
        if missing:
            raise ValueError(f"rows must be among {list(self.correct)}, got {missing}")
        return RobustResult({k: self.correct[k] for k in ("clean", *rows)},
                            {k: v for k, v in self.seconds.items() if k in rows}, self.setting)

    def merge(self, other: "RobustResult", setting: str | None = None) -> "RobustResult":
        """Both results' rows on the examples both scored (the first ``min(n)``, as AutoAttack runs on a
        prefix), so the worst case is over every attack of either; the clean row is this one's."""
        n = min(self.n, other.n)
        clash = (set(self.correct) & set(other.correct)) - {"clean"}
        if clash:
            raise ValueError(f"both results have the rows {sorted(clash)}: rename one before merging")
        rows = {k: v[:n] for k, v in self.correct.items()}
        rows.update({k: v[:n] for k, v in other.correct.items() if k != "clean"})
        return RobustResult(rows, {**self.seconds, **other.seconds},
                            self.setting if setting is None else setting)

    def outcomes(self) -> dict[str, torch.Tensor]:
        """Per-example outcomes per row, the worst case last (what paired tests compare)."""
        return {**self.correct, WORST: self.worst_case}

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
    check_int("batch_size", batch_size)
    check_int("repeats", repeats)
    target = attack_model or model
    (correct, _), hit = cached("clean", (model, x, y, repeats), lambda: (correctness(model, x, y, repeats), 0.0))
    correct, seconds, hits = {"clean": correct}, {}, ["clean"] if hit else []
    for name, attack in attacks.items():
        def attacked(attack=attack, name=name):
            """The attack's row and its seconds."""
            t0 = time.perf_counter()
            x_adv = run_attack(attack, target, x, y, batch_size, desc=name)
            return correctness(model, x_adv, y, repeats), time.perf_counter() - t0

        (correct[name], seconds[name]), hit = cached("attack", (model, target, attack, x, y, repeats, batch_size),
                                                     attacked)
        hits += [name] if hit else []
    result = RobustResult(correct, seconds, setting)
    record("evaluation", setting=setting, n=len(y), repeats=repeats, attacks={k: repr(a) for k, a in attacks.items()},
           accuracy=result.accuracy(), seconds=seconds, cached=hits, device=str(model_device(model)))
    return result


def eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list, attacks_at, batch_size: int = 250,
              setting: str = "", attack_model: nn.Module | None = None, repeats: int = 1) -> dict[float, RobustResult]:
    """``evaluate`` at each eps with the attacks ``attacks_at(eps)`` returns (clean only at eps = 0)."""
    return {float(e): evaluate(model, x, y, attacks_at(e) if e > 0 else {}, batch_size,
                               f"{setting} eps = {e:g}".strip(),
                               attack_model, repeats)
            for e in progress(list(eps_list), "eps sweep")}


def outcomes_of(sweeps: dict[str, dict[float, RobustResult]], row: str = WORST):
    """``out(name, eps, row=row)``: the per-example outcomes of one model's sweep at eps (for claims)."""
    def out(name: str, eps: float, row: str = row) -> torch.Tensor:
        return sweeps[name][eps].outcomes()[row]
    return out


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


DECISION_DRAWS = 16   # predictions AutoAttack's bookkeeping averages on a randomized model, by default


class _Decided(nn.Module):
    """A randomized model as AutoAttack's parts see it: one random pass where they differentiate,
    the expected prediction (``decide``) where they only look, to skip an example or keep an iterate."""

    def __init__(self, model: nn.Module, decide):
        super().__init__()
        self.model, self.decide = model, decide

    def forward(self, x):
        return self.model(x) if torch.is_grad_enabled() else self.decide(x)


def expected_logits(model: nn.Module, draws: int):
    """``f(x)``: the log of the softmax averaged over ``draws`` passes of a randomized model (no gradient),
    whose arg max is its expected prediction."""
    check_int("draws", draws)

    @torch.no_grad()
    def f(x):
        return log_mean_softmax(torch.stack([model(x) for _ in range(draws)]))
    return f


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               version: str = "standard", attacks=None, n_target_classes: int | None = None,
               square_queries: int | None = None, seed: int = 0, batch_size: int = 250,
               decision_draws: int | None = None, eot_draws: int | None = None) -> torch.Tensor:
    """AutoAttack (Croce and Hein, PyPI ``pyautoattack``) on the model; returns the adversarial examples.

    ``version`` is 'standard' (APGD-CE, APGD-T, FAB-T, Square), 'rand' (APGD-CE and APGD-DLR with
    EOT over 20 draws, for randomized defenses) or 'custom' with ``attacks`` a subset of
    ['apgd-ce', 'apgd-dlr', 'apgd-t', 'fab', 'fab-t', 'square'], run with the standard version's settings.

    AutoAttack decides with one forward pass whether an example is already misclassified (then it
    never attacks it) and whether an attack's iterate fools the model (then it keeps it, else the
    clean image), and APGD keeps, step by step, the last iterate one pass misclassified. On a
    randomized model a noisy pass makes all of these decisions by chance, and the result overstates
    robustness. Here the first two use the expected prediction over ``decision_draws`` passes
    (default: 1 on a deterministic model, ``DECISION_DRAWS`` on a randomized one), and every attack
    step differentiates, and APGD's own bookkeeping reads, the average of ``eot_draws`` passes
    (``attacks.with_draws``; default: the 'rand' version's 20, else 1, the model as given).
    Square, which only looks, attacks the expected prediction. ``decision_draws=1, eot_draws=1``
    is AutoAttack's own bookkeeping.
    """
    from pyautoattack import AutoAttack

    check_inputs(x, y)
    check_eps(eps, norm)
    check_int("batch_size", batch_size)
    check_choice("version", version, ("standard", "rand", "custom"))
    if version == "custom" and not attacks:
        raise ValueError(f"version='custom' needs attacks, a list of AutoAttack's attacks, got {attacks!r}")
    if decision_draws is None:
        decision_draws = DECISION_DRAWS if is_randomized(model, x[:8]) else 1
    check_int("decision_draws", decision_draws)
    if eot_draws is not None:
        check_int("eot_draws", eot_draws)
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
        draws = aa.apgd.eot_iter if eot_draws is None else eot_draws   # each step's average
        run = 1 if estimate.active() else draws
        for a in (aa.apgd, aa.apgd_targeted):
            a.eot_iter = 1   # the draws are averaged in the forward pass, where APGD's bookkeeping sees them
        if decision_draws > 1 or run > 1:
            _decide_by_expectation(aa, with_draws(model, run) if run > 1 else model, model, decision_draws)
        _shrink_for_estimate(aa)
        share = estimate.QUERY_SHARE if estimate.active() else 1
        with estimate.stage("attacks", share * draws / run, 1):
            x_adv, _ = aa.run_standard_evaluation(x.to(dev), y.to(dev), batch_size=batch_size)
    return x_adv.detach().cpu()


def _decide_by_expectation(aa, attacked: nn.Module, model: nn.Module, draws: int) -> None:
    """AutoAttack's parts differentiate ``attacked``; its decisions, and theirs where they only look,
    use the expected prediction of ``model`` over ``draws`` passes."""
    decided = _Decided(attacked, expected_logits(model, draws))
    aa.get_logits = decided
    aa.apgd.model = aa.apgd_targeted.model = decided
    aa.fab.predict = aa.square.predict = decided


def _shrink_for_estimate(aa) -> None:
    """In estimate mode, a share of each attack's iterations and queries (see :mod:`defenses_lib.estimate`)."""
    share = estimate.QUERY_SHARE if estimate.active() else 1
    for a in (aa.apgd, aa.apgd_targeted, aa.fab):
        a.n_iter = max(a.n_iter // share, 1)
    aa.square.n_queries = max(aa.square.n_queries // share, 1)


def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
                  n_queries: int = 1000, seed: int = 0) -> torch.Tensor:
    """The black-box Square attack (Andriushchenko et al.), from AutoAttack's package."""
    from pyautoattack.square import SquareAttack

    check_inputs(x, y)
    check_eps(eps, norm)
    check_int("n_queries", n_queries)

    @torch.no_grad()
    def square_here(xs, ys):
        """Square on this process's examples."""
        dev = model_device(model)
        queries = max(n_queries // estimate.QUERY_SHARE, 1) if estimate.active() else n_queries
        m = estimate.cap(len(xs), estimate.IMAGES)   # every image, except in estimate mode
        with eval_mode(model), estimate.stage("attacks", n_queries * len(xs), queries * m):
            sq = SquareAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], n_queries=queries, eps=eps,
                              p_init=0.8, n_restarts=1, seed=seed, verbose=False, resc_schedule=False, device=dev)
            return torch.cat([sq.perturb(xs[:m].to(dev), ys[:m].to(dev)).cpu(), xs[m:].cpu()])

    return distributed.split_work(square_here, x, y)


def _cell(v, digits: int) -> str:
    """One table cell: a float to ``digits`` decimals (NaN as a dash), an Estimate as its value over its interval."""
    if isinstance(v, float):
        return "<td>–</td>" if math.isnan(v) else f"<td>{v:.{digits}f}</td>"
    if isinstance(v, Estimate):
        interval = f"[{v.shown(v.low)}, {v.shown(v.high)}]"
        return f"<td>{v.shown(v.value)}<br><small style='white-space:nowrap'>{interval}</small></td>"
    if isinstance(v, OverSeeds):
        p, sd = v.pooled, f"sd {100 * v.sd:.1f}" if len(v.per_seed) > 1 else "1 seed"
        return (f"<td>{p.shown(p.value)}<br><small style='white-space:nowrap'>[{p.shown(p.low)}, "
                f"{p.shown(p.high)}]<br>{sd}</small></td>")
    return f"<td>{html.escape(str(v))}</td>"


def table_html(rows: dict[str, dict[str, float]], caption: str = "", digits: int = 1) -> str:
    """A small HTML table from {row: {column: value}}; a NaN shows as a dash (not defined), an
    :class:`~defenses_lib.stats.Estimate` as its value and 95% interval, an
    :class:`~defenses_lib.stats.OverSeeds` as its pooled value, interval and the seeds' spread."""
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
    """The gradient-masking sanity checks, readable as text or HTML."""

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


@dataclass
class _Probe:
    """What the sanity checks of one run share: the data, the models and PGD's settings."""

    model: nn.Module          # what predicts (accuracy is always its own)
    target: nn.Module         # what the attacks differentiate
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    norm: str
    steps: int
    repeats: int
    batch_size: int
    randomized: bool

    def accuracy(self, x_adv: torch.Tensor, model: nn.Module | None = None) -> float:
        """The model's accuracy on x_adv, scored over ``repeats`` predictions."""
        m = self.model if model is None else model
        return correctness(m, x_adv, self.y, self.repeats).float().mean().item()

    def pgd(self, model: nn.Module | None = None, **kw) -> torch.Tensor:
        """PGD against the target (or ``model``), without early stopping on a randomized defense."""
        kw.setdefault("early_stop", not self.randomized)
        kw.setdefault("eps", self.eps)
        kw.setdefault("steps", self.steps)
        kw.setdefault("alpha", 2.5 * kw["eps"] / kw["steps"])
        m = self.target if model is None else model
        return run_attack(partial(pgd, norm=self.norm, **kw), m, self.x, self.y, self.batch_size)


def _pct(a: float) -> str:
    """An accuracy as a percentage with one decimal."""
    return f"{100 * a:.1f}%"


def _iterative_beats_one_step(p: _Probe, a_pgd: float, runs: list[float]) -> Check:
    """Check 1: PGD at least as strong as FGSM (l_inf) or one l_2 step."""
    if p.norm == "linf":
        one_step, name = run_attack(partial(fgsm, eps=p.eps), p.target, p.x, p.y, p.batch_size), "FGSM"
    else:
        one_step, name = p.pgd(steps=1, alpha=p.eps, random_start=False), "one step"
    a_one = p.accuracy(one_step)
    two = f" (two runs: {', '.join(map(_pct, runs))})" if p.randomized else ""
    return Check("iterative beats single-step", a_pgd <= a_one + 1e-9,
                 f"PGD-{p.steps} {_pct(a_pgd)}{two} <= {name} {_pct(a_one)}")


def _falls_with_eps(p: _Probe, a_pgd: float, large_eps: float, chance: float, slack: float) -> Check:
    """Check 2: accuracy falls with eps (eps/2, eps, 2 eps, large_eps) to chance + ``slack``."""
    acc = {e: p.accuracy(p.pgd(eps=e)) for e in (p.eps / 2, 2 * p.eps, large_eps)}
    acc = dict(sorted({**acc, p.eps: a_pgd}.items()))
    vals = list(acc.values())
    monotone = all(b <= a + slack for a, b in zip(vals, vals[1:]))
    noise = f", allowed: {100 * slack:.1f} points, run-to-run noise included" if p.randomized else ""
    detail = ", ".join(f"eps {e:.3g}: {_pct(a)}" for e, a in acc.items()) + f" (chance {100 * chance:.0f}%{noise})"
    return Check("accuracy falls with eps to chance", monotone and vals[-1] <= chance + slack, detail)


def _converged(p: _Probe, a_pgd: float, slack: float) -> tuple[Check, float]:
    """Check 3: twice the steps and two restarts (a randomized model: twice the steps and twice the
    draws per step) change PGD's accuracy by at most ``slack``."""
    if p.randomized:
        a_more, more = p.accuracy(p.pgd(EOT(p.target, 2), steps=2 * p.steps)), "x 2 draws per step"
    else:
        a_more, more = p.accuracy(p.pgd(steps=2 * p.steps, restarts=2)), "x 2 restarts"
    noise = f" (allowed: {100 * slack:.1f} points, run-to-run noise included)" if p.randomized else ""
    return Check("attack has converged", abs(a_more - a_pgd) <= slack,
                 f"PGD-{p.steps} {_pct(a_pgd)} vs PGD-{2 * p.steps} {more} {_pct(a_more)}{noise}"), a_more


def _blackbox_not_stronger(p: _Probe, a_white: float, slack: float, n_queries: int) -> Check:
    """Check 4: the black-box Square attack not stronger than PGD by more than ``slack``."""
    a_sq = p.accuracy(square_attack(p.target, p.x, p.y, p.eps, p.norm, n_queries))
    return Check("black-box not stronger than white-box", a_sq >= a_white - slack,
                 f"Square ({n_queries} queries) {_pct(a_sq)} >= PGD {_pct(a_white)}")


def _fixed_randomness(p: _Probe, fixed_model: nn.Module | None, a_pgd: float, slack: float) -> Check:
    """Check 5: PGD against the defense with its randomness fixed is at least as strong."""
    name = "fixed randomness: attack succeeds"
    if not p.randomized:
        return Check(name, None, "deterministic model: no randomness to fix")
    if fixed_model is None:
        return Check(name, False, "randomized model: pass fixed_model to run this check")
    # no early stopping here either: a fixed seed may still draw other noise for a smaller batch
    a_fixed = p.accuracy(p.pgd(fixed_model, early_stop=False), fixed_model)
    return Check(name, a_fixed <= a_pgd + slack,
                 f"PGD on the fixed-randomness model {_pct(a_fixed)} <= on the randomized one {_pct(a_pgd)}")


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
                  steps: int = 40, large_eps: float | None = None, n_queries: int = 5000,
                  fixed_model: nn.Module | None = None, tol: float = 0.03, num_classes: int = 10,
                  batch_size: int = 250, attack_model: nn.Module | None = None, repeats: int = 1) -> SanityReport:
    """The five gradient-masking checks (Carlini et al. 2019; Athalye et al. 2018) on (x, y) at eps.

    1. PGD is at least as strong as FGSM (l_inf) or a one-step attack (l_2).
    2. Accuracy falls with eps (eps/2, eps, 2 eps, ``large_eps``) to below chance + tol. By default
       ``large_eps`` is 3 eps (at most 0.5) for l_inf and 4 eps for l_2: a budget where an undefended
       model is already near zero, not one where a grey image wins.
    3. Twice the steps and two restarts change PGD's accuracy by at most ``tol``; on a randomized
       model, twice the steps and twice the draws per step (an EOT average of the attack model).
    4. The black-box Square attack (``n_queries``, AutoAttack's 5,000 by default) is not stronger
       than PGD by more than ``tol``.
    5. A randomized model: PGD against ``fixed_model`` (its randomness fixed) is at least as strong.

    On a randomized model PGD runs twice, without early stopping; checks 2 to 5 allow ``tol`` plus
    the difference between the two runs. Every attack runs against ``attack_model`` (default: the
    model); every accuracy is the model's, scored over ``repeats`` predictions.
    """
    check_inputs(x, y)
    check_eps(eps, norm)
    for name, value in (("steps", steps), ("n_queries", n_queries), ("batch_size", batch_size),
                        ("repeats", repeats), ("num_classes", num_classes)):
        check_int(name, value, minimum=2 if name == "num_classes" else 1)
    check_number("tol", tol)
    large_eps = large_eps if large_eps is not None else (min(3 * eps, 0.5) if norm == "linf" else 4 * eps)
    parts = (model, x, y, eps, norm, steps, large_eps, n_queries, fixed_model, tol, num_classes, batch_size,
             attack_model, repeats)
    rows, hit = cached("sanity", parts, lambda: [dataclasses.astuple(c) for c in _sanity_checks(
        model, x, y, eps, norm, steps, large_eps, n_queries, fixed_model, tol, num_classes, batch_size,
        attack_model, repeats)])
    checks = [Check(*row) for row in rows]
    report = SanityReport(checks, f"{norm} eps = {eps:g}, n = {len(y)}")
    record("sanity checks", setting=report.setting, passed=report.passed, cached=hit, device=str(model_device(model)),
           checks=[{"name": c.name, "status": report.status(c), "detail": c.detail} for c in checks])
    return report


def _sanity_checks(model, x, y, eps, norm, steps, large_eps, n_queries, fixed_model, tol, num_classes,
                   batch_size, attack_model, repeats) -> list[Check]:
    """The five checks of :func:`sanity_checks`, computed."""
    target = attack_model if attack_model is not None else model
    p = _Probe(model, target, x, y, eps, norm, steps, repeats, batch_size, is_randomized(model, x[:8]))
    runs = [p.accuracy(p.pgd()) for _ in range(2 if p.randomized else 1)]
    a_pgd, slack = sum(runs) / len(runs), tol + max(runs) - min(runs)
    checks = [_iterative_beats_one_step(p, a_pgd, runs), _falls_with_eps(p, a_pgd, large_eps, 1 / num_classes, slack)]
    converged, a_more = _converged(p, a_pgd, slack)
    return checks + [converged, _blackbox_not_stronger(p, min(a_pgd, a_more), slack, n_queries),
                     _fixed_randomness(p, fixed_model, a_pgd, slack)]
