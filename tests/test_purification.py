"""AToP: the random transforms keep shapes and ranges and are reproducible, the pipeline's gradient
reaches the input through the purifier, and fine-tuning leaves the classifier alone."""

import pytest
import torch
from torch import nn

from defenses_lib.attacks import pgd
from defenses_lib.data import ImageDataset
from defenses_lib.defenses.purification import (AToPLoss, InpaintingUNet, PurifiedClassifier, PurifierPretrainLoss,
                                                RandomTransform)
from defenses_lib.training import train


def _x(n=6, size=8, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _pipeline(kind="rt2"):
    torch.manual_seed(1)
    return PurifiedClassifier(_classifier(), InpaintingUNet(1, width=4), RandomTransform(kind, block=2))


@pytest.mark.parametrize("kind", ["rt1", "rt2", "rt3"])
def test_transforms_keep_shape_and_range_and_are_reproducible(kind):
    x = _x()

    def draw(seed):
        return RandomTransform(kind, block=2, generator=torch.Generator().manual_seed(seed)).sample(x)

    (noisy, masks), (noisy2, masks2) = draw(3), draw(3)
    assert noisy.shape == x.shape and 0 <= noisy.min() and noisy.max() <= 1
    assert masks.shape == (4 if kind == "rt3" else 1, *x.shape)
    assert torch.equal(noisy, noisy2) and torch.equal(masks, masks2)
    assert not torch.equal(masks, draw(4)[1])
    assert torch.equal(noisy, x) == (kind == "rt1")  # RT1 adds no noise


def test_mask_rates_and_rt3_partition():
    x = _x(n=3, size=8)
    _, masks = RandomTransform("rt1", block=2, missing_rate=0.25).sample(x)
    assert torch.allclose(masks.mean((0, 2, 3, 4)), torch.full((3,), 0.25))  # 4 of 16 blocks per image
    _, masks = RandomTransform("rt3", block=2, n_masks=4).sample(x)
    assert torch.equal(masks.sum(0), torch.ones_like(x))  # every pixel is missing in exactly one copy
    _, shared = RandomTransform("rt2", block=2, shared_mask=True).sample(x)
    assert torch.equal(shared[0, 0], shared[0, 2])


def test_fixed_randomness_is_deterministic_and_shares_weights():
    model = _pipeline()
    fixed = model.with_fixed_randomness(5)
    x = _x()
    assert torch.equal(fixed(x), fixed(x)) and not torch.equal(model(x), model(x))
    assert fixed.purifier is model.purifier and model.transform.fixed_seed is None
    assert model.randomized and not fixed.randomized  # so attacks skip early stopping on the first only
    plain = PurifiedClassifier(_classifier(), InpaintingUNet(1, width=4),
                               RandomTransform("rt1", block=2, missing_rate=0))
    assert not plain.randomized and torch.equal(plain(x), plain(x))


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        RandomTransform("rt4")
    with pytest.raises(ValueError, match="missing_rate"):
        RandomTransform(missing_rate=1.5)
    with pytest.raises(ValueError, match="multiples of block"):
        RandomTransform(block=3).sample(_x(size=8))
    with pytest.raises(ValueError, match="no setting sigmaa"):
        RandomTransform().replace(sigmaa=0.5)
    with pytest.raises(ValueError, match="victim must be one of"):
        AToPLoss(0.1, victim="purifier")


def test_gradient_reaches_the_input_through_the_purifier():
    model, x = _pipeline(), _x().requires_grad_(True)
    model(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.purifier.parameters())
    assert all(p.grad is None for p in model.classifier.parameters())  # frozen


@pytest.mark.parametrize("kind", ["rt2", "rt3"])
def test_fine_tuning_changes_the_purifier_not_the_classifier(kind):
    model = _pipeline(kind)
    data = ImageDataset(torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (24,)),
                        [str(i) for i in range(10)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, data, PurifierPretrainLoss(), epochs=1, batch_size=8, show_progress=False)
    train(model, data, AToPLoss(0.1, lam=1.0), epochs=1, batch_size=8, show_progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("classifier."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("purifier."))
    assert not model.classifier.training


def test_atop_loss_variants_and_attacks_on_the_pipeline():
    model, x, y = _pipeline(), _x(), torch.arange(6) % 10
    for loss in (AToPLoss(0.1), AToPLoss(0.1, attack="pgd", steps=2, victim="pipeline", l1_target="adversarial")):
        assert torch.isfinite(loss(model, x, y))
    x_adv = pgd(model, x, y, 0.1, steps=2)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_purification_explorer_has_a_view_per_rate_and_sigma():
    import matplotlib

    matplotlib.use("Agg")
    from defenses_lib.widgets import purification_explorer

    model, x = _pipeline(), _x(3)
    box = purification_explorer(model, x, torch.arange(3), missing_rates=[0.0, 0.5], sigmas=[0.0, 0.25, 0.5])
    chooser, slider = box.children[0].children
    assert len(chooser.options) == 2 and len(slider.options) == 3
    assert model.transform.fixed_seed is None and model.transform.sigma == 0.25  # the model is left as it was
