"""Shared fixtures: the offline data root (tests that need real data skip without it) and tiny models."""

import os
from pathlib import Path

import pytest
import torch

from defenses_lib.data import DATA_ENV

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The offline data folder: $DEFENSES_DATA, else ../shared/data beside the repository."""
    root = Path(os.environ.get(DATA_ENV) or SHARED)
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"no offline data under {root} (set {DATA_ENV})")
    return root


@pytest.fixture(scope="session")
def mnist_small(data_root):
    """A trained MNIST CNN (one epoch on 2,000 images) and 200 test images."""
    from defenses_lib.data import balanced_subset, load_dataset
    from defenses_lib.models import build_model
    from defenses_lib.defenses.baselines import CrossEntropy
    from defenses_lib.training import train

    torch.manual_seed(0)
    model = build_model("mnist_cnn", "mnist")
    train(model, balanced_subset(load_dataset("mnist", "train", data_root), 2000), CrossEntropy(),
          epochs=1, batch_size=64, show_progress=False)
    x, y = balanced_subset(load_dataset("mnist", "test", data_root), 200, seed=1).tensors()
    return model, x, y


@pytest.fixture
def paper_profile(data_root, tmp_path, monkeypatch):
    """A factory: ``paper_profile(chapter, **overrides)`` is the chapter's paper profile shrunk by ``overrides``
    and its training data (``n_train`` images), with a private runs folder for the test."""
    from defenses_lib.data import balanced_subset, load_dataset
    from defenses_lib.profiles import get_profile

    monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path))

    def make(chapter, **overrides):
        """The shrunk profile and its training data."""
        P = get_profile(chapter, "paper", **overrides)
        return P, balanced_subset(load_dataset(P.dataset, "train", data_root), P.n_train)

    return make


@pytest.fixture
def tiny_model():
    """An untrained smooth CNN on 1x8x8 inputs, quick enough for any test."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Softplus(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 64, 10))


@pytest.fixture(autouse=True)
def _private_runs_folder(tmp_path_factory, monkeypatch):
    """Each test's checkpoints and cached evaluations go to a folder of its own, never ./runs."""
    if "DEFENSES_RUNS" not in os.environ:
        monkeypatch.setenv("DEFENSES_RUNS", str(tmp_path_factory.mktemp("runs")))
