"""DRSL: the loss against its formula on a hand-made batch, batch-size invariance of the per-sample
form, the logit / log-softmax equivalence, the authors' centring quirk and clear errors."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from defenses_lib.defenses.drsl import DRSLLoss, squared_deviations, wrong_class_spread, wrong_class_values


class Fixed(nn.Module):
    """A 'model' that returns the given logits whatever its input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.5]])
Y = torch.tensor([0, 2])


def test_loss_equals_its_formula_on_a_hand_made_batch():
    # sample 0: wrong logits 1, 0, -1 (mean 0, squared deviations 1 + 0 + 1 = 2);
    # sample 1: wrong logits 0.5, 0.5, 0.5 (no spread)
    ce = F.cross_entropy(LOGITS, Y)
    mean_form = DRSLLoss(a=0.7, b=0.3)(Fixed(LOGITS), None, Y)
    assert mean_form.item() == pytest.approx(0.7 * ce.item() + 0.3 * ((2 / 3 + 0) / 2))
    batch_sum = DRSLLoss(a=1.0, b=0.001, reduction="batch_sum")(Fixed(LOGITS), None, Y)
    assert batch_sum.item() == pytest.approx(ce.item() + 0.001 * 2.0)
    assert torch.allclose(wrong_class_spread(LOGITS, Y), torch.tensor([2 / 3, 0.0]))
    assert torch.equal(wrong_class_values(LOGITS, Y), torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]))


def test_per_sample_form_is_invariant_to_the_batch_size_and_the_authors_form_is_not():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    doubled = (logits.repeat(4, 1), y.repeat(4))
    mean = DRSLLoss(a=0.0, b=1.0)
    assert mean.penalty(*doubled).item() == pytest.approx(mean.penalty(logits, y).item())
    summed = DRSLLoss(a=0.0, b=1.0, reduction="batch_sum")
    assert summed.penalty(*doubled).item() == pytest.approx(4 * summed.penalty(logits, y).item())
    # the documented conversion: b' = b * (K - 1) * B
    assert summed.penalty(logits, y).item() == pytest.approx(9 * 8 * mean.penalty(logits, y).item())


def test_logit_space_equals_the_log_softmax_form():
    torch.manual_seed(1)
    logits, y = torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    log_p = logits.log_softmax(1)
    assert torch.allclose(wrong_class_spread(logits, y), wrong_class_spread(log_p, y), atol=1e-5)
    assert torch.allclose(squared_deviations(logits, y), squared_deviations(log_p, y), atol=1e-4)
    assert not torch.allclose(wrong_class_spread(logits, y, "prob"), wrong_class_spread(logits, y))


def test_authors_centre_adds_the_wrong_class_mean():
    # sample 1 has no spread, but its wrong-class mean 0.5 is centred at 1.5 / 4 = 0.375 by class DRSL
    dev = squared_deviations(LOGITS, Y, center="authors")
    assert dev[1].item() == pytest.approx(3 * (0.5 - 0.375) ** 2)
    assert dev[0].item() == pytest.approx(2.0)  # wrong-class sum 0: both centres agree
    shifted = LOGITS + 5.0  # a shift the log-softmax would remove
    assert not torch.allclose(squared_deviations(shifted, Y, center="authors"), dev)


def test_the_penalty_flattens_the_wrong_classes():
    torch.manual_seed(2)
    logits = torch.randn(4, 10, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    opt = torch.optim.SGD([logits], lr=10.0)  # the gradient of a batch-mean variance is 2 (v - mean) / ((K - 1) N)
    before = wrong_class_spread(logits, y).sum().item()
    for _ in range(20):
        opt.zero_grad()
        DRSLLoss(a=0.0, b=1.0)(Fixed(logits), None, y).backward()
        opt.step()
    assert wrong_class_spread(logits, y).sum().item() < 0.01 * before


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="space must be one of"):
        DRSLLoss(space="entropy")
    with pytest.raises(ValueError, match="reduction must be one of"):
        DRSLLoss(reduction="sum")
    with pytest.raises(ValueError, match="a and b must be >= 0"):
        DRSLLoss(b=-1.0)
    with pytest.raises(ValueError, match="center must be one of"):
        squared_deviations(LOGITS, Y, center="median")
    with pytest.raises(ValueError, match="logits must have shape"):
        wrong_class_values(LOGITS[0], Y)


def test_clean_scores_and_their_correlations_with_success():
    from defenses_lib.defenses.drsl import clean_scores, success_correlations
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.5, 2.0, 1.5], [1.0, 1.0, 4.0], [2.0, 0.0, 1.9]])
    y = torch.tensor([0, 1, 2, 0])
    model = nn.Sequential(nn.Flatten())
    s = clean_scores(model, logits.view(4, 3, 1, 1), y)
    assert s["clean margin"].tolist() == pytest.approx([2.0, 0.5, 3.0, 0.1])
    assert torch.allclose(s["log-softmax variance"], wrong_class_spread(logits, y, "logit"))
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(60, 10, generator=g), torch.randint(0, 10, (60,), generator=g)
    scores = clean_scores(model, z.view(60, 10, 1, 1), t)
    success = (scores["clean margin"] < scores["clean margin"].median()).float()   # success = a small margin
    out = success_correlations(scores, success, draws=20)
    assert out["clean margin"]["AUC"] == 0.0 and out["clean margin"]["Spearman r"].value < -0.8
    assert "partial r | clean margin" in out["softmax variance"] and "partial r" not in str(out["clean margin"])
