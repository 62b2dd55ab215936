"""Unit tests for elfish_mpi.data on real data samples (tests/data/)."""

from __future__ import annotations

import gzip
import io
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from elfish_mpi import data
from elfish_mpi.data import DataError

TESTS = pathlib.Path(__file__).resolve().parents[1]
FMNIST = TESTS / "data" / "fashion-mnist"
FEMNIST = TESTS / "data" / "femnist_sample.npz"
SHARED = TESTS.parents[1] / "shared" / "datasets"
CIFAR_JPEG = SHARED / "cifar10_jpeg.npz"


@pytest.fixture(scope="module")
def fm_train() -> data.Split:
    return data.load_split("fashion-mnist", str(FMNIST), "train")


@pytest.fixture(scope="module")
def femnist_train() -> data.Split:
    return data.load_split("femnist", str(FEMNIST), "train")


def _copy_sample(tmp_path: pathlib.Path) -> pathlib.Path:
    dst = tmp_path / "fm"
    shutil.copytree(FMNIST, dst)
    return dst


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------- IDX


def test_idx_sample_train_and_test(fm_train):
    # Prepare / Execute
    test = data.load_split("fashion-mnist", str(FMNIST), "test")

    # Assert
    assert fm_train.images.shape == (3000, 1, 28, 28)
    assert fm_train.images.dtype == np.uint8
    assert fm_train.labels.shape == (3000,) and fm_train.labels.dtype == np.int64
    assert fm_train.num_classes == 10 and fm_train.groups is None
    assert set(np.unique(fm_train.labels)) == set(range(10))
    assert fm_train.labels[0] == 9  # first Fashion-MNIST training image: ankle boot
    assert list(test.labels[:5]) == [9, 2, 1, 1, 6]
    assert test.images.shape == (1000, 1, 28, 28)
    assert fm_train.images.max() == 255 and fm_train.images.min() == 0


def test_idx_headers_are_official():
    # Prepare
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz", "rb") as f:
        head = f.read(16)
    with gzip.open(FMNIST / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        lhead = f.read(8)

    # Assert
    assert int.from_bytes(head[:4], "big") == 0x00000803
    assert [int.from_bytes(head[i : i + 4], "big") for i in (4, 8, 12)] == [3000, 28, 28]
    assert int.from_bytes(lhead[:4], "big") == 0x00000801
    assert int.from_bytes(lhead[4:8], "big") == 1000


def test_idx_raw_uncompressed_matches_gzip(tmp_path, fm_train):
    # Prepare: the same files, decompressed, under their raw names
    for gz in FMNIST.glob("*.gz"):
        (tmp_path / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))

    # Execute
    raw = data.load_split("mnist", str(tmp_path), "train")

    # Assert
    np.testing.assert_array_equal(raw.images, fm_train.images)
    np.testing.assert_array_equal(raw.labels, fm_train.labels)


def test_idx_bad_magic_raises(tmp_path):
    # Prepare: flip the type byte of the image file's magic (0x0803 -> 0x0903)
    d = _copy_sample(tmp_path)
    f = d / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[2] = 0x09
    f.write_bytes(gzip.compress(bytes(raw), compresslevel=1))

    # Execute / Assert
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        data.load_split("fashion-mnist", str(d))


def test_idx_labels_magic_on_images_raises(tmp_path):
    # Prepare: an image file where the label file should be
    d = _copy_sample(tmp_path)
    shutil.copy(d / "t10k-images-idx3-ubyte.gz", d / "t10k-labels-idx1-ubyte.gz")

    # Execute / Assert
    with pytest.raises(DataError, match=r"t10k-labels.*0x00000803"):
        data.load_split("fashion-mnist", str(d), "test")


def test_idx_truncated_raises(tmp_path):
    # Prepare: drop the last 100 bytes of image data
    d = _copy_sample(tmp_path)
    f = d / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-100], compresslevel=1))

    # Execute / Assert
    with pytest.raises(DataError, match=r"t10k-images.*truncated"):
        data.load_split("fashion-mnist", str(d), "test")


