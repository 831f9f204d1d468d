"""The claims helper: a claim is asserted only when the data resolve it, and every verdict can be reached."""

import pytest
import torch

from defenses_lib import claims
from defenses_lib.claims import Claims
from defenses_lib.stats import Proportion


def _outcomes(right: int, n: int) -> torch.Tensor:
    return torch.arange(n) < right


def test_a_clear_paired_gain_is_resolved_and_passes():
    c = Claims()
    a, b = _outcomes(180, 200), _outcomes(120, 200)
    claim = c.greater("a beats b", a, b)
    assert claim.verdict == "resolved" and "McNemar 60:0" in claim.test
    c.check()


def test_a_small_gain_is_not_resolved_and_fails_only_when_stated_as_resolved():
    a, b = _outcomes(43, 50), _outcomes(42, 50)
    c = Claims()
    assert c.greater("a beats b", a, b, expect="open").verdict == "not resolved at n = 50"
    c.check()                                   # reported, not asserted
    c.greater("a beats b", a, b)                # stated as resolved
    with pytest.raises(AssertionError, match="a beats b.*not resolved at n = 50"):
        c.check()


def test_the_opposite_resolved_is_a_contradiction():
    c = Claims()
    assert c.greater("b beats a", _outcomes(120, 200), _outcomes(180, 200)).verdict == "contradicted"
    assert c.less("a below b", _outcomes(120, 200), _outcomes(180, 200)).verdict == "resolved"
    with pytest.raises(AssertionError, match="b beats a"):
        c.check()


def test_margins_and_fixed_values():
    c = Claims()
    a = _outcomes(190, 200)
    assert c.greater("above 85%", a, 0.85).verdict == "resolved"
    assert c.greater("above 94%", a, 0.94).verdict.startswith("not resolved")
    assert c.less("below 10%", _outcomes(0, 50), 0.10).verdict == "resolved"
    assert c.less("below 10%", _outcomes(3, 50), 0.10).verdict.startswith("not resolved")
    assert c.greater("20+ points above", a, _outcomes(100, 200), margin=0.2).verdict == "resolved"
    assert c.greater("60+ points above", a, _outcomes(100, 200), margin=0.6).verdict == "contradicted"


def test_within_needs_the_whole_interval_inside():
    c = Claims()
    assert c.within("the same", _outcomes(500, 1000), _outcomes(505, 1000), 0.05).verdict == "resolved"
    assert c.within("the same", _outcomes(25, 50), _outcomes(26, 50), 0.05).verdict.startswith("not resolved")
    assert c.within("the same", _outcomes(900, 1000), _outcomes(500, 1000), 0.05).verdict == "contradicted"


def test_stored_proportions_are_compared_unpaired():
    c = Claims()
    claim = c.greater("stored", Proportion(9810, 10000), Proportion(9737, 10000))
    assert "unpaired" in claim.test and claim.verdict == "resolved"


def test_timings_and_exact_facts():
    c = Claims()
    assert c.faster("a is faster", [1.0, 1.1, 0.9, 1.0], [2.0, 2.1, 1.9, 2.0]).verdict == "resolved"
    assert c.faster("noisy", [1.0, 3.0, 0.5, 2.0], [2.0, 1.0, 1.5, 1.0]).verdict.startswith("not resolved")
    assert c.exact("a report passed", True).verdict == "resolved"
    c.exact("a report failed", False, "2 of 5 checks failed")
    with pytest.raises(AssertionError, match="a report failed"):
        c.check()


def test_real_valued_measurements_are_compared_by_a_paired_bootstrap():
    c = Claims()
    base = torch.linspace(0.5, 2.0, 100)
    assert c.mean_less("flatter", base * 0.8, base).verdict == "resolved"
    assert c.mean_less("flatter", base, base * 0.8).verdict == "contradicted"
    noise = torch.tensor([0.01, -0.01] * 50)
    assert c.mean_less("no change", base + noise, base).verdict.startswith("not resolved")


def test_randomized_outcomes_use_the_bootstrap():
    c = Claims()
    a = torch.tensor([1.0, 0.5] * 100)
    claim = c.greater("randomized", a, torch.zeros(200))
    assert "paired bootstrap" in claim.test and claim.verdict == "resolved"


def test_the_report_shows_every_claim():
    c = Claims("chapter")
    c.greater("a beats b", _outcomes(180, 200), _outcomes(120, 200))
    c.greater("c beats d", _outcomes(43, 50), _outcomes(42, 50), expect="open")
    text, page = str(c), c._repr_html_()
    assert text.startswith("chapter: 1 of 2 resolved")
    assert "(reported) c beats d" in text and "<td>not resolved at n = 50</td>" in page


@pytest.mark.parametrize("call, match", [
    (lambda c: c.greater("x", _outcomes(1, 2), _outcomes(1, 2), expect="maybe"), "expect must be one of"),
    (lambda c: c.greater("", _outcomes(1, 2), _outcomes(1, 2)), "statement"),
    (lambda c: c.within("x", _outcomes(1, 2), _outcomes(1, 2), 0), "delta"),
    (lambda c: c.greater("x", _outcomes(1, 2), _outcomes(1, 3)), "same examples"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(Claims())


def test_a_claim_over_seeds_needs_the_pooled_interval_and_every_seed():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 600, generator=g)
    a = [base[s] < 0.8 for s in range(3)]          # about 80% in each seed
    b = [base[s] < 0.6 for s in range(3)]          # about 60%: below a on every image
    c = claims.Claims()
    assert c.greater_over_seeds("a above b", a, b).verdict == claims.RESOLVED
    assert c.less_over_seeds("a below b", a, b).verdict == claims.CONTRADICTED
    assert c.greater_over_seeds("a above chance", a, 0.1).verdict == claims.RESOLVED
    assert "per seed" in c.claims[0].estimate and c.claims[0].n == 600
    assert c.within_over_seeds("a within 6 points of itself", a, a, 0.06).verdict == claims.RESOLVED
    with pytest.raises(ValueError, match="one outcome per seed"):
        c.greater_over_seeds("x", a, b[:2])


def test_one_disagreeing_seed_stops_a_pooled_claim():
    ones, zeros = torch.ones(400, dtype=torch.bool), torch.zeros(400, dtype=torch.bool)
    a = [ones, ones, zeros[:400] | (torch.arange(400) < 100)]     # 100%, 100%, 25%
    b = [zeros | (torch.arange(400) < 200)] * 3                    # 50% in each seed
    c = claims.Claims()
    assert c.greater("pooled alone", claims.pooled(a), claims.pooled(b)).verdict == claims.RESOLVED
    assert c.greater_over_seeds("over seeds", a, b).verdict == "not resolved: the 3 seeds disagree"
