"""Data: the offline layout, counts and labels, subsets, and the errors a user can meet."""


import pytest
import torch

from defenses_lib import data
from defenses_lib.data import DataNotFoundError, ImageDataset, balanced_subset, chapter_data, load_dataset


def test_mnist_offline(data_root):
    train, test = load_dataset("mnist", "train", data_root), load_dataset("mnist", "test", data_root)
    assert len(train) == 60_000 and len(test) == 10_000
    x, y = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert test.targets[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train.targets[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(test.targets).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_cifar10_offline(data_root):
    test = load_dataset("cifar10", "test", data_root)
    assert len(test) == 10_000 and test[0][0].shape == (3, 32, 32)
    assert test.targets[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert test.classes[0] == "airplane"
    with pytest.warns(UserWarning, match="4000"):
        train = load_dataset("cifar10", "train", data_root)
    assert len(train) == 4000 and train.targets[:4].tolist() == [6, 9, 9, 4]


def test_cifar100_and_imagenette_offline(data_root):
    with pytest.warns(UserWarning, match="20"):
        c100 = load_dataset("cifar100", "test", data_root)
    assert len(c100) == 20 and c100.targets[:3].tolist() == [49, 33, 72] and len(c100.classes) == 100
    nette = load_dataset("imagenette", "test", data_root, image_size=64)
    assert len(nette) == 500 and nette[0][0].shape == (3, 64, 64)
    assert torch.bincount(nette.targets).tolist() == [50] * 10


def test_missing_split_offline_says_how_to_fix(data_root):
    with pytest.raises(DataNotFoundError, match="DEFENSES_DATA") as err:
        load_dataset("cifar100", "train", data_root, download=False)
    assert "download=True" in str(err.value)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("mnist", "valid")


def test_missing_root_without_download(tmp_path):
    with pytest.raises(DataNotFoundError, match="root=") as err:
        load_dataset("mnist", "test", tmp_path / "nowhere", download=False)
    assert "download=True" in str(err.value) and "DEFENSES_DATA" in str(err.value)


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import torchvision

    def broken(root, train, download):
        (root / "MNIST" / "raw").mkdir(parents=True)
        (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"half")
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", broken)
    with pytest.raises(DataNotFoundError, match="no network"):
        load_dataset("mnist", "test", tmp_path)
    assert not (tmp_path / "MNIST").exists()


def test_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root("elsewhere").name == "elsewhere"


def test_balanced_subset_is_balanced_and_deterministic(data_root):
    test = load_dataset("mnist", "test", data_root)
    a, b = balanced_subset(test, 500, seed=3), balanced_subset(test, 500, seed=3)
    assert torch.bincount(a.targets).tolist() == [50] * 10
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, balanced_subset(test, 500, seed=4).images)
    with pytest.raises(ValueError, match="multiple"):
        balanced_subset(test, 55)


def test_chapter_data_is_the_profiles_subsets(data_root, monkeypatch):
    from defenses_lib.profiles import get_profile
    monkeypatch.setenv("DEFENSES_DATA", str(data_root))
    P = get_profile("drsl", n_train=100, n_test=20, seed=3)
    train_set, x, y = chapter_data(P)
    assert len(train_set) == 100 and x.shape == (20, 1, 28, 28) and torch.bincount(y).tolist() == [2] * 10
    _, x2, _ = chapter_data(P.replace(seed=4))
    assert not torch.equal(x, x2)


def test_image_dataset_checks_its_input():
    with pytest.raises(ValueError, match="uint8"):
        data.ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), ["a"])
    with pytest.raises(ValueError, match="targets"):
        data.ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), ["a"])


def test_binarized_images_are_zero_or_one_at_the_threshold():
    images = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(4, 1, 1, 1)
    data = ImageDataset(images, torch.zeros(4, dtype=torch.long), ["a"]).binarized(0.5)
    x, _ = data.tensors()
    assert x.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="threshold must be in"):
        data.binarized(1.0)


def test_balanced_subset_of_the_whole_set_is_the_whole_set(data_root):
    train = load_dataset("mnist", "train", data_root)
    assert balanced_subset(train, len(train)) is train


def test_crop_flip_is_a_shifted_window_of_the_zero_padded_image_flipped_or_not():
    """Each augmented image equals one of the 81 windows of the 4-pixel zero-padded image, mirrored or
    not; across a batch both the offsets and the flips vary; 'none' returns the batch itself."""
    from defenses_lib.data import augment

    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    out = augment(x, "crop-flip")
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    found = []
    for img, pad in zip(out, padded):
        hits = [(i, j, f) for i in range(9) for j in range(9) for f in (False, True)
                if torch.equal(img, pad[:, i:i + 8, j:j + 8].flip(-1) if f else pad[:, i:i + 8, j:j + 8])]
        assert hits, "not a window of the padded image"
        found.append(hits[0])
    assert len({(i, j) for i, j, _ in found}) > 20 and 10 < sum(f for *_, f in found) < 54
    assert augment(x, "none") is x
    with pytest.raises(ValueError, match="augment must be one of"):
        augment(x, "cutout")