def test_idx_truncated_gzip_stream_raises(tmp_path):
    # Prepare: cut the compressed stream itself in half
    d = _copy_sample(tmp_path)
    f = d / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    # Execute / Assert
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        data.load_split("fashion-mnist", str(d), "test")


def test_idx_count_mismatch_raises(tmp_path):
    # Prepare: keep only 999 of the 1000 test labels
    d = _copy_sample(tmp_path)
    labels = data.read_idx(d / "t10k-labels-idx1-ubyte.gz")
    data.write_idx(d / "t10k-labels-idx1-ubyte.gz", labels[:999])

    # Execute / Assert
    with pytest.raises(DataError, match=r"1000 images.*999 labels"):
        data.load_split("fashion-mnist", str(d), "test")


def test_idx_directory_without_files_raises(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        data.load_split("fashion-mnist", str(tmp_path))


# --------------------------------------------------------------------------- paths


def test_missing_explicit_path_raises(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        data.load_split("fashion-mnist", str(missing))


def test_missing_data_lists_places_tried(tmp_path, monkeypatch):
    # Prepare: empty env dir, home and working directory
    env = tmp_path / "env"
    env.mkdir()
    cwd = tmp_path / "work" / "proj"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("ELFISH_DATA", str(env))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(cwd)

    # Execute
    with pytest.raises(DataError) as err:
        data.resolve_path("femnist")

    # Assert: every place is named
    msg = str(err.value)
    assert str(env / "femnist") in msg and str(env / "femnist.npz") in msg
    assert "/usr/share/datasets/femnist" in msg
    assert str(tmp_path / "home" / ".cache" / "elfish-mpi" / "femnist") in msg
    assert str(tmp_path / "work" / "shared" / "datasets" / "femnist.npz") in msg


def test_elfish_data_env_is_used(tmp_path, monkeypatch, fm_train):
    # Prepare
    shutil.copytree(FMNIST, tmp_path / "fashion-mnist")
    monkeypatch.setenv("ELFISH_DATA", str(tmp_path))

    # Execute
    p = data.resolve_path("fashion-mnist")
    s = data.load_split("fashion-mnist")

    # Assert
    assert p == tmp_path / "fashion-mnist"
    np.testing.assert_array_equal(s.labels, fm_train.labels)


def test_shared_datasets_relative_to_cwd(tmp_path, monkeypatch):
    # Prepare: <tmp>/shared/datasets/femnist.npz seen from <tmp>/proj
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    shutil.copy(FEMNIST, tmp_path / "shared" / "datasets" / "femnist.npz")
    (tmp_path / "proj").mkdir()
    monkeypatch.delenv("ELFISH_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "proj")

    # Execute / Assert
    assert data.resolve_path("femnist") == tmp_path / "shared" / "datasets" / "femnist.npz"


def test_unknown_dataset_and_split_raise():
    with pytest.raises(DataError, match="cifar10"):
        data.load_split("imagenet", str(FMNIST))
    with pytest.raises(DataError, match="split"):
        data.load_split("fashion-mnist", str(FMNIST), "valid")


# --------------------------------------------------------------------------- npz


def test_keras_npz_round_trip(tmp_path, fm_train):
    # Prepare: Keras layout (N, H, W) uint8 from the real sample
    test = data.load_split("fashion-mnist", str(FMNIST), "test")
    f = tmp_path / "fm.npz"
    np.savez(f, x_train=fm_train.images[:500, 0], y_train=fm_train.labels[:500].astype(np.uint8),
             x_test=test.images[:200, 0], y_test=test.labels[:200].astype(np.uint8))

    # Execute
    tr = data.load_split("fashion-mnist", str(f), "train")
    te = data.load_test_data("mnist", str(f), max_samples=50)

    # Assert
    np.testing.assert_array_equal(tr.images, fm_train.images[:500])
    np.testing.assert_array_equal(tr.labels, fm_train.labels[:500])
    assert tr.labels.dtype == np.int64 and tr.num_classes == 10
    np.testing.assert_array_equal(te.images, test.images[:50])


def test_generic_npz_nhwc_and_class_count(tmp_path, fm_train):
    # Prepare: (N, H, W, 1) images, labels 0..3 only
    keep = np.flatnonzero(fm_train.labels < 4)[:300]
    x = fm_train.images[keep].transpose(0, 2, 3, 1)
    f = tmp_path / "four.npz"
    np.savez_compressed(f, x_train=x, y_train=fm_train.labels[keep], x_test=x[:10],
                        y_test=fm_train.labels[keep][:10])

    # Execute
    s = data.load_split("npz", str(f), "test")

    # Assert
    assert s.num_classes == 4
    assert s.images.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(s.images, fm_train.images[keep][:10])


def test_npz_errors(tmp_path):
    # Prepare
    not_zip = tmp_path / "bad.npz"
    not_zip.write_bytes(b"this is not a zip archive")
    no_keys = tmp_path / "nokeys.npz"
    np.savez(no_keys, images=np.zeros((2, 28, 28), np.uint8))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1, np.uint8))

    # Execute / Assert
    with pytest.raises(DataError, match="bad.npz"):
        data.load_split("npz", str(not_zip))
    with pytest.raises(DataError, match=r"nokeys.npz.*x_train.*images"):
        data.load_split("mnist", str(no_keys))
    with pytest.raises(DataError, match="pickled.npz"):
        data.load_split("npz", str(pickled))
    with pytest.raises(DataError, match="explicit path"):
        data.load_split("npz")


# --------------------------------------------------------------------------- FEMNIST


def test_femnist_sample_npz(femnist_train):
    # Prepare / Execute
    te = data.load_split("femnist", str(FEMNIST), "test")

    # Assert
    assert femnist_train.num_classes == 62
    assert femnist_train.images.shape[1:] == (1, 28, 28)
    assert femnist_train.groups is not None and femnist_train.groups.dtype == np.int64
    assert set(np.unique(femnist_train.groups)) == set(range(12))
    assert te.groups is not None and set(np.unique(te.groups)) <= set(range(12))
    assert femnist_train.labels.max() < 62


def test_leaf_json_directory(tmp_path, femnist_train):
    # Prepare: 3 real writers in LEAF format (1.0 = white background), 2 train files
    src = femnist_train
    users = {"f0100_b": 5, "f0007_a": 0, "f0050_c": 3}  # user name -> writer in the sample
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    expect = {}
    for k, (fname, chunk) in enumerate((("a.json", ["f0100_b"]), ("b.json", ["f0007_a", "f0050_c"]))):
        doc = {"users": chunk, "num_samples": [], "user_data": {}}
        for u in chunk:
            sel = np.flatnonzero(src.groups == users[u])[:6]
            x = 1.0 - src.images[sel, 0].reshape(len(sel), -1) / 255.0
            doc["user_data"][u] = {"x": x.tolist(), "y": src.labels[sel].tolist()}
            doc["num_samples"].append(len(sel))
            expect[u] = sel
        (tmp_path / "train" / fname).write_text(json.dumps(doc))
    sel = expect["f0050_c"][:2]
    test_doc = {"users": ["f0050_c"], "user_data": {"f0050_c": {
        "x": (1.0 - src.images[sel, 0].reshape(2, -1) / 255.0).tolist(),
        "y": src.labels[sel].tolist()}}}
    (tmp_path / "test" / "all.json").write_text(json.dumps(test_doc))

    # Execute
    tr = data.load_split("femnist", str(tmp_path), "train")
    te = data.load_split("femnist", str(tmp_path), "test")

    # Assert: files in name order, writers numbered in sorted user order
    order = ["f0100_b", "f0007_a", "f0050_c"]
    want_idx = np.concatenate([expect[u] for u in order])
    np.testing.assert_array_equal(tr.images, src.images[want_idx])
    np.testing.assert_array_equal(tr.labels, src.labels[want_idx])
    sorted_users = sorted(order)
    np.testing.assert_array_equal(
        tr.groups, np.repeat([sorted_users.index(u) for u in order], 6))
    assert tr.num_classes == 62
    np.testing.assert_array_equal(te.images, src.images[sel])
    np.testing.assert_array_equal(te.groups, [sorted_users.index("f0050_c")] * 2)


def test_leaf_json_bad_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "x.json").write_text('{"users": ["u"], "user_data": {"u": {"x": [[0.5, 0.5]], "y": [1]}}}')
    with pytest.raises(DataError, match=r"x.json.*784"):
        data.load_split("femnist", str(tmp_path))


