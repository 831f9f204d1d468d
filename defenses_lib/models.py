"""Models that take images in [0, 1], normalise them in their first layer and return logits."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .checks import check_choice

# Per-channel mean and std of each data set's training images.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Normalize(nn.Module):
    """Subtract a per-channel mean and divide by a per-channel std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class MnistCNN(nn.Module):
    """The ARMOR_D paper's MNIST network: four 3x3 convolutions (two with stride 2) and two linear layers."""

    def __init__(self, num_classes: int = 10, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), activation(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), activation(),
            nn.Conv2d(32, 64, 3, padding=1), activation(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), activation(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 100), activation(),
                                        nn.Linear(100, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class TinyCNN(nn.Module):
    """Two stride-2 3x3 convolutions and two linear layers (about 0.4 M multiply-adds on MNIST, 20x fewer
    than ``MnistCNN``): for experiments that need 10^5 to 10^6 forward passes, such as certification."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(7),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 49, 64), nn.ReLU(),
                                        nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A fully connected network on flattened inputs (SLEIPNIR's malware detector: three hidden layers of 300)."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden=(300, 300, 300)):
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)


class SmallCifarCNN(nn.Module):
    """A small VGG-style CIFAR network that trains on a CPU in minutes."""

    def __init__(self, num_classes: int = 10, width: int = 32, activation: type[nn.Module] = nn.ReLU):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), activation(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), activation(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 128), activation(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18/20."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (3x3 stem, no max-pool); ResNet-18 with the default widths and depths."""

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


# Image side length of each data set as the loaders return it.
SIZES = {"mnist": 28, "cifar10": 32, "cifar100": 32, "imagenette": 224}

ARCHITECTURES = {
    "mnist_cnn": lambda c, k, size: MnistCNN(k),
    "tiny_cnn": lambda c, k, size: TinyCNN(c, k),
    "mlp": lambda c, k, size: MLP(c * size * size, k),
    "small_cnn": lambda c, k, size: SmallCifarCNN(k),
    "resnet18": lambda c, k, size: ResNet(in_channels=c, num_classes=k),
    "resnet20": lambda c, k, size: ResNet((3, 3, 3), (16, 32, 64), in_channels=c, num_classes=k),
}


def build_model(arch: str, dataset: str, num_classes: int | None = None) -> nn.Sequential:
    """``Normalize`` for ``dataset`` followed by the network ``arch``; takes [0, 1] images, returns logits."""
    check_choice("arch", arch, sorted(ARCHITECTURES))
    check_choice("dataset", dataset, sorted(STATS))
    mean, std = STATS[dataset]
    k = num_classes or (100 if dataset == "cifar100" else 10)
    return nn.Sequential(Normalize(mean, std), ARCHITECTURES[arch](len(mean), k, SIZES[dataset]))
