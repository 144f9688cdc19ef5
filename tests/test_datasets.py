"""agop.datasets: the real files, the on-disk formats written here by hand, and the safety rules."""

from __future__ import annotations

import gzip
import os
import pickle
import pickletools
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from agop import datasets
from agop.datasets import DatasetNotFoundError, UnsafePickleError, describe, load, load_labels

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_TRAIN_COUNTS = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]
CIFAR_TEST_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# ----------------------------------------------------------------------------- helpers
def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
              gz: bool = False) -> tuple[Path, Path]:
    """IDX files written from the format's definition (big-endian magic and sizes, then bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = (struct.pack(">IIII", 2051, *images.shape) + images.astype(np.uint8).tobytes(),
             struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())
    paths = []
    for base, blob in zip(IDX_NAMES[split], blobs):
        path = folder / (base + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(blob) if gz else blob)
        paths.append(path)
    return paths[0], paths[1]


def small_mnist(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n)


def cifar_folder(root: Path) -> Path:
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _Payload:
    """Unpickling this runs a shell command: the classic pickle attack."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvalPayload:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def mnist_train(data_root):
    return load("mnist", "train", root=data_root)


def test_mnist_train_counts_and_mean_pixel(mnist_train):
    d = mnist_train
    assert d.X.shape == (60_000, 784) and d.X.dtype == np.float32 and d.y.dtype == np.int64
    assert np.bincount(d.y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert 0.0 <= d.X.min() and d.X.max() == 1.0
    # The README's 33.318 is the mean pixel on the 0..255 scale.
    assert np.mean(d.X, dtype=np.float64) * 255 == pytest.approx(33.318, abs=5e-4)
    assert d.image_shape == (1, 28, 28) and d.num_classes == 10 and d.classes[3] == "3"
    assert d.source == Path(d.source) and d.source.name == "mnist"


def test_mnist_test_counts(data_root):
    d = load("mnist", "test", root=data_root)
    assert np.bincount(d.y, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_mnist_first_n_is_file_order(data_root, mnist_train):
    d = load("mnist", n=123, root=data_root)
    np.testing.assert_array_equal(d.X, mnist_train.X[:123])
    np.testing.assert_array_equal(d.y, mnist_train.y[:123])


def test_cifar_first_labels_and_first_pixel_channel_major(data_root):
    d = load("cifar10", "train", root=data_root)
    assert d.X.shape == (10_000, 3072) and d.image_shape == (3, 32, 32)
    assert d.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert np.bincount(d.y, minlength=10).tolist() == CIFAR_TRAIN_COUNTS
    # Channel-major: R of pixel (0, 0) at 0, G at 32*32, B at 2*32*32.
    rgb = d.X[0, [0, 1024, 2048]]
    np.testing.assert_array_equal(rgb, np.array([59, 62, 63], np.float32) / np.float32(255))
    np.testing.assert_array_equal(d.X[0].reshape(3, 32, 32)[:, 0, 0], rgb)
    assert d.classes[6] == "frog"


def test_cifar_test_batch_counts(data_root):
    d = load("cifar10", "test", root=data_root)
    assert len(d) == 1000
    assert np.bincount(d.y, minlength=10).tolist() == CIFAR_TEST_COUNTS


def test_describe_real_root(data_root):
    text = describe(root=data_root)
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split() and line.split()[0] in datasets.DATASETS}
    assert rows["mnist"][1:4] == ["found", "60,000", "10,000"]
    assert rows["cifar10"][1:4] == ["found", "10,000", "1,000"]
    assert rows["digits"][1] == "found"
    for name, folder in (("svhn", "svhn"), ("fashion-mnist", "fashion-mnist")):
        assert rows[name][1] == "missing"
        assert rows[name][-1] == str(data_root / folder)
    assert "train_32x32.mat" in text and "t10k-images-idx3-ubyte" in text


def test_cli_datasets_prints_table(data_root, capsys):
    from agop.cli import main

    assert main(["datasets", "--root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert f"data root: {data_root}" in out and "60,000" in out and "missing" in out


# ----------------------------------------------------------------------------- digits
def test_digits_split_covers_sklearn_exactly_without_files(tmp_path):
    from sklearn.datasets import load_digits

    ref = load_digits()
    train = load("digits", root=tmp_path / "nothing-here")
    test = load(datasets.DEFAULT_DATASET, "test", root=tmp_path / "nothing-here")
    assert len(train) + len(test) == 1797 and len(train) == datasets.DIGITS_TRAIN
    np.testing.assert_array_equal(np.concatenate([train.X, test.X]), ref.data / 16)
    np.testing.assert_array_equal(np.concatenate([train.y, test.y]), ref.target)
    assert train.num_classes == 10 and set(train.y.tolist()) == set(range(10))
    assert train.image_shape == (1, 8, 8) and train.source is None and train.X.max() == 1.0


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [False, True])
def test_idx_loads_gzipped_and_plain(tmp_path, gz):
    images, labels = small_mnist()
    write_idx(tmp_path / "fashion-mnist", "test", images, labels, gz=gz)
    d = load("fashion-mnist", "test", root=tmp_path)
    np.testing.assert_array_equal(d.X, images.reshape(40, -1).astype(np.float32) / 255)
    np.testing.assert_array_equal(d.y, labels)
    assert d.classes[9] == "Ankle boot"


def test_idx_gz_content_with_plain_name_is_read(tmp_path):
    # Browsers often gunzip on download but keep ".gz", or the reverse: judge by content.
    images, labels = small_mnist()
    img, lab = write_idx(tmp_path / "mnist", "train", images, labels, gz=True)
    img.rename(img.with_suffix(""))
    np.testing.assert_array_equal(load("mnist", root=tmp_path).y, labels)


@pytest.mark.parametrize("damage, message", [
    ("magic", "magic number"),
    ("truncate", "truncated"),
    ("truncate_gz", "truncated"),
    ("count", "labels"),
    ("label", "outside 0..9"),
    ("size", "28x28"),
])
def test_idx_corrupt_files_raise_clear_errors(tmp_path, damage, message):
    images, labels = small_mnist()
    if damage == "count":
        labels = labels[:-1]
    if damage == "label":
        labels = labels.copy()
        labels[5] = 12
    if damage == "size":
        images = images[:, :20, :20]
    img, _ = write_idx(tmp_path / "mnist", "train", images, labels, gz=damage == "truncate_gz")
    raw = img.read_bytes()
    if damage == "magic":
        img.write_bytes(struct.pack(">I", 2049) + raw[4:])
    if damage in ("truncate", "truncate_gz"):
        img.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match=message) as info:
        load("mnist", root=tmp_path)
    assert "mnist" in str(info.value)


# ----------------------------------------------------------------------------- n / balanced
def test_n_and_balanced_select_as_documented(tmp_path):
    images, labels = small_mnist(n=200, seed=1)
    write_idx(tmp_path / "mnist", "train", images, labels)
    full = load("mnist", root=tmp_path)
    first = load("mnist", n=7, root=tmp_path)
    np.testing.assert_array_equal(first.y, labels[:7])
    np.testing.assert_array_equal(first.X, full.X[:7])

    bal = load("mnist", n=30, balanced=True, root=tmp_path)
    # Independent rule: walk the file, keep a point while its class has fewer than 3 kept.
    kept, seen = [], {}
    for i, c in enumerate(labels):
        if seen.get(c, 0) < 3:
            kept.append(i)
            seen[c] = seen.get(c, 0) + 1
    np.testing.assert_array_equal(bal.y, labels[kept])
    np.testing.assert_array_equal(bal.X, full.X[kept])
    assert np.bincount(bal.y, minlength=10).tolist() == [3] * 10


def test_n_and_balanced_errors(tmp_path):
    images, labels = small_mnist(n=50, seed=2)
    labels = np.where(labels == 4, 5, labels)  # class 4 absent
    write_idx(tmp_path / "mnist", "train", images, labels)
    with pytest.raises(ValueError, match="only 50 points"):
        load("mnist", n=51, root=tmp_path)
    with pytest.raises(ValueError, match="divisible by K = 10"):
        load("mnist", n=15, balanced=True, root=tmp_path)
    with pytest.raises(ValueError, match="class 4"):
        load("mnist", n=10, balanced=True, root=tmp_path)
    with pytest.raises(ValueError, match="needs n"):
        load("mnist", balanced=True, root=tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="imagenet"), "known: digits, mnist, fashion-mnist, cifar10, svhn"),
    (dict(name="digits", split="validation"), "split must be one of"),
    (dict(name="digits", n=0), "n must be an integer"),
    (dict(name="digits", n=2.5), "n must be an integer"),
    (dict(name="digits", balanced="yes"), "balanced must be"),
])
def test_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load(**kwargs)