# --------------------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar_real():
    """Three real CIFAR-10 test images (classes 0, 1, 2) as CHW uint8, with their JPEG bytes."""
    if not CIFAR_JPEG.exists():
        pytest.skip(f"{CIFAR_JPEG} not available")
    Image = pytest.importorskip("PIL.Image")
    with np.load(CIFAR_JPEG, allow_pickle=False) as z:
        y, off, blob = z["y_test"], z["offsets_test"], z["jpeg_test"]
    picks = [int(np.flatnonzero(y == c)[0]) for c in (0, 1, 2)]
    jpegs = [blob[off[i] : off[i + 1]].tobytes() for i in picks]
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).transpose(2, 0, 1)
                     for b in jpegs])
    return imgs, np.array([0, 1, 2], np.uint8), jpegs


def _write_cifar_batch(path, imgs, labels):
    recs = np.concatenate([labels[:, None], imgs.reshape(len(imgs), -1)], axis=1).astype(np.uint8)
    path.write_bytes(recs.tobytes())


def test_cifar_binary_batches(tmp_path, cifar_real):
    # Prepare: official layout, 3 records per batch
    imgs, labels, _ = cifar_real
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    for i in range(1, 6):
        r = np.roll(np.arange(3), i)
        _write_cifar_batch(root / f"data_batch_{i}.bin", imgs[r], labels[r])
    _write_cifar_batch(root / "test_batch.bin", imgs, labels)

    # Execute
    te = data.load_split("cifar10", str(tmp_path), "test")
    tr = data.load_split("cifar10", str(root), "train")
    w = data.load_worker_data("cifar10", str(tmp_path), 3, 1, "iid", seed=0)

    # Assert
    assert te.images.shape == (3, 3, 32, 32) and te.images.dtype == np.uint8
    np.testing.assert_array_equal(te.images, imgs)
    np.testing.assert_array_equal(te.labels, [0, 1, 2])
    assert tr.images.shape == (15, 3, 32, 32) and tr.num_classes == 10
    np.testing.assert_array_equal(tr.images[3:6], imgs[np.roll(np.arange(3), 2)])
    idx = data.partition(tr.labels, 3, "iid", seed=0)[1]
    np.testing.assert_array_equal(w.images, tr.images[idx])


