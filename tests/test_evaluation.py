"""Evaluation: worst case, curves, the AutoAttack adapter and the sanity-check report."""

from functools import partial

import pytest
import torch

from defenses_lib import evaluation
from defenses_lib.attacks import fgsm, pgd
from defenses_lib.evaluation import (FixedRandomness, RobustResult, autoattack, curve, eps_sweep, evaluate,
                                     is_randomized, sanity_checks, table_html)


def test_worst_case_is_per_example(mnist_small):
    model, x, y = mnist_small
    res = evaluate(model, x, y, {"FGSM": partial(fgsm, eps=0.1), "PGD-10": partial(pgd, eps=0.1, steps=10)})
    expect = res.correct["clean"] & res.correct["FGSM"] & res.correct["PGD-10"]
    assert torch.equal(res.worst_case, expect)
    acc = res.accuracy()
    assert acc["worst case"] <= min(acc["clean"], acc["FGSM"], acc["PGD-10"])
    assert "worst case" in str(res) and "<table>" in res._repr_html_()


def test_eps_sweep_starts_clean_and_falls(mnist_small):
    model, x, y = mnist_small
    sweep = eps_sweep(model, x[:100], y[:100], [0, 0.1, 0.3], lambda e: {"PGD": partial(pgd, eps=e, steps=10)})
    acc = curve(sweep, "PGD")
    assert list(acc) == [0.0, 0.1, 0.3]
    assert acc[0.0] == sweep[0.0].accuracy()["clean"] >= acc[0.1] >= acc[0.3]
    assert sweep[0.1].accuracy()["clean"] == acc[0.0]


def test_autoattack_adapter_runs(mnist_small):
    model, x, y = mnist_small
    x, y = x[:16], y[:16]
    x_adv = autoattack(model, x, y, 0.1, version="custom", attacks=["apgd-ce"])
    assert x_adv.shape == x.shape and ((x_adv - x).abs().max() <= 0.1 + 1e-5)
    x_std = autoattack(model, x[:4], y[:4], 0.3, version="standard")
    assert (model(x_std).argmax(1) == y[:4]).float().mean() <= 0.25


def test_sanity_report_on_a_standard_model(mnist_small):
    model, x, y = mnist_small
    report = sanity_checks(model, x[:40], y[:40], 0.1, steps=10, n_queries=100)
    assert len(report.checks) == 5 and report.checks[-1].passed is None
    assert "iterative beats single-step" in str(report) and "<table>" in report._repr_html_()
    assert report.checks[0].passed  # PGD <= FGSM


