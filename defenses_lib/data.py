"""Real image data sets: an offline folder or torchvision's download, class-balanced subsets, loaders.

The data root comes from the ``root`` argument, else the ``DEFENSES_DATA`` environment variable,
else ``~/.cache/defenses_lib/data``. Under it the loaders accept two layouts:

* torchvision's own (``MNIST/raw``, ``cifar-10-batches-py``, ``cifar-100-python``, ``imagenette2*``),
  which ``download=True`` creates on a machine with internet;
* the project's offline layout (``MNIST/raw/*.gz``, ``cifar10/*.npz``, ``cifar100/*.npz``,
  ``imagenette/val_subset/<wnid>/``), as shipped in the ``shared/data`` folder.

Every data set yields ``(image, label)`` with the image a float tensor in [0, 1], channels first.
"""

from __future__ import annotations

import gzip
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import estimate
from .checks import check_choice

DATA_ENV = "DEFENSES_DATA"
DATASETS = ("mnist", "cifar10", "cifar100", "imagenette")
SPLITS = ("train", "test")


class DataNotFoundError(FileNotFoundError):
    """A data set is neither under the data root nor downloadable."""


class ImageDataset(Dataset):
    """Images held as uint8 NCHW in memory, served as floats in [0, 1]."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str]):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor of shape (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")
        self.images, self.targets, self.classes = images, targets.long(), list(classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i].float().div_(255), self.targets[i]

    def select(self, indices) -> "ImageDataset":
        """The data set restricted to ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[idx], self.targets[idx], self.classes)

    def binarized(self, threshold: float = 0.5) -> "ImageDataset":
        """The data set with every pixel 1 where it exceeds ``threshold`` and 0 elsewhere: binary feature vectors."""
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        return ImageDataset((self.images.float() > threshold * 255).to(torch.uint8) * 255, self.targets, self.classes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float tensor in [0, 1] and the labels."""
        return self.images.float().div(255), self.targets.clone()


class FolderDataset(Dataset):
    """Images read from files on demand (Imagenette), resized to a square side."""

    def __init__(self, paths: list[Path], targets: torch.Tensor, classes: list[str], size: int):
        self.paths, self.targets, self.classes, self.size = list(paths), targets.long(), list(classes), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        import torchvision.transforms.functional as TF

        with Image.open(self.paths[i]) as im:
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            return TF.to_tensor(im), self.targets[i]

    def select(self, indices) -> "FolderDataset":
        """The data set restricted to ``indices``, in that order."""
        idx = [int(i) for i in indices]
        return FolderDataset([self.paths[i] for i in idx], self.targets[idx], self.classes, self.size)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float tensor in [0, 1] and the labels."""
        return torch.stack([self[i][0] for i in range(len(self))]), self.targets.clone()


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else $DEFENSES_DATA, else ~/.cache/defenses_lib/data."""
    if root is None:
        root = os.environ.get(DATA_ENV) or Path.home() / ".cache" / "defenses_lib" / "data"
    return Path(root).expanduser()


def load_dataset(name: str, split: str = "test", root=None, download: bool = True, image_size: int = 224):
    """Load a real data set by name ('mnist', 'cifar10', 'cifar100', 'imagenette') and split."""
    key = name.lower().replace("-", "")
    if key not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    check_choice("split", split, SPLITS)
    base = data_root(root)
    loader = {"mnist": _mnist, "cifar10": _cifar10, "cifar100": _cifar100, "imagenette": _imagenette}[key]
    if key == "imagenette":
        return loader(base, split, download, image_size)
    return loader(base, split, download)


def _not_found(name: str, split: str, base: Path, offline: str, cause: Exception | None = None):
    """The one error that says both ways to get a data set."""
    msg = (
        f"{name} ({split} split) was not found under the data root {base}.\n"
        f"Fix it in one of two ways:\n"
        f"  1. point the data root at a folder that holds it: pass root=... or set {DATA_ENV}=/path "
        f"(offline layout: {offline}, or torchvision's own layout);\n"
        f"  2. let torchvision download it there: download=True on a machine with internet access."
    )
    if cause is not None:
        msg += f"\nThe download failed with: {type(cause).__name__}: {cause}"
    return DataNotFoundError(msg)


def _download(name: str, split: str, base: Path, offline: str, make, created: Path):
    """Run a torchvision download; on failure remove what it half-wrote and raise one clear error."""
    existed = created.exists()
    try:
        return make()
    except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError, ...
        if not existed and created.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise _not_found(name, split, base, offline, exc) from exc


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_file(raw: Path, stem: str) -> Path | None:
    """The IDX file for ``stem``, uncompressed or gzipped, if present."""
    for p in (raw / stem, raw / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _mnist(base: Path, split: str, download: bool) -> ImageDataset:
    """MNIST from <root>/MNIST/raw (offline .gz or torchvision's files), else download."""
    prefix = "train" if split == "train" else "t10k"
    raw = base / "MNIST" / "raw"
    offline = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"
    files = [_mnist_file(raw, f"{prefix}-images-idx3-ubyte"), _mnist_file(raw, f"{prefix}-labels-idx1-ubyte")]
    if None in files:
        if not download:
            raise _not_found("MNIST", split, base, offline)
        import torchvision

        _download("MNIST", split, base, offline,
                  lambda: torchvision.datasets.MNIST(base, train=split == "train", download=True), base / "MNIST")
        files = [_mnist_file(raw, f"{prefix}-images-idx3-ubyte"), _mnist_file(raw, f"{prefix}-labels-idx1-ubyte")]
    images, labels = (_read_idx(p) for p in files)
    return ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        [str(i) for i in range(10)])


def _from_hwc(x: np.ndarray, y, classes) -> ImageDataset:
    """Wrap HWC uint8 arrays as an ImageDataset."""
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images, torch.as_tensor(np.asarray(y), dtype=torch.long), [str(c) for c in classes])