# ----------------------------------------------------------------------------- missing data
@pytest.mark.parametrize("name, split, expected", [
    ("mnist", "train", "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]"),
    ("fashion-mnist", "test", "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"),
    ("cifar10", "train", "data_batch_1 ... data_batch_5"),
    ("cifar10", "test", "test_batch"),
    ("svhn", "test", "test_32x32.mat"),
])
def test_missing_root_names_files_and_folder(tmp_path, name, split, expected):
    root = tmp_path / "absent"
    with pytest.raises(DatasetNotFoundError) as info:
        load(name, split, root=root)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert f"expected: {expected}" in msg
    assert f"searched: {root / datasets.DATASETS[name].folder}" in msg
    assert "does not exist" in msg


def test_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("AGOP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert datasets.resolve_root() == tmp_path / "env"
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "env" / "svhn")):
        load("svhn")
    monkeypatch.delenv("AGOP_DATA")
    assert datasets.resolve_root() == tmp_path / "home" / ".cache" / "agop"


def test_download_without_torchvision_says_how_to_place_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    with pytest.raises(DatasetNotFoundError, match="pip install torchvision") as info:
        load("mnist", root=tmp_path, download=True)
    assert "train-images-idx3-ubyte" in str(info.value)


def test_download_moves_torchvision_files_into_layout(tmp_path, monkeypatch):
    images, labels = small_mnist(n=20)

    class MNIST:  # stands in for torchvision's: writes <root>/MNIST/raw/*.gz
        def __init__(self, root, train=True, download=False):
            raw = Path(root) / "MNIST" / "raw"
            write_idx(raw, "train", images, labels, gz=True)
            write_idx(raw, "test", images[:5], labels[:5], gz=True)

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(MNIST=MNIST)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake.datasets)
    d = load("mnist", root=tmp_path, download=True)
    np.testing.assert_array_equal(d.y, labels)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(
        base + ".gz" for split in IDX_NAMES.values() for base in split)