def test_cifar_binary_errors(tmp_path, cifar_real):
    # Prepare
    imgs, labels, _ = cifar_real
    _write_cifar_batch(tmp_path / "data_batch_1.bin", imgs, labels)
    (tmp_path / "test_batch.bin").write_bytes((tmp_path / "data_batch_1.bin").read_bytes()[:-7])

    # Execute / Assert
    with pytest.raises(DataError, match="data_batch_2.bin"):
        data.load_split("cifar10", str(tmp_path), "train")
    with pytest.raises(DataError, match=r"test_batch.bin.*3073"):
        data.load_split("cifar10", str(tmp_path), "test")


def test_cifar_jpeg_npz(tmp_path, cifar_real):
    # Prepare: a 3-image npz in the shared JPEG layout
    imgs, labels, jpegs = cifar_real
    off = np.cumsum([0] + [len(b) for b in jpegs]).astype(np.int64)
    blob = np.frombuffer(b"".join(jpegs), np.uint8)
    f = tmp_path / "cifar10_jpeg.npz"
    np.savez(f, jpeg_train=blob, offsets_train=off, y_train=labels,
             jpeg_test=blob, offsets_test=off, y_test=labels, classes=np.array(["a", "b", "c"]))

    # Execute
    s = data.load_split("cifar10", str(f), "train")
    w = data.load_test_data("cifar10", str(f), max_samples=2)

    # Assert
    np.testing.assert_array_equal(s.images, imgs)
    np.testing.assert_array_equal(s.labels, [0, 1, 2])
    np.testing.assert_array_equal(w.images, imgs[data.test_rows(labels, 2)])  # (labels in class order: a fixed shuffle)


