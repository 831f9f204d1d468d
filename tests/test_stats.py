"""The statistics behind every claim: intervals and paired tests against SciPy, worked cases and simulation."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from defenses_lib.stats import (Proportion, accuracy_interval, bootstrap_mean, clopper_pearson, mcnemar, mean_interval,
                                newcombe_paired, newcombe_unpaired, paired_difference, ratio_interval, seed_summary,
                                unpaired_difference, wilson)


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (81, 263), (50, 50), (199, 200)])
def test_wilson_and_clopper_pearson_match_scipy(k, n):
    ci = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    ci = sps.binomtest(k, n).proportion_ci(0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_worked_case():
    # 0 of 50: the upper end is z^2 / (n + z^2)
    z2 = sps.norm.ppf(0.975) ** 2
    assert wilson(0, 50) == pytest.approx((0.0, z2 / (50 + z2)))


def test_mcnemar_is_the_binomial_test_on_discordant_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.random(300) < 0.8, rng.random(300) < 0.7
    m = mcnemar(torch.tensor(a), torch.tensor(b))
    b10, b01 = int((a & ~b).sum()), int((~a & b).sum())
    assert (m["b10"], m["b01"]) == (b10, b01)
    assert m["p_greater"] == pytest.approx(sps.binomtest(b10, b10 + b01, alternative="greater").pvalue)
    assert m["p_less"] == pytest.approx(sps.binomtest(b10, b10 + b01, alternative="less").pvalue)
    assert m["p"] == pytest.approx(sps.binomtest(b10, b10 + b01).pvalue)


def test_mcnemar_worked_case():
    a = torch.tensor([True] * 10 + [True] * 5)
    b = torch.tensor([False] * 10 + [True] * 5)
    assert mcnemar(a, b)["p_greater"] == pytest.approx(0.5 ** 10)   # ten discordant pairs, all one way
    assert mcnemar(a, a)["p"] == 1.0


def _correlated_pairs(rng, n, p1=0.8, p2=0.7, share=0.6):
    """Two outcome vectors that agree on a share of the examples (a positive correlation, as two defenses have)."""
    common = rng.random(n) < share
    u = rng.random(n)
    a = np.where(common, u < p1, rng.random(n) < p1)
    b = np.where(common, u < p2, rng.random(n) < p2)
    return a, b


def test_newcombe_paired_covers_the_true_difference():
    rng = np.random.default_rng(1)
    share, p1, p2 = 0.6, 0.8, 0.7
    # the true difference: P(a) - P(b) is p1 - p2 whatever the coupling
    hits = 0
    for _ in range(1500):
        a, b = _correlated_pairs(rng, 100, p1, p2, share)
        low, high = newcombe_paired(a, b)
        hits += low <= p1 - p2 <= high
    assert 0.93 <= hits / 1500 <= 0.975


def test_paired_interval_is_narrower_than_unpaired_for_correlated_outcomes():
    rng = np.random.default_rng(2)
    a, b = _correlated_pairs(rng, 400, share=0.9)
    paired = paired_difference(torch.tensor(a), torch.tensor(b))
    unpaired = unpaired_difference(Proportion(int(a.sum()), 400), Proportion(int(b.sum()), 400))
    assert paired.value == pytest.approx(unpaired.value)
    assert paired.high - paired.low < 0.8 * (unpaired.high - unpaired.low)


def test_newcombe_unpaired_worked_case():
    # Newcombe (1998), Statistics in Medicine 17, 873-890, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339
    low, high = newcombe_unpaired(56, 70, 48, 80)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)


def test_fractional_outcomes_use_a_paired_bootstrap():
    rng = np.random.default_rng(3)
    a = torch.tensor(rng.integers(0, 5, 500) / 4)      # probabilities of being right from 4 predictions
    b = torch.tensor(np.clip(a.numpy() - 0.25 * (rng.random(500) < 0.3), 0, 1))
    est = paired_difference(a, b)
    assert est.method == "paired bootstrap"
    d = (a - b).numpy()
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert (est.low, est.high) == pytest.approx((d.mean() - 1.96 * se, d.mean() + 1.96 * se), abs=0.01)
    assert paired_difference(a, b) == est   # seeded: the same interval every time


def test_accuracy_interval_picks_the_method():
    assert accuracy_interval(torch.tensor([True, False, True, True])).method == "Wilson"
    e = accuracy_interval(torch.tensor([1.0, 0.5, 0.75, 1.0]))
    assert e.method == "Wilson (conservative)" and (e.low, e.high) == pytest.approx(_w(0.8125, 4))
    assert str(accuracy_interval(torch.ones(50, dtype=torch.bool))) == "100.0 [92.9, 100.0]"


def _w(p, n):
    z = sps.norm.ppf(0.975)
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (c - h, c + h)


def test_paired_probabilities_without_spread_fall_back_to_the_means():
    # every example the same under both: a bootstrap would claim certainty; the fallback does not
    est = paired_difference(torch.full((50,), 0.5), torch.full((50,), 0.5))
    assert est.method == "Newcombe on the means" and est.low < -0.1 and est.high > 0.1


def test_bootstrap_mean_matches_the_normal_interval_for_large_n():
    x = np.random.default_rng(4).random(2000)
    low, high = bootstrap_mean(x)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert (low, high) == pytest.approx((x.mean() - 1.96 * se, x.mean() + 1.96 * se), abs=2e-3)


def test_mean_interval_brackets_the_mean_of_measurements():
    x = np.random.default_rng(5).normal(2.0, 0.5, 400)
    e = mean_interval(torch.tensor(x))
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert (e.low, e.value, e.high) == pytest.approx((x.mean() - 1.96 * se, x.mean(), x.mean() + 1.96 * se), abs=5e-3)
    assert str(e) == f"{x.mean():.3f} [{e.low:.3f}, {e.high:.3f}]"
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([1.0])


def test_ratio_interval_is_a_t_interval_on_log_ratios():
    a, b = [1.0, 1.1, 0.9, 1.05, 0.95], [2.0, 2.1, 2.2, 1.9, 2.05]
    logs = np.log(np.array(a) / np.array(b))
    lo, hi = sps.t.interval(0.95, len(logs) - 1, loc=logs.mean(), scale=sps.sem(logs))
    est = ratio_interval(a, b)
    assert (est.value, est.low, est.high) == pytest.approx((math.exp(logs.mean()), math.exp(lo), math.exp(hi)))


def test_seed_summary_matches_scipy():
    v = [0.81, 0.84, 0.79]
    s = seed_summary(v)
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(v), scale=sps.sem(v))
    assert (s["low"], s["high"], s["sd"]) == pytest.approx((lo, hi, np.std(v, ddof=1)))
    assert math.isnan(seed_summary([0.8])["sd"])


@pytest.mark.parametrize("call, match", [
    (lambda: wilson(5, 3), "0 <= k <= n"),
    (lambda: wilson(1.5, 3), "integers"),
    (lambda: wilson(1, 3, level=1.5), "level"),
    (lambda: accuracy_interval(torch.tensor([])), "non-empty"),
    (lambda: accuracy_interval(torch.tensor([0.5, float("nan")])), "finite"),
    (lambda: accuracy_interval(torch.tensor([1.5])), r"\[0, 1\]"),
    (lambda: paired_difference(torch.ones(3), torch.ones(4)), "same examples"),
    (lambda: mcnemar(torch.tensor([0.5]), torch.tensor([1.0])), "right/wrong"),
    (lambda: ratio_interval([1.0], [2.0]), "at least 2"),
    (lambda: ratio_interval([1.0, -1.0], [2.0, 2.0]), "positive"),
    (lambda: seed_summary([]), "non-empty"),
])
def test_bad_input_names_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_auc_is_the_probability_a_positive_outscores_a_negative():
    from defenses_lib.stats import auc
    score, label = [0.1, 0.4, 0.35, 0.8, 0.4], [0, 0, 1, 1, 1]
    pairs = [(s1 > s0) + 0.5 * (s1 == s0) for s1, l1 in zip(score, label) if l1
             for s0, l0 in zip(score, label) if not l0]
    assert auc(score, label) == pytest.approx(sum(pairs) / len(pairs))
    with pytest.raises(ValueError, match="both classes"):
        auc([0.1, 0.2], [1, 1])


def test_partial_spearman_removes_what_the_control_explains():
    from defenses_lib.stats import partial_spearman
    rng = np.random.default_rng(0)
    c = rng.normal(size=2000)
    a, b = c + 0.1 * rng.normal(size=2000), c + 0.1 * rng.normal(size=2000)
    assert sps.spearmanr(a, b).statistic > 0.9 and abs(partial_spearman(a, b, c)) < 0.1
    d = a + rng.normal(size=2000)   # shares a's own noise: still correlated given c
    assert partial_spearman(a, d, c) > 0.05


def test_fisher_interval_matches_the_formula_and_the_bootstrap_covers_spearman():
    from defenses_lib.stats import fisher_interval, spearman_interval
    low, high = fisher_interval(0.3, 103, controls=1)
    half = sps.norm.ppf(0.975) / math.sqrt(103 - 1 - 3)
    assert (low, high) == pytest.approx((math.tanh(math.atanh(0.3) - half), math.tanh(math.atanh(0.3) + half)))
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    e = spearman_interval(x, x + rng.normal(size=300), draws=300, seed=0)
    assert e.low < e.value < e.high and e.value == pytest.approx(sps.spearmanr(x, x + 0).statistic, abs=0.5)
    assert spearman_interval(x, x + 0.0, draws=50, seed=0).value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n - controls > 3"):
        fisher_interval(0.3, 4, controls=1)