# ----------------------------------------------------------------------------- SVHN
def test_svhn_official_layout(tmp_path):
    rng = np.random.default_rng(3)
    n = 6
    X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as in the file
    y = np.array([[10], [1], [2], [10], [9], [5]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "train_32x32.mat", {"X": X, "y": y})
    d = load("svhn", root=tmp_path)
    assert d.y.tolist() == [0, 1, 2, 0, 9, 5] and d.y.dtype == np.int64
    assert d.X.shape == (n, 3072) and d.image_shape == (3, 32, 32)
    for i, c, h, w in [(0, 0, 0, 0), (1, 1, 0, 0), (5, 2, 31, 7), (3, 1, 4, 30)]:
        assert d.X[i, c * 1024 + h * 32 + w] == np.float32(X[h, w, c, i]) / np.float32(255)
    assert "svhn           partial      6" in describe(root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="test_32x32.mat"):
        load("svhn", "test", root=tmp_path)


def test_svhn_bad_label_is_refused(tmp_path):
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat",
                     {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[3], [11]])})
    with pytest.raises(ValueError, match=r"labels must be 1..10.*y\[1\] = 11"):
        load("svhn", "test", root=tmp_path)


# ----------------------------------------------------------------------------- CIFAR pickles
def legit_batch(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5",
            b"labels": rng.integers(0, 10, size=n).tolist(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * n}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_legitimate_pickles_are_accepted(tmp_path, protocol):
    batch = legit_batch()
    blob = pickle.dumps(batch, protocol=protocol)
    if protocol == 2:  # Python 3 writes bytes in protocol 2 through _codecs.encode
        assert any(arg == "_codecs encode" for op, arg, _ in pickletools.genops(blob))
    (cifar_folder(tmp_path) / "data_batch_1").write_bytes(blob)
    d = load("cifar10", root=tmp_path)
    assert d.y.tolist() == batch[b"labels"]
    np.testing.assert_array_equal(d.X, batch[b"data"].astype(np.float32) / 255)


def test_python2_style_official_pickle_is_accepted(tmp_path):
    # The official files: cPickle protocol 2, str (here SHORT_BINSTRING/BINSTRING) for keys and
    # pixel bytes, numpy.core.multiarray._reconstruct; assembled opcode by opcode.
    def binstring(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    pixels = bytes(range(256)) * 12
    blob = (b"\x80\x02}(" + binstring(b"labels") + b"]K\x06a" + binstring(b"data")
            + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
            + binstring(b"b") + b"\x87R(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\n"
            + binstring(b"u1") + b"K\x00K\x01\x87R(K\x03" + binstring(b"|")
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
            + struct.pack("<I", len(pixels)) + pixels + b"tbu.")
    (cifar_folder(tmp_path) / "data_batch_1").write_bytes(blob)
    d = load("cifar10", root=tmp_path)
    assert d.y.tolist() == [6]
    np.testing.assert_array_equal(d.X[0] * 255, np.frombuffer(pixels, np.uint8))


def test_batches_concatenate_in_order(tmp_path):
    folder = cifar_folder(tmp_path)
    b1, b3 = legit_batch(3, seed=1), legit_batch(5, seed=3)
    (folder / "data_batch_3").write_bytes(pickle.dumps(b3, protocol=2))
    (folder / "data_batch_1").write_bytes(pickle.dumps(b1, protocol=4))
    d = load("cifar10", root=tmp_path)
    assert d.y.tolist() == b1[b"labels"] + b3[b"labels"]
    assert "data_batch_1, data_batch_3 only" in describe(root=tmp_path)


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    batch = {b"data": _Payload(f"touch {marker}"), b"labels": [0]}
    (cifar_folder(tmp_path) / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=rf"'{os.system.__module__}\.system'") as info:
        load("cifar10", root=tmp_path)
    assert "data_batch_1" in str(info.value) and "nothing from it was executed" in str(info.value)
    assert not marker.exists()
    # describe() reports the refusal instead of running it either.
    assert "ERROR" in describe(root=tmp_path) and not marker.exists()

    # The payload is live: a bare pickle.loads would have run it.
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Payload(f"touch {armed}"), protocol=protocol))
    assert armed.exists()