# --------------------------------------------------------------------------- normalize


def test_normalize(fm_train):
    x = fm_train.images[:64]
    y = data.normalize(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.min() == -1.0 and y.max() == 1.0
    np.testing.assert_allclose(y, (x / 255.0 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_array_equal(y, data.normalize(x))
    assert x.dtype == np.uint8  # input untouched


# --------------------------------------------------------------------------- partitions


def _check_disjoint_sorted(parts, n):
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    assert allidx.min() >= 0 and allidx.max() < n
    for p in parts:
        assert p.dtype == np.int64 and p.size >= 1
        assert np.all(np.diff(p) > 0)


def test_iid_partition(fm_train):
    # Execute
    a = data.partition(fm_train.labels, 7, "iid", seed=3)
    b = data.partition(fm_train.labels, 7, "iid", seed=3)
    c = data.partition(fm_train.labels, 7, "iid", seed=4)

    # Assert
    assert len(a) == 7
    _check_disjoint_sorted(a, 3000)
    np.testing.assert_array_equal(np.sort(np.concatenate(a)), np.arange(3000))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert max(map(len, a)) - min(map(len, a)) <= 1


@pytest.mark.parametrize("scheme", ["dirichlet", "shards"])
def test_partition_deterministic_and_seed_dependent(fm_train, scheme):
    a = data.partition(fm_train.labels, 10, scheme, seed=1, alpha=0.5)
    b = data.partition(fm_train.labels, 10, scheme, seed=1, alpha=0.5)
    c = data.partition(fm_train.labels, 10, scheme, seed=2, alpha=0.5)
    _check_disjoint_sorted(a, 3000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_small_alpha_is_more_skewed(fm_train):
    # Prepare
    labels = fm_train.labels

    # Execute
    skewed = data.partition(labels, 10, "dirichlet", seed=0, alpha=0.05)
    flat = data.partition(labels, 10, "dirichlet", seed=0, alpha=100.0)

    # Assert: label entropy per worker is lower under small alpha
    h_skew = np.mean([_entropy(np.bincount(labels[p], minlength=10)) for p in skewed])
    h_flat = np.mean([_entropy(np.bincount(labels[p], minlength=10)) for p in flat])
    assert h_flat > np.log(10) - 0.05
    assert h_skew < h_flat - 0.8
    np.testing.assert_array_equal(np.sort(np.concatenate(skewed)), np.arange(3000))


def test_dirichlet_every_worker_non_empty(fm_train):
    parts = data.partition(fm_train.labels[:200], 60, "dirichlet", seed=5, alpha=0.01)
    assert len(parts) == 60
    _check_disjoint_sorted(parts, 200)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(200))


def test_shards_give_few_classes(fm_train):
    # Execute: 20 shards of 150 on ~300 samples per class
    parts = data.partition(fm_train.labels, 10, "shards", seed=0, shards_per_worker=2)

    # Assert
    _check_disjoint_sorted(parts, 3000)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(3000))
    ncls = [len(np.unique(fm_train.labels[p])) for p in parts]
    assert max(ncls) <= 2 * 2
    assert np.mean(ncls) <= 3
    assert all(len(p) == 300 for p in parts)


def test_natural_keeps_writers_whole(femnist_train):
    # Execute
    g = femnist_train.groups
    parts = data.partition(femnist_train.labels, 5, "natural", seed=0, groups=g)
    again = data.partition(femnist_train.labels, 5, "natural", seed=0, groups=g)
    other = data.partition(femnist_train.labels, 5, "natural", seed=9, groups=g)

    # Assert
    _check_disjoint_sorted(parts, len(g))
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(g)))
    owners = {}
    for w, p in enumerate(parts):
        for writer in np.unique(g[p]):
            assert owners.setdefault(int(writer), w) == w
            assert np.array_equal(np.flatnonzero(g == writer), p[g[p] == writer])
    assert len(owners) == 12
    assert sorted(len(np.unique(g[p])) for p in parts) == [2, 2, 2, 3, 3]
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))
    assert not all(np.array_equal(x, y) for x, y in zip(parts, other))


