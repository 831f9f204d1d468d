"""Models: shapes, normalisation inside the model, names checked."""

import pytest
import torch

from defenses_lib.models import STATS, build_model


@pytest.mark.parametrize("arch,dataset,shape,k", [
    ("mnist_cnn", "mnist", (2, 1, 28, 28), 10),
    ("tiny_cnn", "mnist", (2, 1, 28, 28), 10),
    ("tiny_cnn", "cifar10", (2, 3, 32, 32), 10),
    ("small_cnn", "cifar10", (2, 3, 32, 32), 10),
    ("resnet18", "cifar100", (2, 3, 32, 32), 100),
    ("resnet20", "cifar10", (2, 3, 32, 32), 10),
    ("mlp", "mnist", (2, 1, 28, 28), 10),
    ("mlp", "cifar10", (2, 3, 32, 32), 10),
])
def test_logits_shape(arch, dataset, shape, k):
    model = build_model(arch, dataset).eval()
    assert model(torch.rand(shape)).shape == (2, k)


def test_normalisation_is_the_first_layer():
    model = build_model("mnist_cnn", "mnist")
    mean, std = STATS["mnist"]
    x = torch.full((1, 1, 28, 28), mean[0])
    assert torch.allclose(model[0](x), torch.zeros_like(x), atol=1e-6)
    assert torch.allclose(model[0](x + std[0]), torch.ones_like(x), atol=1e-5)


def test_unknown_names():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg99", "mnist")
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_model("mnist_cnn", "svhn")