def test_other_forbidden_globals_are_refused(tmp_path):
    folder = cifar_folder(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _EvalPayload()}, protocol=4))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load("cifar10", "test", root=tmp_path)
    # An admitted global with an unexpected argument is refused too.
    blob = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00rot_13\x86R."
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(UnsafePickleError, match="rot_13"):
        load("cifar10", "test", root=tmp_path)


@pytest.mark.parametrize("content, message", [
    (pickle.dumps([1, 2, 3], protocol=4), "is a dict"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"\(N, 3072\)"),
    (pickle.dumps(legit_batch())[:-200], "truncated or corrupt"),
])
def test_malformed_batches_raise_value_error(tmp_path, content, message):
    (cifar_folder(tmp_path) / "data_batch_1").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load("cifar10", root=tmp_path)


def test_count_reads_sizes_from_headers(data_root, tmp_path):
    assert datasets.count("mnist", "train", data_root) == 60000
    assert datasets.count("mnist", "test", data_root) == 10000
    assert datasets.count("cifar10", "train", data_root) == 10000
    assert datasets.count("digits", "test") == 297
    assert datasets.count("svhn", "train", tmp_path) is None  # absent, not an error
    with pytest.raises(ValueError, match="split"):
        datasets.count("mnist", "val", data_root)


