"""Long-tailed data sets for the CLI, the tests and the examples.

The long-tail profile is the exponential one of the literature (Cui et al.,
CVPR 2019; LDAM-DRW, ImbSAM and SSE-SAM build CIFAR-LT the same way): class
``c`` of ``C`` keeps ``n_c = int(n_max · imb_factor^(-c / (C - 1)))`` training
samples, so class 0 is the most frequent and ``n_0 / n_{C-1} ≈ imb_factor``.
The test split stays balanced, so per-class accuracies are comparable.

Data sets (:func:`load_dataset`): ``digits-lt`` (scikit-learn's bundled 8x8
digits, offline), ``mnist1d-lt`` (MNIST-1D signals generated locally by the
``mnist1d`` package), ``synthetic-lt`` (a Gaussian mixture with any number of
classes), ``cifar10-lt`` and ``cifar100-lt`` (the python-pickle CIFAR files in a
local directory; torchvision only for ``download=True``). CIFAR images stay
uint8 until a batch is drawn: :func:`random_crop_flip` augments and
:func:`normalize_images` normalises on the training device.

scikit-learn and mnist1d (the ``cli`` extra) are imported only when their data
set is loaded.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_EXTRA_HINT = "pip install 'sse_sam_fast[cli]'"


def long_tail_counts(n_max: int, num_classes: int, imb_factor: float) -> list[int]:
    """Training-set size of each class: ``int(n_max · imb_factor^(-c / (num_classes - 1)))``.

    >>> long_tail_counts(100, 5, 10.0)
    [100, 56, 31, 17, 10]
    """
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"n_max must be an int >= 1, got {n_max!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if (
        isinstance(imb_factor, bool)
        or not isinstance(imb_factor, (int, float))
        or not math.isfinite(imb_factor)
        or imb_factor < 1
    ):
        raise ValueError(f"imb_factor must be a finite number >= 1, got {imb_factor!r}")
    if num_classes == 1:
        return [n_max]
    return [int(n_max * imb_factor ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_split(
    labels: np.ndarray, imb_factor: float, test_per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of a long-tailed training set and a balanced test set.

    Each class gives ``test_per_class`` random samples to the test split; the rest
    of it is its training pool. Class ``c`` then keeps ``long_tail_counts(m, C,
    imb_factor)[c]`` random samples of its pool, ``m`` the smallest pool, so every
    class can supply its count. The two splits never share a sample.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be a non-empty 1-D array of integer class indices")
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int) or test_per_class < 1:
        raise ValueError(f"test_per_class must be an int >= 1, got {test_per_class!r}")
    classes = np.unique(labels)
    if classes[0] != 0 or classes[-1] != classes.size - 1:
        raise ValueError(f"labels must cover the classes 0..C-1 without gaps, got {classes.tolist()}")
    sizes = np.bincount(labels)
    pool = int(sizes.min()) - test_per_class
    if pool < 1:
        raise ValueError(
            f"test_per_class={test_per_class} leaves no training samples for the smallest class "
            f"({int(sizes.min())} samples)"
        )
    counts = long_tail_counts(pool, classes.size, imb_factor)
    if counts[-1] < 1:
        raise ValueError(
            f"imb_factor={imb_factor} leaves class {classes.size - 1} without training samples "
            f"(largest class keeps {pool}); use imb_factor <= {pool}"
        )
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, n in enumerate(counts):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class : test_per_class + n])
    return np.concatenate(train), np.concatenate(test)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            f"the digits data set needs scikit-learn, which is not installed: {_EXTRA_HINT}"
        ) from exc
    bunch = load_digits()  # bundled with scikit-learn: no download
    return bunch.data, bunch.target


def digits_lt(
    imb_factor: float = 10.0, test_per_class: int = 50, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Long-tailed 8x8 digits (scikit-learn's bundled copy of the UCI set).

    Returns ``(x_train, y_train, x_test, y_test)``: float32 features of shape
    ``(N, 64)`` and int64 labels. The test split holds ``test_per_class`` samples
    of each of the 10 classes; the training split follows :func:`long_tail_split`
    (with the defaults: 124 samples of class 0 down to 12 of class 9).

    Features are standardised per pixel with the training split's mean and
    standard deviation (pixels constant in training, such as the always-blank
    corners, are only centred). Zero-mean, unit-variance inputs let one SGD
    learning rate suit every pixel; dividing by 16 would leave the rarely inked
    border pixels with tiny inputs and gradients. Only training statistics are
    used, so nothing about the test split leaks into training.
    """
    data, target = _load_digits()
    train_idx, test_idx = long_tail_split(target, imb_factor, test_per_class, seed)
    x_train, x_test = data[train_idx], data[test_idx]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return (
        torch.from_numpy(x_train.astype(np.float32)),
        torch.from_numpy(target[train_idx].astype(np.int64)),
        torch.from_numpy(x_test.astype(np.float32)),
        torch.from_numpy(target[test_idx].astype(np.int64)),
    )