def _cifar(name: str, cls_name: str, folder: str, base: Path, split: str, download: bool, offline: str,
           read_offline) -> ImageDataset:
    """A CIFAR split from torchvision's layout, else ``read_offline()`` (None if absent), else download."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    if not (base / folder).is_dir():
        found = read_offline()
        if found is not None:
            return found
        if not download:
            raise _not_found(name, split, base, offline)
        _download(name, split, base, offline, lambda: cls(base, train=split == "train", download=True), base / folder)
    ds = cls(base, train=split == "train", download=False)
    return _from_hwc(ds.data, ds.targets, ds.classes)


def _cifar10(base: Path, split: str, download: bool) -> ImageDataset:
    """CIFAR-10 from torchvision's layout, else the offline .npz files, else download."""
    npz = base / "cifar10" / ("cifar10_test.npz" if split == "test" else "cifar10_train_first4000.npz")

    def offline():
        if not npz.is_file():
            return None
        with np.load(npz) as d:
            if split == "train":
                warnings.warn(f"{npz} holds only the first {len(d['y_train'])} CIFAR-10 training images", stacklevel=4)
            return _from_hwc(d[f"x_{split}"], d[f"y_{split}"], d["classes"])

    return _cifar("CIFAR-10", "CIFAR10", "cifar-10-batches-py", base, split, download,
                  "cifar10/cifar10_test.npz and cifar10/cifar10_train_first4000.npz", offline)


def _cifar100(base: Path, split: str, download: bool) -> ImageDataset:
    """CIFAR-100 (fine labels) from torchvision's layout, else the offline test sample, else download."""
    npz = base / "cifar100" / "cifar100_test_first20.npz"

    def offline():
        if split != "test" or not npz.is_file():
            return None
        with np.load(npz) as d:
            warnings.warn(f"{npz} holds only the first {len(d['y_test_fine'])} CIFAR-100 test images", stacklevel=4)
            return _from_hwc(d["x_test"], d["y_test_fine"], d["fine_label_names"])

    return _cifar("CIFAR-100", "CIFAR100", "cifar-100-python", base, split, download,
                  "cifar100/cifar100_test_first20.npz (test split only)", offline)