# ----------------------------------------------------------------------------- row ranges
def _idx_root(tmp_path: Path, gz: bool, n: int = 60, seed: int = 5) -> tuple[Path, np.ndarray]:
    images, _ = small_mnist(n=n, seed=seed)
    labels = np.random.default_rng(seed).permutation(np.arange(n) % 10)  # every class present
    write_idx(tmp_path / "mnist", "train", images, labels, gz=gz)
    return tmp_path, labels


@pytest.mark.parametrize("gz", [False, True])
def test_rows_are_the_slice_of_the_selection(tmp_path, gz):
    root, labels = _idx_root(tmp_path, gz)
    full = load("mnist", root=root)
    for n, rows in [(None, (0, 60)), (None, (17, 18)), (None, (59, 60)), (40, (0, 40)),
                    (40, (13, 29)), (1, (0, 1))]:
        ref = full.X[:n][rows[0]:rows[1]], full.y[:n][rows[0]:rows[1]]
        part = load("mnist", n=n, rows=rows, root=root)
        np.testing.assert_array_equal(part.X, ref[0])
        np.testing.assert_array_equal(part.y, ref[1])
        assert part.rows == rows and part.X.dtype == np.float32 and part.y.dtype == np.int64
        np.testing.assert_array_equal(load_labels("mnist", n=n, rows=rows, root=root), ref[1])
    balanced = load("mnist", n=20, balanced=True, root=root)
    part = load("mnist", n=20, balanced=True, rows=(5, 12), root=root)
    np.testing.assert_array_equal(part.X, balanced.X[5:12])
    np.testing.assert_array_equal(part.y, balanced.y[5:12])
    assert repr(part).endswith(", rows=(5, 12))") and "rows=" not in repr(balanced)


def test_ranks_rows_concatenate_to_the_single_process_load(tmp_path):
    from agop.distributed import row_range

    root, _ = _idx_root(tmp_path, gz=True, n=37)
    full = load("mnist", n=31, root=root)
    for world in (1, 2, 3, 4):
        parts = [load("mnist", n=31, root=root, rows=row_range(31, r, world))
                 for r in range(world)]
        np.testing.assert_array_equal(np.concatenate([p.X for p in parts]), full.X)
        np.testing.assert_array_equal(np.concatenate([p.y for p in parts]), full.y)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_rows_read_only_their_span_and_labels_read_no_pixels(tmp_path, monkeypatch, gz):
    root, labels = _idx_root(tmp_path, gz)
    calls = []
    real = datasets._read_maybe_gzip

    def spy(path, nbytes=None, offset=0):
        calls.append((Path(path).name, nbytes, offset))
        return real(path, nbytes, offset)

    monkeypatch.setattr(datasets, "_read_maybe_gzip", spy)
    load("mnist", rows=(10, 14), root=root)
    image = "train-images-idx3-ubyte" + (".gz" if gz else "")
    assert [c for c in calls if c[0] == image] == [(image, 16, 0), (image, 4 * 784, 16 + 10 * 784)]
    calls.clear()
    np.testing.assert_array_equal(load_labels("mnist", root=root), labels)
    assert [c for c in calls if c[0] == image] == [(image, 16, 0)]  # the header only


def test_idx_rows_still_refuse_a_truncated_images_file(tmp_path):
    for gz in (False, True):
        root, _ = _idx_root(tmp_path / str(gz), gz)
        img = root / "mnist" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
        img.write_bytes(img.read_bytes()[:-100])
        with pytest.raises(ValueError, match="truncated"):
            load("mnist", rows=(0, 2), root=root)