class Noisy(torch.nn.Module):
    """Gaussian noise before a network, at train and test time alike."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.3 * torch.randn_like(x))


def test_randomized_model_is_detected_and_needs_its_fixed_twin(mnist_small):
    model, x, y = mnist_small
    noisy = Noisy(model)
    assert is_randomized(noisy, x[:8]) and not is_randomized(model, x[:8])
    report = sanity_checks(noisy, x[:20], y[:20], 0.1, steps=5, n_queries=20)
    assert report.checks[-1].passed is False and not report.passed


def test_autoattack_rand_version_on_a_randomized_model(tiny_model):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    x_adv = autoattack(Noisy(tiny_model), x, y, 0.05, version="rand")
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.05 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_attacks_target_the_attack_model_and_accuracy_is_the_models(mnist_small):
    model, x, y = mnist_small
    seen = []

    def attack(m, xb, yb):
        seen.append(m)
        return fgsm(m, xb, yb, 0.3)

    blind = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))  # a model the attack learns nothing from
    result = evaluate(model, x, y, {"fgsm": attack}, attack_model=blind)
    assert seen and all(m is blind for m in seen)
    assert result.accuracy()["fgsm"] > evaluate(model, x, y, {"fgsm": attack}).accuracy()["fgsm"] + 0.2


def test_sanity_checks_attack_a_randomized_model_without_early_stopping(mnist_small, monkeypatch):
    model, x, y = mnist_small
    calls = []

    def spy(m, *args, **kwargs):
        calls.append((m, kwargs["early_stop"]))
        return pgd(m, *args, **kwargs)

    monkeypatch.setattr(evaluation, "pgd", spy)
    noisy = Noisy(model)
    report = sanity_checks(noisy, x[:20], y[:20], 0.1, steps=3, n_queries=10, fixed_model=model)
    assert "two runs" in report.checks[0].detail and "run-to-run noise" in report.checks[2].detail
    assert {stop for m, stop in calls if m is noisy} == {False}  # one noisy evaluation cannot stop an attack
    assert {stop for m, stop in calls if m is model} == {False}  # the fixed twin: its noise may depend on the batch


def test_repeated_scoring_estimates_the_probability_of_being_right(mnist_small):
    model, x, y = mnist_small
    noisy = Noisy(model)
    torch.manual_seed(0)
    res = evaluate(noisy, x[:50], y[:50], {"fgsm": partial(fgsm, eps=0.1)}, repeats=8)
    p = res.correct["clean"]
    assert p.dtype == torch.float32 and ((p * 8) == (p * 8).round()).all() and 0 <= p.min() and p.max() <= 1
    assert ((p > 0) & (p < 1)).any()  # some examples are right on some draws only
    assert torch.equal(res.worst_case, torch.minimum(p, res.correct["fgsm"]))
    with pytest.raises(ValueError, match="repeats"):
        evaluate(model, x, y, {}, repeats=0)


def test_fixed_randomness_makes_a_noisy_model_deterministic_and_leaves_the_rng_alone(mnist_small):
    model, x, y = mnist_small
    fixed = FixedRandomness(Noisy(model), seed=3)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    out = fixed(x[:8])
    assert torch.equal(torch.rand(1), before)  # the global generator is where it was
    assert torch.equal(out, fixed(x[:8])) and not is_randomized(fixed, x[:8]) and is_randomized(Noisy(model), x[:8])


def test_table_html_formats_floats_and_shows_nan_as_a_dash():
    html = table_html({"a": {"x": 1.25, "y": float("nan")}, "b": {"x": "n/a"}}, caption="c", digits=1)
    assert "<caption>c</caption>" in html and "<td>1.2</td>" in html and "<td>–</td>" in html
    assert "nan" not in html and "<td>n/a</td><td></td>" in html


def test_table_html_shows_an_estimate_over_its_interval():
    from defenses_lib.stats import accuracy_interval

    html = table_html({"a": {"x": accuracy_interval(torch.ones(50, dtype=torch.bool))}})
    assert "<td>100.0<br><small style='white-space:nowrap'>[92.9, 100.0]</small></td>" in html


def test_robust_result_shows_n_and_intervals():
    res = RobustResult({"clean": torch.tensor([True] * 40 + [False] * 10)}, {}, "toy")
    assert str(res).splitlines()[0] == "n = 50 toy, accuracy [95% interval]"
    assert "80.0%  [67.0, 88.8]" in str(res) and "[67.0, 88.8]" in res._repr_html_()
    assert res.intervals()["worst case"].value == 0.8


def test_only_keeps_the_named_rows_and_outcomes_of_reads_a_sweep():
    from defenses_lib.evaluation import outcomes_of
    T, F = True, False
    r = RobustResult({"clean": torch.tensor([T, T, T]), "a": torch.tensor([T, F, T]), "b": torch.tensor([F, T, T])})
    assert r.only("a").worst_case.tolist() == [T, F, T] and r.worst_case.tolist() == [F, F, T]
    with pytest.raises(ValueError, match="rows must be among"):
        r.only("c")
    out = outcomes_of({"m": {0.1: r}}, row="a")
    assert out("m", 0.1).tolist() == [T, F, T] and out("m", 0.1, "worst case").tolist() == [F, F, T]


def test_evaluation_entry_points_name_their_bad_arguments(tiny_model):
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    attacks = {"FGSM": partial(fgsm, eps=0.1)}
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        evaluate(tiny_model, x, y, attacks, batch_size=0)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 1.5"):
        evaluate(tiny_model, x, y, attacks, repeats=1.5)
    with pytest.raises(ValueError, match="at least one image"):
        evaluate(tiny_model, x[:0], y[:0], attacks)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate(tiny_model, nan, y, attacks)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        sanity_checks(tiny_model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="n_queries must be an integer >= 1"):
        sanity_checks(tiny_model, x, y, eps=0.1, n_queries=-5)
    with pytest.raises(ValueError, match="at least one image"):
        sanity_checks(tiny_model, x[:0], y[:0], eps=0.1)
    with pytest.raises(ValueError, match="version must be one of"):
        autoattack(tiny_model, x, y, 0.1, version="strong")
    with pytest.raises(ValueError, match="version='custom' needs attacks"):
        autoattack(tiny_model, x, y, 0.1, version="custom")
    with pytest.raises(ValueError, match="at least one image"):
        autoattack(tiny_model, x[:0], y[:0], 0.1)