def test_partition_errors(fm_train, femnist_train):
    with pytest.raises(DataError, match="natural partition needs a data set with writers"):
        data.partition(fm_train.labels, 4, "natural", seed=0)
    with pytest.raises(DataError, match=r"iid.*dirichlet.*shards.*natural"):
        data.partition(fm_train.labels, 4, "random", seed=0)
    with pytest.raises(DataError, match="12 writers for 13 clients"):
        data.partition(femnist_train.labels, 13, "natural", seed=0, groups=femnist_train.groups)
    with pytest.raises(DataError, match="only 5 training samples"):
        data.partition(fm_train.labels[:5], 6, "iid", seed=0)
    with pytest.raises(DataError, match="shards"):
        data.partition(fm_train.labels[:30], 10, "shards", seed=0, shards_per_worker=4)


# --------------------------------------------------------------------------- per worker


def test_load_worker_data_matches_partition(fm_train):
    # Prepare
    parts = data.partition(fm_train.labels, 4, "dirichlet", seed=7, alpha=0.3)

    # Execute
    w = data.load_worker_data("fashion-mnist", str(FMNIST), 4, 2, "dirichlet", 7, alpha=0.3)
    capped = data.load_worker_data("fashion-mnist", str(FMNIST), 4, 2, "dirichlet", 7,
                                   alpha=0.3, max_samples=10)

    # Assert
    np.testing.assert_array_equal(w.images, fm_train.images[parts[2]])
    np.testing.assert_array_equal(w.labels, fm_train.labels[parts[2]])
    np.testing.assert_array_equal(capped.labels, fm_train.labels[parts[2][:10]])
    assert capped.images.shape == (10, 1, 28, 28)
    with pytest.raises(DataError, match="worker_index"):
        data.load_worker_data("fashion-mnist", str(FMNIST), 4, 4, "iid", 0)


def test_load_worker_data_natural_femnist(femnist_train):
    parts = data.partition(femnist_train.labels, 3, "natural", seed=2, groups=femnist_train.groups)
    w = data.load_worker_data("femnist", str(FEMNIST), 3, 0, "natural", 2)
    np.testing.assert_array_equal(w.groups, femnist_train.groups[parts[0]])
    np.testing.assert_array_equal(w.images, femnist_train.images[parts[0]])
    assert w.num_classes == 62


def test_load_test_data_max_samples():
    s = data.load_test_data("fashion-mnist", str(FMNIST), max_samples=25)
    full = data.load_test_data("fashion-mnist", str(FMNIST))
    assert s.images.shape == (25, 1, 28, 28)
    np.testing.assert_array_equal(s.labels, full.labels[:25])
    assert len(full) == 1000