# ---- synthetic ---------------------------------------------------------------------------------


def synthetic_lt(
    num_classes: int = 10,
    imb_factor: float = 100.0,
    n_max: int = 500,
    test_per_class: int = 100,
    dim: int = 32,
    separation: float = 4.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A long-tailed Gaussian mixture with any number of classes, for stress and speed tests.

    Class ``c`` is ``N(mu_c, I)`` in ``dim`` dimensions with ``mu_c`` drawn from
    ``N(0, (separation^2 / dim)·I)``, so class centres lie about ``separation·sqrt(2)``
    apart whatever ``dim``. Training counts follow :func:`long_tail_counts` from
    ``n_max``; the test split holds ``test_per_class`` samples of every class.
    Returns ``(x_train, y_train, x_test, y_test)`` like :func:`digits_lt`.
    """
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int) or test_per_class < 1:
        raise ValueError(f"test_per_class must be an int >= 1, got {test_per_class!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    counts = long_tail_counts(n_max, num_classes, imb_factor)
    if counts[-1] < 1:
        raise ValueError(
            f"imb_factor={imb_factor} leaves class {num_classes - 1} without training samples "
            f"(largest class keeps {n_max}); use imb_factor <= {n_max}"
        )
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen) * (separation / math.sqrt(dim))

    def draw(per_class: list[int]) -> tuple[Tensor, Tensor]:
        y = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(per_class))
        return means[y] + torch.randn(len(y), dim, generator=gen), y

    x_train, y_train = draw(counts)
    x_test, y_test = draw([test_per_class] * num_classes)
    return x_train, y_train, x_test, y_test


# ---- MNIST-1D-LT --------------------------------------------------------------------------------

# Generated per class: 300 go to the balanced test split, which leaves 1,700 to train from, so
# the largest class keeps 1,700 samples and imbalance 100 leaves the smallest 17.
MNIST1D_PER_CLASS = 2000
MNIST1D_TEST_PER_CLASS = 300
MNIST1D_CACHE = "mnist1d"  # folder under --data-dir


def _mnist1d_cache_file(cache_dir: Path, per_class: int) -> Path:
    # the package version is in the name: a new generator gets a new file, never a stale one
    return cache_dir / f"mnist1d-{metadata.version('mnist1d')}-{per_class}-per-class.npz"


def _generate_mnist1d(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(
            f"the mnist1d-lt data set needs the mnist1d package, which is not installed: {_EXTRA_HINT}"
        ) from exc
    args = get_dataset_args()  # the documented defaults, generator seed included
    args.num_samples = 10 * per_class
    # make_dataset seeds numpy's and Python's global generators: hand them back untouched, so
    # that loading the data (generated or cached) never changes what a run draws afterwards
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    # make_dataset splits 80/20 itself; long_tail_split makes our own splits from the union
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


def _valid_mnist1d(x: np.ndarray, y: np.ndarray, per_class: int) -> bool:
    return (
        x.dtype == np.float32
        and x.ndim == 2
        and y.dtype == np.int64
        and y.shape == (x.shape[0],)
        and np.bincount(y, minlength=10).tolist() == [per_class] * 10
    )


def mnist1d_arrays(
    per_class: int = MNIST1D_PER_CLASS, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: ``10 · per_class`` MNIST-1D signals (float32 ``(N, 40)``) and their
    labels, ``per_class`` of each digit, from ``mnist1d``'s ``make_dataset`` with its
    documented default arguments (``get_dataset_args()``, generator seed 42) but the
    number of samples. No download: the package's generator runs here.

    Generating the default 20,000 samples takes about 4 s, so with ``cache_dir`` the
    arrays are kept in ``cache_dir/mnist1d-<version>-<per_class>-per-class.npz``
    and read back from there (a damaged file is generated again; a directory that
    cannot be written only costs the time).
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    path = None
    if cache_dir is not None:
        try:
            path = _mnist1d_cache_file(Path(cache_dir), per_class)
        except metadata.PackageNotFoundError:
            path = None  # _generate_mnist1d names the missing package
    if path is not None and path.is_file():
        try:
            with np.load(path) as f:
                x, y = f["x"], f["y"]
            if _valid_mnist1d(x, y, per_class):
                return x, y
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a damaged or foreign file: generate again and replace it
    x, y = _generate_mnist1d(per_class)
    if path is not None:
        # written beside, then renamed: runs started together never read half a file
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, path)
        except OSError:
            # a read-only or full --data-dir: the data are right, only the next run regenerates
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return x, y


def mnist1d_lt(
    imb_factor: float = 100.0,
    test_per_class: int = MNIST1D_TEST_PER_CLASS,
    seed: int = 0,
    *,
    per_class: int = MNIST1D_PER_CLASS,
    cache_dir: str | Path | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Long-tailed MNIST-1D (Greydanus, "Scaling down deep learning", 2020): 1-D
    signals of length 40 drawn from templates of the ten digits, padded, scaled,
    translated, sheared and noised.

    Returns ``(x_train, y_train, x_test, y_test)`` like :func:`digits_lt`. The signals
    of :func:`mnist1d_arrays` are one fixed draw; ``seed`` draws the split
    (:func:`long_tail_split`): ``test_per_class`` samples of each class for the
    balanced test split, and with the defaults 1,700 training samples of class 0
    down to 17 of class 9. The signals are used as the generator hands them out,
    standardised by one mean and one scale over the whole draw (no per-position
    statistics, which would be near-constant anyway: the digits are translated).
    """
    x, y = mnist1d_arrays(per_class, cache_dir)
    train_idx, test_idx = long_tail_split(y, imb_factor, test_per_class, seed)
    return (
        torch.from_numpy(x[train_idx]),
        torch.from_numpy(y[train_idx]),
        torch.from_numpy(x[test_idx]),
        torch.from_numpy(y[test_idx]),
    )


# ---- CIFAR-LT ----------------------------------------------------------------------------------

# Per-channel statistics of the CIFAR training sets, the values long-tail code bases normalise with.
CIFAR_STATS = {
    "cifar10-lt": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100-lt": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_LAYOUT = {
    # name: (folder, training files, test files, label key, classes, torchvision class)
    "cifar10-lt": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        "CIFAR10",
    ),
    "cifar100-lt": ("cifar-100-python", ("train",), ("test",), b"fine_labels", 100, "CIFAR100"),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_SUBSET_SEED = 0  # the long-tailed subset is one fixed draw, shared by every run and seed


def cifar_files(name: str, data_dir: str | Path) -> list[Path]:
    """The files :func:`cifar_lt` reads for ``name``, training files first."""
    folder, train, test, *_ = _CIFAR_LAYOUT[name]
    return [Path(data_dir) / folder / f for f in (*train, *test)]


def _read_cifar_pickle(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    # the CIFAR archives are Python pickles: only point --data-dir at files you trust
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # unpickling a damaged file can raise almost anything
        raise ValueError(f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and {label_key!r}, got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected {data.shape[0]} integer labels, got shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download_cifar(name: str, data_dir: Path) -> None:
    try:
        import torchvision.datasets as tv_datasets
    except ImportError:
        raise ImportError(
            f"--download uses torchvision's downloader, and torchvision is not installed: "
            f"pip install torchvision, or fetch the python version of {_CIFAR_LAYOUT[name][5]} from "
            f"{CIFAR_URL} and extract it into {data_dir.resolve()}"
        ) from None
    dataset = getattr(tv_datasets, _CIFAR_LAYOUT[name][5])
    for train in (True, False):
        dataset(str(data_dir), train=train, download=True)


def cifar_lt(
    name: str, data_dir: str | Path, imb_factor: float = 100.0, download: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10-LT or CIFAR-100-LT from the python-pickle files under ``data_dir``.

    Returns ``(x_train, y_train, x_test, y_test)`` with uint8 images of shape
    ``(N, 3, 32, 32)`` (normalise them with :data:`CIFAR_STATS`). Class ``c`` keeps
    ``long_tail_counts(n, C, imb_factor)[c]`` training images, ``n`` the smallest
    class (5000 for CIFAR-10, 500 for CIFAR-100), drawn once with a fixed seed so
    every run and seed trains on the same subset; the test split is the full,
    balanced test set. ``download=True`` fetches missing files with torchvision.
    """
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"name must be one of {sorted(_CIFAR_LAYOUT)}, got {name!r}")
    folder, train_files, _, label_key, num_classes, _ = _CIFAR_LAYOUT[name]
    data_dir = Path(data_dir)
    files = cifar_files(name, data_dir)
    if download and not all(f.is_file() for f in files):
        _download_cifar(name, data_dir)
    missing = [f for f in files if not f.is_file()]
    if missing:
        where = (data_dir / folder).resolve()
        raise FileNotFoundError(
            f"{name} needs the python version of {_CIFAR_LAYOUT[name][5]} in {where}/ "
            f"(files {', '.join(f.name for f in files)}); missing: {', '.join(f.name for f in missing)}. "
            f"Download the python version from {CIFAR_URL} and extract it into {data_dir.resolve()}/, "
            f"or pass --download (uses torchvision)"
        )
    parts = [_read_cifar_pickle(f, label_key) for f in files]
    n_train = len(train_files)
    x_train = np.concatenate([p[0] for p in parts[:n_train]])
    y_train = np.concatenate([p[1] for p in parts[:n_train]])
    x_test = np.concatenate([p[0] for p in parts[n_train:]])
    y_test = np.concatenate([p[1] for p in parts[n_train:]])
    for split, y in (("training", y_train), ("test", y_test)):
        if y.min() < 0 or y.max() >= num_classes or np.unique(y).size != num_classes:
            raise ValueError(f"{name}: the {split} labels must cover the classes 0..{num_classes - 1}")
    sizes = np.bincount(y_train, minlength=num_classes)
    counts = long_tail_counts(int(sizes.min()), num_classes, imb_factor)
    if counts[-1] < 1:
        raise ValueError(
            f"imb_factor={imb_factor} leaves class {num_classes - 1} without training samples "
            f"(largest class keeps {int(sizes.min())}); use imb_factor <= {int(sizes.min())}"
        )
    rng = np.random.default_rng(CIFAR_SUBSET_SEED)
    keep = np.concatenate(
        [np.sort(rng.permutation(np.flatnonzero(y_train == c))[:n]) for c, n in enumerate(counts)]
    )
    return (
        torch.from_numpy(np.ascontiguousarray(x_train[keep])),
        torch.from_numpy(y_train[keep]),
        torch.from_numpy(np.ascontiguousarray(x_test)),
        torch.from_numpy(y_test),
    )


# ---- augmentation -------------------------------------------------------------------------------


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """The standard CIFAR augmentation with torch ops: a random ``H x W`` crop of the
    image zero-padded by ``padding`` on every side, then a horizontal flip with
    probability 1/2, independently per image of the batch ``(B, C, H, W)``.

    The random draws come from ``generator`` (a CPU generator, so runs are
    reproducible across devices); the crop and the flip are one gather on the
    images' device.
    """
    b, c, h, w = images.shape
    dev = images.device
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    flip = torch.randint(0, 2, (b,), generator=generator).bool()
    rows = offsets[0, :, None] + torch.arange(h)
    cols = offsets[1, :, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
    padded = F.pad(images, (padding, padding, padding, padding))
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows.to(dev)[:, None, :, None],
        cols.to(dev)[:, None, None, :],
    ]


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images ``(B, C, H, W)`` to float32 ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=images.device)[:, None, None]
    return (images.to(torch.float32) / 255 - m) / s


# ---- one entry point -----------------------------------------------------------------------------


@dataclass
class LongTailData:
    """A long-tailed training split and a balanced test split, ready for training.

    ``x_*`` are float features ``(N, d)`` or, for CIFAR, uint8 images
    ``(N, 3, 32, 32)`` that :meth:`train_inputs` augments and normalises per batch.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None  # per channel; images only
    std: tuple[float, ...] | None = None
    augment: bool = False

    @property
    def images(self) -> bool:
        return self.x_train.dtype == torch.uint8

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.y_train, minlength=self.num_classes).tolist()

    def to(self, device: torch.device) -> LongTailData:
        self.x_train, self.y_train = self.x_train.to(device), self.y_train.to(device)
        self.x_test, self.y_test = self.x_test.to(device), self.y_test.to(device)
        return self

    def train_inputs(self, idx: Tensor, generator: torch.Generator) -> Tensor:
        x = self.x_train[idx]
        if not self.images:
            return x
        if self.augment:
            x = random_crop_flip(x, generator)
        return normalize_images(x, self.mean, self.std)

    def test_inputs(self, start: int, stop: int) -> Tensor:
        x = self.x_test[start:stop]
        return normalize_images(x, self.mean, self.std) if self.images else x


def load_dataset(
    name: str,
    imb_factor: float,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    data_dir: str | Path = "data",
    download: bool = False,
) -> LongTailData:
    """One of :data:`DATASETS`. ``seed`` draws the digits and MNIST-1D splits and the
    synthetic mixture; the CIFAR subset is fixed (see :func:`cifar_lt`). ``num_classes``
    is for ``synthetic-lt`` only. ``data_dir`` holds the CIFAR files and the MNIST-1D
    cache (``data_dir/mnist1d``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    return DATASETS[name](name, imb_factor, seed, num_classes, data_dir, download)


def _digits(name, imb_factor, seed, num_classes, data_dir, download) -> LongTailData:
    return LongTailData(name, *digits_lt(imb_factor, seed=seed), num_classes=10)


def _mnist1d(name, imb_factor, seed, num_classes, data_dir, download) -> LongTailData:
    tensors = mnist1d_lt(imb_factor, seed=seed, cache_dir=Path(data_dir) / MNIST1D_CACHE)
    return LongTailData(name, *tensors, num_classes=10)


def _synthetic(name, imb_factor, seed, num_classes, data_dir, download) -> LongTailData:
    classes = 10 if num_classes is None else num_classes
    return LongTailData(name, *synthetic_lt(classes, imb_factor, seed=seed), num_classes=classes)


def _cifar(name, imb_factor, seed, num_classes, data_dir, download) -> LongTailData:
    mean, std = CIFAR_STATS[name]
    tensors = cifar_lt(name, data_dir, imb_factor, download)
    return LongTailData(name, *tensors, _CIFAR_LAYOUT[name][4], mean=mean, std=std, augment=True)


# The --dataset choices: name -> load(name, imb_factor, seed, num_classes, data_dir, download)
DATASETS = {
    "digits-lt": _digits,
    "mnist1d-lt": _mnist1d,
    "synthetic-lt": _synthetic,
    "cifar10-lt": _cifar,
    "cifar100-lt": _cifar,
}
IMAGE_DATASETS = tuple(_CIFAR_LAYOUT)  # 3x32x32 images; the others are feature vectors
SIGNAL_DATASETS = ("mnist1d-lt",)  # feature vectors that are 1-D signals (for the 1-D CNN)