def _folder(root: Path, size: int) -> FolderDataset:
    """An ImageFolder-style tree (one sub-folder per class, sorted) as a FolderDataset."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, targets = [], []
    for k, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
        paths += files
        targets += [k] * len(files)
    return FolderDataset(paths, torch.tensor(targets), classes, size)


def _imagenette(base: Path, split: str, download: bool, size: int) -> FolderDataset:
    """Imagenette from torchvision's layout (imagenette2*), else the offline val subset, else download."""
    sub = "train" if split == "train" else "val"
    offline = "imagenette/val_subset/<wnid>/*.JPEG (test split only)"
    for name in ("imagenette2", "imagenette2-320", "imagenette2-160"):
        if (base / name / sub).is_dir():
            return _folder(base / name / sub, size)
    if split == "test" and (base / "imagenette" / "val_subset").is_dir():
        return _folder(base / "imagenette" / "val_subset", size)
    if not download:
        raise _not_found("Imagenette", split, base, offline)
    import torchvision

    _download("Imagenette", split, base, offline,
              lambda: torchvision.datasets.Imagenette(base, split=sub, size="full", download=True),
              base / "imagenette2")
    return _folder(base / "imagenette2" / sub, size)


AUGMENTS = ("none", "crop-flip")


def augment(x: torch.Tensor, kind: str = "none", pad: int = 4) -> torch.Tensor:
    """A training batch augmented on its own device: 'crop-flip' pads by ``pad`` zero pixels, crops
    back to the image's size at a random offset and flips half the images left to right; 'none' is x."""
    check_choice("augment", kind, AUGMENTS)
    if kind == "none":
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top, left = (torch.randint(0, 2 * pad + 1, (n, 1), device=x.device) for _ in range(2))
    rows = (top + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left + torch.arange(w, device=x.device))[:, None, None, :]
    images, channels = torch.arange(n, device=x.device), torch.arange(c, device=x.device)
    out = padded[images[:, None, None, None], channels[:, None, None], rows, cols]
    flip = torch.rand(n, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def balanced_subset(dataset, n: int, seed: int = 0):
    """A deterministic class-balanced subset of ``n`` examples (n divisible by the class count).

    ``n`` equal to the data set's size returns the whole data set (the classes of MNIST's 60,000
    training images, for instance, are not exactly balanced).
    """
    if n == len(dataset):
        return dataset
    targets = dataset.targets
    classes = torch.unique(targets)
    if n <= 0 or n % len(classes):
        raise ValueError(f"n must be a positive multiple of the {len(classes)} classes, got {n}")
    per_class = n // len(classes)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        idx = torch.nonzero(targets == c).flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {int(c)} has only {len(idx)} examples, fewer than the {per_class} asked for")
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    order = torch.cat(picks)[torch.randperm(n, generator=g)]
    return dataset.select(order)


def chapter_data(P) -> tuple:
    """A chapter's data from its profile: ``P.n_train`` training images and ``P.n_test`` test images
    (class-balanced subsets seeded by ``P.seed`` and ``P.test_seed``, by default ``P.seed + 1``), the test
    images as tensors.

    In estimate mode (see :mod:`defenses_lib.estimate`) a training set larger than the data at hand
    is the largest balanced subset there is, and every training counts as if it had ``P.n_train``.
    """
    full = load_dataset(P.dataset, "train")
    n_train = P.n_train
    if estimate.active() and n_train > len(full):
        n_train = int(torch.bincount(full.targets).min()) * len(full.classes)
        estimate.set_data_scale(P.n_train, n_train)
    train_set = balanced_subset(full, n_train, seed=P.seed)
    test_seed = P.seed + 1 if P.test_seed is None else P.test_seed
    x_test, y_test = balanced_subset(load_dataset(P.dataset, "test"), P.n_test, seed=test_seed).tensors()
    return train_set, x_test, y_test