def test_explicit_directory_holding_the_npz(tmp_path):
    shutil.copy(FEMNIST, tmp_path / "femnist.npz")
    assert data.resolve_path("femnist", str(tmp_path)) == tmp_path / "femnist.npz"


def test_module_is_pure():
    # Prepare: load data.py on its own, without the package's __init__
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('d', {data.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['d'] = m\n"
        "spec.loader.exec_module(m)\n"
        "print(sorted(k for k in ('mpi4py', 'torch', 'PIL') if k in sys.modules), m.DATASETS)"
    )

    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    # Assert: no MPI, no torch, Pillow only when a JPEG is decoded
    assert out.stdout.startswith("[] ('fashion-mnist'")


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_rows_are_those_of_the_whole_file_without_holding_it(tmp_path, suffix):
    # Prepare: 3,000 images of 40x40 (4.8 MB: more than one 4 MiB block), every pixel its row
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3000, 40, 40), dtype=np.uint8)
    path = tmp_path / f"imgs{suffix}"
    data.write_idx(path, images)
    rows = np.array([2999, 0, 1500, 1500, 2621, 7])  # any order, repeats, both sides of a block edge
    # Execute / Assert
    np.testing.assert_array_equal(data.read_idx(path, rows=rows), images[rows])
    assert data.read_idx(path, rows=np.array([], dtype=np.int64)).shape == (0, 40, 40)
    with pytest.raises(DataError, match="rows 0..3000 asked of a file of 3000"):
        data.read_idx(path, rows=np.array([0, 3000]))
    cut = tmp_path / "cut"
    cut.write_bytes((tmp_path / "imgs").read_bytes()[:-100] if suffix == "" else gzip.decompress(path.read_bytes())[:-100])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(cut, rows=rows)


def test_a_subset_of_a_set_stored_in_class_order_keeps_every_class():
    from elfish_mpi.data import test_rows

    # Prepare: 10 classes of 100 images stored class by class, and the same labels shuffled
    ordered = np.repeat(np.arange(10), 100)
    shuffled = np.random.default_rng(0).permutation(ordered)
    # Execute
    rows, whole = test_rows(ordered, 200), test_rows(ordered, 0)
    # Assert: class-ordered: a fixed shuffle (every class in the subset and in each chunk of 100,
    # the whole set a permutation); otherwise the first 200 in file order, or all (None)
    assert len(set(rows.tolist())) == 200 and np.count_nonzero(np.bincount(ordered[rows], minlength=10)) == 10
    for chunk in (ordered[whole[:100]], ordered[whole[100:200]]):
        assert np.count_nonzero(np.bincount(chunk, minlength=10)) >= 8
    np.testing.assert_array_equal(np.sort(whole), np.arange(1000))
    np.testing.assert_array_equal(rows, whole[:200])  # the same order whatever the subset's size
    np.testing.assert_array_equal(test_rows(ordered, 200), rows)  # fixed: not from the run's seed
    np.testing.assert_array_equal(test_rows(shuffled, 200), np.arange(200))
    assert test_rows(shuffled, 0) is None and test_rows(shuffled, 1000) is None


def test_the_cifar10_npz_test_subset_holds_every_class():
    cifar = pathlib.Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cifar10_jpeg.npz"
    if not cifar.exists():
        pytest.skip(f"needs {cifar}")
    from elfish_mpi.data import load_test_data, load_worker_data

    test = load_test_data("cifar10", str(cifar), 200)
    counts = np.bincount(test.labels, minlength=10)
    assert counts.sum() == 200 and counts.min() >= 5 and np.count_nonzero(np.bincount(test.labels[:100], minlength=10)) == 10
    part = load_worker_data("cifar10", str(cifar), 2, 0, "iid", 0, max_samples=100)
    assert len(part.labels) == 100 and np.count_nonzero(np.bincount(part.labels, minlength=10)) == 10
