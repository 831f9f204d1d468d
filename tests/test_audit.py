"""Audit your own defense: the whole evaluation in one call, on a deterministic and a randomized model,
the randomized-model AutoAttack bookkeeping, and the command line."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses_lib.audit import audit, main
from defenses_lib.evaluation import autoattack, correctness
from defenses_lib.masked import Undeclared


class Flaky(nn.Module):
    """A classifier whose every pass, with probability q per example, votes loudly for a wrong class."""

    def __init__(self, model, q=0.3):
        super().__init__()
        self.model, self.q = model, q

    def forward(self, x):
        logits = self.model(x)
        wrong = F.one_hot((logits.argmax(1) + 1) % logits.shape[1], logits.shape[1])
        return logits + 30 * (torch.rand(len(x), 1, device=x.device) < self.q) * wrong


def test_autoattack_decides_with_the_expected_prediction_where_one_noisy_pass_misleads_it(mnist_small):
    """One noisy pass makes AutoAttack skip examples it should attack; the expected prediction does not."""
    model, x, y = mnist_small
    flaky, x, y = Flaky(model), x[:100], y[:100]
    torch.manual_seed(0)
    one_pass = autoattack(flaky, x, y, 0.2, version="custom", attacks=["apgd-ce"], decision_draws=1)
    expected = autoattack(flaky, x, y, 0.2, version="custom", attacks=["apgd-ce"], eot_draws=8)   # 16 decide
    acc_one, acc_expected = (correctness(flaky, a, y, repeats=20).mean().item() for a in (one_pass, expected))
    assert acc_expected < acc_one - 0.1, (acc_one, acc_expected)   # measured: 32.5% against 17.6%
    # APGD's step-size rules still read noisy losses: PGD through the same 8-draw average does better
    # (4.2% here), which is why the book quotes the per-example worst case over both


def test_autoattack_names_bad_decision_draws(tiny_model):
    with pytest.raises(ValueError, match="decision_draws"):
        autoattack(tiny_model, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), 0.1, decision_draws=0)
    with pytest.raises(ValueError, match="eot_draws"):
        autoattack(tiny_model, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), 0.1, eot_draws=0)


def test_audit_of_a_deterministic_model_runs_the_whole_evaluation(mnist_small):
    model, x, y = mnist_small
    report = audit(model, x[:30], y[:30], eps=0.1, steps=10, aa_n=10, sanity_n=30, square_queries=300)
    acc = report.result.accuracy()
    assert list(acc) == ["clean", "FGSM", "PGD-10 CE", "PGD-10 margin", "AutoAttack (standard)", "worst case"]
    assert report.result.n == 10 and report.whitebox.n == 30 and not report.randomized
    assert acc["worst case"] <= min(v for k, v in acc.items() if k != "worst case")
    assert report.passed, report.sanity
    assert any("AutoAttack on 20 of the 30" in s for s in report.not_run)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["accuracy"]["clean"]["n"] == 10 and len(data["outcomes"]["worst case"]) == 10
    assert "FGSM and PGD on all 30" in str(report) and "<table>" in report._repr_html_()
    assert data["whitebox accuracy"]["clean"]["n"] == 30


def test_audit_of_a_randomized_model_attacks_the_expectation_and_fixes_the_randomness(mnist_small):
    model, x, y = mnist_small
    report = audit(Undeclared(model, p=0.2), x[:20], y[:20], eps=0.1, steps=5, draws=2, repeats=2, aa_n=8,
                   sanity_n=12, square_queries=100)
    assert report.randomized and "EOT over 2 draws" in report.settings["randomized"]
    assert "AutoAttack (rand)" in report.result.accuracy()
    fifth = report.sanity.checks[4]
    assert fifth.passed is not None and "fixed-randomness" in fifth.detail
    assert any("strength_sweep" in s for s in report.not_run)


def test_audit_names_its_bad_arguments(mnist_small):
    model, x, y = mnist_small
    with pytest.raises(ValueError, match="deterministic: draws and repeats"):
        audit(model, x[:4], y[:4], eps=0.1, draws=4)
    with pytest.raises(ValueError, match="steps"):
        audit(model, x[:4], y[:4], eps=0.1, steps=0)


class _OwnGenerator(nn.Module):
    """Random with a generator of its own: re-seeding torch's generator does not fix it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.g = model, torch.Generator().manual_seed(1)

    def forward(self, x):
        return self.model(x + 0.1 * torch.randn(x.shape, generator=self.g))


def test_audit_refuses_a_randomness_it_cannot_fix(mnist_small):
    model, x, y = mnist_small
    with pytest.raises(ValueError, match="pass fixed_model"):
        audit(_OwnGenerator(model), x[:8], y[:8], eps=0.1)


def test_the_command_line_audits_a_model_built_by_an_importable_function(mnist_small, data_root, tmp_path,
                                                                         monkeypatch, capsys):
    model, _, _ = mnist_small
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "my_models.py").write_text(
        "from defenses_lib.models import build_model\n\ndef build():\n    return build_model('mnist_cnn', 'mnist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    main(["my_models:build", "--checkpoint", str(tmp_path / "weights.pt"), "--data", "mnist", "--root",
          str(data_root), "--n", "10", "--eps", "0.1", "--steps", "5", "--sanity-n", "10", "--aa-n", "3",
          "--square-queries", "50", "--out", str(tmp_path / "audit.json")])
    data = json.loads((tmp_path / "audit.json").read_text())
    assert data["settings"]["n"] == 10 and "Sanity checks" in capsys.readouterr().out
    with pytest.raises(ValueError, match="package.module:callable"):
        main(["my_models.build", "--data", "mnist", "--eps", "0.1"])
