"""One way for a chapter to state its claims: each is tested at 95% on the data, and asserted only
when the chapter says the data resolve it.

A claim compares an estimate with a threshold fixed before the run (another defense on the same
examples, a stored result, a fixed value such as chance), through the 95% interval of
:mod:`defenses_lib.stats`:

* **resolved**: the whole interval lies on the claimed side of the threshold;
* **contradicted**: the whole interval lies on the other side (the data resolve the opposite);
* **not resolved at n = ...**: the interval straddles it; nothing is asserted either way.

Each claim carries the chapter's expectation: ``expect="resolved"`` (the text states it as a finding,
so :meth:`Claims.check` fails unless the data resolve it) or ``expect="open"`` (the text reports it as
not resolved at this scale, or as a measurement of this machine such as a timing; never asserted).
Exact facts (a sanity report passed, a numerical error is below a tolerance) are claims too, checked as
they are.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from .runtime import record
from .stats import (Estimate, Proportion, accuracy_interval, mcnemar, outcomes, paired_difference,
                    paired_mean_difference, pooled, proportion_interval, ratio_interval, unpaired_difference)
from .checks import check_choice

RESOLVED, CONTRADICTED, EXACT_FAILED = "resolved", "contradicted", "fails"
EXPECTATIONS = ("resolved", "open")


@dataclass
class Claim:
    """One claim: what it says, the estimate behind it, the verdict and what the chapter expects."""

    statement: str
    estimate: str
    n: int | None
    test: str
    verdict: str
    expect: str

    @property
    def failed(self) -> bool:
        """True when the chapter states this claim as resolved and the data do not resolve it."""
        return self.expect == "resolved" and self.verdict != RESOLVED


def _estimate(a, level: float) -> tuple[Estimate, object]:
    """The accuracy estimate of per-example outcomes or of a stored Proportion."""
    if isinstance(a, Proportion):
        return proportion_interval(a, level), a
    return accuracy_interval(a, level), outcomes(a)


def _is_value(b) -> bool:
    """Whether b is a fixed number (a threshold such as chance) rather than outcomes or a Proportion."""
    return isinstance(b, (int, float)) and not isinstance(b, bool)


def _difference(a, b, level: float) -> tuple[Estimate, str]:
    """a - b: paired (two outcome vectors) or unpaired (a Proportion among them)."""
    if isinstance(a, Proportion) or isinstance(b, Proportion):
        pa = a if isinstance(a, Proportion) else Proportion.of(float(outcomes(a).mean()), len(outcomes(a)))
        pb = b if isinstance(b, Proportion) else Proportion.of(float(outcomes(b).mean()), len(outcomes(b)))
        return unpaired_difference(pa, pb, level), ""
    est = paired_difference(a, b, level)
    if est.method != "Newcombe paired":
        return est, ""
    m = mcnemar(a, b)
    return est, f"McNemar {m['b10']}:{m['b01']}, p = {m['p']:.2g}"


def _points(e: Estimate) -> str:
    """A difference in points with its interval."""
    return f"{100 * e.value:+.1f} points [{100 * e.low:+.1f}, {100 * e.high:+.1f}]"


def _compare(a, b, margin: float, level: float) -> tuple[Estimate, float, str, str]:
    """What a claim about a against b tests: the estimate, the threshold it must clear, the test and the
    estimate in words (an accuracy against a fixed value, else a difference in points)."""
    if _is_value(b):
        est, _ = _estimate(a, level)
        text = f"{100 * est.value:.1f}% [{100 * est.low:.1f}, {100 * est.high:.1f}]"
        return est, b + margin, f"{est.method}; against {100 * (b + margin):g}%", text
    est, test = _difference(a, b, level)
    words = "; ".join(w for w in (est.method, test, f"margin {100 * margin:+g} points" if margin else "") if w)
    return est, margin, words, _points(est)


class Claims:
    """The claims of one chapter: add them, show them (a table), then :meth:`check` them."""

    def __init__(self, title: str = "claims", level: float = 0.95):
        self.title, self.level, self.claims = title, level, []

    def _add(self, statement: str, estimate: str, n, test: str, verdict: str, expect: str) -> Claim:
        """Record one claim."""
        check_choice("expect", expect, EXPECTATIONS)
        if not isinstance(statement, str) or not statement:
            raise ValueError(f"statement must be a non-empty string, got {statement!r}")
        claim = Claim(statement, estimate, n, test, verdict, expect)
        self.claims.append(claim)
        return claim

    def _verdict(self, low: float, high: float, threshold: float, side: str, n: int) -> str:
        """Resolved, contradicted or not resolved, for a claim that the quantity is above/below threshold."""
        above, below = low > threshold, high < threshold
        if (side == "above" and above) or (side == "below" and below):
            return RESOLVED
        if (side == "above" and below) or (side == "below" and above):
            return CONTRADICTED
        return f"not resolved at n = {n}"

    def greater(self, statement: str, a, b, margin: float = 0.0, expect: str = "resolved") -> Claim:
        """Claim: accuracy a exceeds b (outcomes on the same examples, a Proportion or a value) by more than margin."""
        est, threshold, test, text = _compare(a, b, margin, self.level)
        verdict = self._verdict(est.low, est.high, threshold, "above", est.n)
        return self._add(statement, text, est.n, test, verdict, expect)

    def less(self, statement: str, a, b, margin: float = 0.0, expect: str = "resolved") -> Claim:
        """Claim: accuracy a is below b (outcomes, a Proportion or a fixed value) by more than margin."""
        est, threshold, test, text = _compare(a, b, -margin, self.level)
        verdict = self._verdict(est.low, est.high, threshold, "below", est.n)
        return self._add(statement, text, est.n, test, verdict, expect)

    def within(self, statement: str, a, b, delta: float, expect: str = "resolved") -> Claim:
        """Claim: accuracies a and b differ by less than delta (the interval of a - b lies inside (-delta, delta))."""
        if not delta > 0:
            raise ValueError(f"delta must be > 0, got {delta!r}")
        if _is_value(b):
            raise ValueError("within compares two measured accuracies; against a fixed value use greater and less")
        est, test = _difference(a, b, self.level)
        if -delta < est.low and est.high < delta:
            verdict = RESOLVED
        elif est.low > delta or est.high < -delta:
            verdict = CONTRADICTED
        else:
            verdict = f"not resolved at n = {est.n}"
        words = "; ".join(w for w in (est.method, test, f"within +-{100 * delta:g} points") if w)
        return self._add(statement, _points(est), est.n, words, verdict, expect)

    def greater_over_seeds(self, statement: str, a_seeds, b_seeds, margin: float = 0.0,
                           expect: str = "resolved") -> Claim:
        """Claim over training seeds: a exceeds b (per seed: outcomes on the same images, or a fixed value) by
        more than margin, on the per-image outcomes averaged over the seeds and in every seed."""
        return self._over_seeds(statement, a_seeds, b_seeds, "above", margin, expect)

    def less_over_seeds(self, statement: str, a_seeds, b_seeds, margin: float = 0.0,
                        expect: str = "resolved") -> Claim:
        """Claim over training seeds: a is below b by more than margin, pooled over the seeds and in every seed."""
        return self._over_seeds(statement, a_seeds, b_seeds, "below", margin, expect)

    def within_over_seeds(self, statement: str, a_seeds, b_seeds, delta: float, expect: str = "resolved") -> Claim:
        """Claim over training seeds: a and b differ by less than delta, pooled over the seeds and in every seed."""
        if not delta > 0:
            raise ValueError(f"delta must be > 0, got {delta!r}")
        return self._over_seeds(statement, a_seeds, b_seeds, "within", delta, expect)

    def _over_seeds(self, statement: str, a_seeds, b_seeds, side: str, margin: float, expect: str) -> Claim:
        """The pooled claim's verdict, kept only if every seed's own point estimate agrees with it."""
        b_list = [b_seeds] * len(a_seeds) if _is_value(b_seeds) else list(b_seeds)
        if not len(a_seeds) or len(b_list) != len(a_seeds):
            raise ValueError(f"a_seeds and b_seeds must hold one outcome per seed each, got {len(a_seeds)} and "
                             f"{len(b_list)}")
        b_pooled = b_seeds if _is_value(b_seeds) else pooled(b_list)
        claim = {"above": self.greater, "below": self.less}.get(side, self.within)
        pooled_claim = claim(statement, pooled(a_seeds), b_pooled, margin, expect=expect)
        self.claims.pop()
        per_seed = [float(outcomes(a).mean()) - (b if _is_value(b) else float(outcomes(b).mean()))
                    for a, b in zip(a_seeds, b_list)]
        agrees = {"above": lambda d: d > margin, "below": lambda d: d < -margin,
                  "within": lambda d: abs(d) < margin}[side]
        verdict = pooled_claim.verdict
        if verdict == RESOLVED and not all(agrees(d) for d in per_seed):
            verdict = f"not resolved: the {len(per_seed)} seeds disagree"
        elif verdict == CONTRADICTED and any(agrees(d) for d in per_seed):
            verdict = f"not resolved: the {len(per_seed)} seeds disagree"
        if _is_value(b_seeds):   # each seed's accuracy
            seeds = ", ".join(f"{100 * (d + b_seeds):.1f}" for d in per_seed) + "%"
        else:                    # each seed's difference
            seeds = ", ".join(f"{100 * d:+.1f}" for d in per_seed) + " points"
        return self._add(statement, f"{pooled_claim.estimate}; per seed {seeds}", pooled_claim.n,
                         f"{pooled_claim.test}; per-image mean over {len(per_seed)} seeds, each seed on the same "
                         "side", verdict, expect)

    def mean_less(self, statement: str, a, b, expect: str = "resolved") -> Claim:
        """Claim: a real-valued measurement (curvature, a cosine) is smaller on average under a than under b,
        on the same examples (a paired bootstrap interval of the mean difference below 0)."""
        est = paired_mean_difference(a, b, self.level)
        verdict = self._verdict(est.low, est.high, 0.0, "below", est.n)
        return self._add(statement, f"{est.value:+.3g} [{est.low:+.3g}, {est.high:+.3g}]", est.n,
                         f"{est.method} of the mean difference", verdict, expect)

    def faster(self, statement: str, times_a, times_b, factor: float = 1.0, expect: str = "open") -> Claim:
        """Claim: a takes less than ``factor`` times b's time, from paired timing rounds (the ratio's interval
        below ``factor``). Timings measure the machine that runs them, so by default they are reported, not asserted."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor!r}")
        est = ratio_interval(times_a, times_b, self.level)
        verdict = self._verdict(est.low, est.high, factor, "below", est.n)
        return self._add(statement, f"{est.value:.2f}x [{est.low:.2f}, {est.high:.2f}]", est.n,
                         f"{est.method}, {est.n} paired rounds, against {factor:g}x",
                         verdict.replace("n =", "rounds ="), expect)

    def exact(self, statement: str, holds: bool, detail: str = "", expect: str = "resolved") -> Claim:
        """A fact the run checks as it is (no sampling to account for): a report passed, an error is small."""
        detail = detail or ("holds" if holds else "does not hold")
        return self._add(statement, detail, None, "exact", RESOLVED if holds else EXACT_FAILED, expect)

    def verdicts(self) -> dict[str, str]:
        """Each claim's verdict, by statement."""
        return {c.statement: c.verdict for c in self.claims}

    def rows(self) -> dict[str, dict[str, str]]:
        """The claims as table rows."""
        return {c.statement: {"estimate [95% interval]": c.estimate, "n": "" if c.n is None else str(c.n),
                              "test": c.test, "verdict": c.verdict,
                              "asserted": "yes" if c.expect == "resolved" else "no"} for c in self.claims}

    def __str__(self) -> str:
        lines = [f"{self.title}: {sum(c.verdict == RESOLVED for c in self.claims)} of {len(self.claims)} resolved"]
        for c in self.claims:
            mark = "asserted" if c.expect == "resolved" else "reported"
            lines.append(f"  [{c.verdict}] ({mark}) {c.statement}: {c.estimate}"
                         + (f", n = {c.n}" if c.n else "") + f" ({c.test})")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        cols = ["estimate [95% interval]", "n", "test", "verdict", "asserted"]
        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(s)}</th>"
                       + "".join(f"<td>{html.escape(r[c])}</td>" for c in cols) + "</tr>"
                       for s, r in self.rows().items())
        return (f"<table><caption>{html.escape(str(self).splitlines()[0])}</caption>"
                f"<thead><tr><th>claim</th>{head}</tr></thead><tbody>{body}</tbody></table>")

    def check(self) -> "Claims":
        """Record the claims (for the runner's metrics) and raise AssertionError naming every claim the chapter
        states as resolved that the data do not resolve."""
        record("claims", title=self.title, claims=[c.__dict__ for c in self.claims])
        failed = [c for c in self.claims if c.failed]
        if failed:
            raise AssertionError("claims the data do not resolve:\n" + "\n".join(
                f"  {c.statement}: {c.estimate} ({c.test}): {c.verdict}" for c in failed))
        return self