def test_cifar_rows_stop_at_the_last_batch_needed(tmp_path):
    folder = cifar_folder(tmp_path)
    batches = [legit_batch(4, seed=s) for s in (1, 2)]
    for i, b in enumerate(batches, start=1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(b, protocol=4))
    full = load("cifar10", root=tmp_path)
    assert len(full) == 8
    for n, rows in [(None, (2, 7)), (None, (4, 8)), (6, (1, 6)), (8, (0, 3))]:
        part = load("cifar10", n=n, rows=rows, root=tmp_path)
        np.testing.assert_array_equal(part.X, full.X[:n][rows[0]:rows[1]])
        np.testing.assert_array_equal(part.y, full.y[:n][rows[0]:rows[1]])
    np.testing.assert_array_equal(load_labels("cifar10", root=tmp_path), full.y)
    # A damaged third batch is never opened for rows that end in the first two.
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    np.testing.assert_array_equal(load("cifar10", rows=(3, 6), root=tmp_path).X, full.X[3:6])
    np.testing.assert_array_equal(load_labels("cifar10", n=5, root=tmp_path), full.y[:5])
    with pytest.raises(ValueError, match="data_batch_3"):
        load("cifar10", rows=(3, 9), root=tmp_path)


def test_svhn_and_digits_rows_and_labels(tmp_path):
    rng = np.random.default_rng(4)
    X = rng.integers(0, 256, size=(32, 32, 3, 7), dtype=np.uint8)
    y = rng.integers(1, 11, size=(7, 1)).astype(np.uint8)
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "train_32x32.mat", {"X": X, "y": y})
    full = load("svhn", root=tmp_path)
    part = load("svhn", rows=(2, 5), root=tmp_path)
    np.testing.assert_array_equal(part.X, full.X[2:5])
    np.testing.assert_array_equal(part.y, full.y[2:5])
    np.testing.assert_array_equal(load_labels("svhn", root=tmp_path), y.reshape(-1) % 10)

    digits = load("digits", "test")
    np.testing.assert_array_equal(load("digits", "test", n=200, rows=(150, 200)).X,
                                  digits.X[150:200])
    np.testing.assert_array_equal(load_labels("digits", "test"), digits.y)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rows=(5, 5)), r"rows = \(5, 5\) is not a range of rows; need 0 ≤ start < stop$"),
    (dict(rows=(3, 2)), r"rows = \(3, 2\) is not a range"),
    (dict(rows=(-1, 2)), r"rows = \(-1, 2\) is not a range"),
    (dict(rows=(0, 1.5)), r"rows must be a \(start, stop\) pair of integers; got \(0, 1.5\)"),
    (dict(rows=(0, 1, 2)), "rows must be a .start, stop. pair"),
    (dict(rows="0:5"), "rows must be a .start, stop. pair"),
    (dict(rows=(True, 3)), "rows must be a .start, stop. pair"),
    (dict(rows=(0, 1501)), r"rows = \(0, 1501\) but only 1,500 points are selected from digits "
                           r"train; need 0 ≤ start < stop ≤ 1500$"),
    (dict(n=100, rows=(90, 101)), r"only 100 points are selected"),
    (dict(n=100, balanced=True, rows=(0, 101)), r"only 100 points are selected"),
])
def test_bad_rows_are_one_line_errors(kwargs, message):
    for fn in (load, load_labels):
        with pytest.raises(ValueError, match=message) as info:
            fn("digits", **kwargs)
        assert "\n" not in str(info.value)


def test_real_mnist_and_cifar_rows(data_root, mnist_train):
    part = load("mnist", rows=(59_990, 60_000), root=data_root)
    np.testing.assert_array_equal(part.X, mnist_train.X[59_990:])
    np.testing.assert_array_equal(load_labels("mnist", root=data_root), mnist_train.y)
    np.testing.assert_array_equal(load_labels("mnist", n=5000, rows=(2500, 5000),
                                              root=data_root), mnist_train.y[2500:5000])
    cifar = load("cifar10", n=3000, rows=(1000, 3000), root=data_root)
    assert cifar.y[:3].tolist() == load_labels("cifar10", root=data_root)[1000:1003].tolist()
    np.testing.assert_array_equal(cifar.X, load("cifar10", n=3000, root=data_root).X[1000:])
