"""The image datasets of the paper, read from their standard on-disk files.

``load(name, split, n)`` returns a :class:`Dataset` with ``X`` (float32, N × D, pixels in [0, 1],
samples as rows) and ``y`` (int64, N). Images are flattened channel-major, C × H × W row-major,
the order of the CIFAR-10 files (1,024 red, then 1,024 green, then 1,024 blue values).
"The first n points" means file order, as in the paper (Appendix C: "the first 50,000 points").

Data root: the ``root`` argument, else ``$AGOP_DATA``, else ``~/.cache/agop``; one folder per
dataset below it (``DATASETS[name].folder``; the layout is in docs/datasets.md).
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import pickle
import shutil
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "Dataset",
    "DatasetInfo",
    "DatasetNotFoundError",
    "UnsafePickleError",
    "describe",
    "load",
    "resolve_root",
]

DEFAULT_DATASET = "digits"
SPLITS = ("train", "test")
DIGITS_TRAIN = 1500  # scikit-learn's digits ship as one set: train = first 1,500, test = last 297

_DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is and which files hold it.

    ``folder`` is relative to the data root (None: built in, no files). ``files[split]`` lists
    the file names a split needs; IDX files may also carry a ``.gz`` suffix, and CIFAR-10's
    train split takes whichever ``data_batch_*`` are present.
    """

    name: str
    folder: str | None
    files: dict[str, tuple[str, ...]]
    image_shape: tuple[int, int, int]
    classes: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("digits", None, {"train": (), "test": ()}, (1, 8, 8), _DIGIT_NAMES),
        DatasetInfo("mnist", "mnist",
                    {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                     "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
                    (1, 28, 28), _DIGIT_NAMES),
        DatasetInfo("fashion-mnist", "fashion-mnist",
                    {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                     "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
                    (1, 28, 28),
                    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot")),
        DatasetInfo("cifar10", "cifar10/cifar-10-batches-py",
                    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                     "test": ("test_batch",)},
                    (3, 32, 32),
                    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck")),
        DatasetInfo("svhn", "svhn",
                    {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
                    (3, 32, 32), _DIGIT_NAMES),
    )
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says which and where."""


class UnsafePickleError(ValueError):
    """A CIFAR-10 pickle asked for something other than numpy array reconstruction."""


@dataclass(eq=False)
class Dataset:
    """One split of an image dataset, samples as rows.

    ``X``: float32, N × D with D = C·H·W, pixels scaled to [0, 1], each image flattened
    channel-major (C × H × W, row-major). ``y``: int64, N, labels in 0..K−1 naming
    ``classes[y]``. ``source``: the folder read (None for the built-in digits).
    """

    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    image_shape: tuple[int, int, int]
    name: str
    split: str
    source: Path | None = field(default=None)

    @property
    def num_classes(self) -> int:
        """K, the number of classes of the dataset (even if ``y`` misses some)."""
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def __repr__(self) -> str:
        where = "built in" if self.source is None else str(self.source)
        return (f"Dataset({self.name!r}, split={self.split!r}, N={len(self)}, "
                f"D={self.X.shape[1]}, K={self.num_classes}, image_shape={self.image_shape}, "
                f"source={where!r})")


# ----------------------------------------------------------------------------- root
def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root``, else ``$AGOP_DATA``, else ``~/.cache/agop`` (``~`` expanded)."""
    return _root_and_origin(root)[0]


def _root_and_origin(root) -> tuple[Path, str]:
    if root is not None and str(root) != "":
        return Path(root).expanduser(), "root argument"
    env = os.environ.get("AGOP_DATA")
    if env:
        return Path(env).expanduser(), "$AGOP_DATA"
    return (Path("~/.cache/agop").expanduser(),
            "the default; set $AGOP_DATA or root= / --root to change it")


# ----------------------------------------------------------------------------- IDX (MNIST)
_IDX_MAGIC = {1: 2049, 3: 2051}  # labels, images: type 0x08 (unsigned byte) and the rank


def _idx_path(folder: Path, base: str) -> Path | None:
    # Uncompressed first: same content, faster to read (torchvision keeps both).
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_maybe_gzip(path: Path, nbytes: int | None = None) -> bytes:
    """The file's bytes, decompressed if it is gzip (judged by its magic bytes, not its name)."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if gz else f
            return stream.read() if nbytes is None else stream.read(nbytes)
    except (EOFError, gzip.BadGzipFile, OSError) as exc:
        raise ValueError(f"{path}: cannot read the file ({exc}); it is truncated or corrupt; "
                         "replace it with a fresh copy") from None


def _idx_shape(header: bytes, path: Path, rank: int) -> tuple[int, ...]:
    magic = _IDX_MAGIC[rank]
    size = 4 + 4 * rank
    if len(header) < size:
        raise ValueError(f"{path}: only {len(header)} bytes, shorter than the {size}-byte IDX "
                         "header; the file is truncated or not an IDX file")
    got = int.from_bytes(header[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: IDX magic number is {got} (0x{got:08x}); expected {magic} "
                         f"(0x{magic:08x}, unsigned bytes, rank {rank}); not an MNIST-style "
                         f"{'label' if rank == 1 else 'image'} file")
    return tuple(int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))


def _read_idx(path: Path, rank: int) -> np.ndarray:
    """A uint8 IDX file (gzipped or not) as an array of the shape its header states."""
    raw = _read_maybe_gzip(path)
    shape = _idx_shape(raw, path, rank)
    offset = 4 + 4 * rank
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: the IDX header says shape {shape} ({expected} data bytes) "
                         f"but the file holds {len(raw) - offset}; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _idx_paths(info: DatasetInfo, folder: Path, split: str) -> tuple[Path, Path] | None:
    paths = [_idx_path(folder, base) for base in info.files[split]]
    return None if None in paths else (paths[0], paths[1])


def _load_idx(info: DatasetInfo, folder: Path, split: str):
    paths = _idx_paths(info, folder, split)
    if paths is None:
        return None
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if images.shape[1:] != info.image_shape[1:]:
        raise ValueError(f"{paths[0]}: images are {images.shape[1]}x{images.shape[2]}; "
                         f"{info.name} images are {info.image_shape[1]}x{info.image_shape[2]}")
    if len(labels) != len(images):
        raise ValueError(f"{paths[1]} holds {len(labels)} labels but {paths[0]} holds "
                         f"{len(images)} images; the two files must match")
    return images.reshape(len(images), -1), labels


def _count_idx(info: DatasetInfo, folder: Path, split: str) -> int | None:
    paths = _idx_paths(info, folder, split)
    if paths is None:
        return None
    n_images = _idx_shape(_read_maybe_gzip(paths[0], 16), paths[0], 3)[0]
    n_labels = _idx_shape(_read_maybe_gzip(paths[1], 8), paths[1], 1)[0]
    if n_images != n_labels:
        raise ValueError(f"{paths[1]} holds {n_labels} labels but {paths[0]} holds "
                         f"{n_images} images")
    return n_images


# ----------------------------------------------------------------------------- CIFAR-10 pickles
def _np_core(submodule: str):
    # numpy 2 renamed numpy.core to numpy._core; files name either, depending on who wrote them.
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:  # pragma: no cover - numpy < 1.26
        return importlib.import_module(f"numpy.core.{submodule}")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(latin-1 text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}: a "
                                "CIFAR-10 batch only needs latin1")
    return text.encode("latin1")


def _allowed_global(module: str, name: str):
    """The object for an admitted global, else None: only numpy array reconstruction."""
    if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
        return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
        return _np_core("multiarray")._reconstruct
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return _np_core("numeric")._frombuffer  # protocol 5
    if (module, name) == ("_codecs", "encode"):
        return _latin1_encode
    return None


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals numpy array reconstruction needs.

    Anything else (``os.system``, ``builtins.eval``, …) is refused in ``find_class``, before it
    could be called, so a crafted file cannot run code.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        obj = _allowed_global(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"{self._path}: refusing to unpickle the global '{module}.{name}': a CIFAR-10 "
                "batch needs only numpy array reconstruction, so this file is not a genuine "
                "batch (it may be malicious); nothing from it was executed"
            )
        return obj

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._path}: persistent ids are not allowed in a CIFAR-10 batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: (uint8 N × 3072 channel-major pixels, int64 N labels)."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); "
                         "the file is truncated or corrupt") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: a CIFAR-10 batch is a dict; got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        got = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, 3072); got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: b'labels' must be a list of integers") from None
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images")
    return data, labels


def _cifar_paths(info: DatasetInfo, folder: Path, split: str) -> list[Path]:
    return [folder / f for f in info.files[split] if (folder / f).is_file()]


def _load_cifar(info: DatasetInfo, folder: Path, split: str):
    paths = _cifar_paths(info, folder, split)
    if not paths:
        return None
    parts = [_read_cifar_batch(p) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _count_cifar(info: DatasetInfo, folder: Path, split: str) -> int | None:
    paths = _cifar_paths(info, folder, split)
    return sum(len(_read_cifar_batch(p)[1]) for p in paths) if paths else None


# ----------------------------------------------------------------------------- SVHN .mat
def _svhn_path(info: DatasetInfo, folder: Path, split: str) -> Path | None:
    path = folder / info.files[split][0]
    return path if path.is_file() else None


def _load_svhn(info: DatasetInfo, folder: Path, split: str):
    path = _svhn_path(info, folder, split)
    if path is None:
        return None
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except NotImplementedError:
        raise ValueError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; the official "
                         "SVHN files are MATLAB v5") from None
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable MATLAB file ({exc})") from None
    X, y = mat.get("X"), mat.get("y")
    if X is None or y is None:
        raise ValueError(f"{path}: needs variables 'X' and 'y'; found {sorted(mat)}")
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        raise ValueError(f"{path}: 'X' must be uint8 of shape (32, 32, 3, N); got {X.dtype} "
                         f"{X.shape}")
    y = np.asarray(y).reshape(-1)
    if len(y) != X.shape[3]:
        raise ValueError(f"{path}: 'y' holds {len(y)} labels for {X.shape[3]} images")
    bad = (y < 1) | (y > 10) | (y != np.round(y))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{path}: SVHN labels must be 1..10 (10 means digit 0); y[{i}] = {y[i]}")
    # (H, W, C, N) -> (N, C, H, W): channel-major like CIFAR-10.
    pixels = np.ascontiguousarray(X.transpose(3, 2, 0, 1)).reshape(X.shape[3], -1)
    return pixels, (y.astype(np.int64) % 10)


def _count_svhn(info: DatasetInfo, folder: Path, split: str) -> int | None:
    path = _svhn_path(info, folder, split)
    if path is None:
        return None
    from scipy.io import whosmat

    try:
        shapes = {name: shape for name, shape, _ in whosmat(path)}
    except (NotImplementedError, ValueError, OSError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable MATLAB v5 file ({exc})") from None
    if len(shapes.get("X", ())) != 4:
        raise ValueError(f"{path}: no 'X' of shape (32, 32, 3, N); variables: {shapes}")
    return int(shapes["X"][3])


# ----------------------------------------------------------------------------- digits
def _load_digits(split: str):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels, labels = bunch.data, bunch.target.astype(np.int64)
    rows = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return pixels[rows], labels[rows]


_READERS = {"mnist": (_load_idx, _count_idx), "fashion-mnist": (_load_idx, _count_idx),
            "cifar10": (_load_cifar, _count_cifar), "svhn": (_load_svhn, _count_svhn)}


# ----------------------------------------------------------------------------- load
def _canonical_name(name) -> str:
    if isinstance(name, str):
        key = name.strip().lower().replace("_", "-")
        if key in DATASETS:
            return key
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def _expected_files(info: DatasetInfo, splits) -> str:
    if info.name == "cifar10":
        parts = {"train": "data_batch_1 ... data_batch_5 (any of them)", "test": "test_batch"}
        return ", ".join(parts[s] for s in splits)
    gz = "[.gz]" if info.files["train"][0].endswith("ubyte") else ""  # IDX: gzipped or not
    return ", ".join(f + gz for s in splits for f in info.files[s])


def _not_found(info: DatasetInfo, root: Path, origin: str, split: str,
               fix: str | None = None) -> DatasetNotFoundError:
    folder = root / info.folder
    state = "" if folder.is_dir() else " (this folder does not exist)"
    fix = fix or ("Put the files in that folder (layout: docs/datasets.md), or pass "
                  "download=True (needs torchvision).")
    return DatasetNotFoundError(
        f"dataset {info.name!r} ({split} split) not found\n"
        f"  expected: {_expected_files(info, (split,))}\n"
        f"  searched: {folder}{state}\n"
        f"  data root: {root} (from {origin})\n{fix}"
    )


def load(name: str = DEFAULT_DATASET, split: str = "train", n: int | None = None,
         root: str | os.PathLike | None = None, balanced: bool = False,
         download: bool = False) -> Dataset:
    """Load one split of a dataset as float32 N × D pixels in [0, 1] and int64 labels.

    Paper: Appendix C, "the first 50,000 points" of MNIST, CIFAR-10, SVHN (file order).

    - ``name``: one of ``DATASETS`` (digits, mnist, fashion-mnist, cifar10, svhn).
    - ``split``: "train" or "test". digits: train = the first 1,500 of scikit-learn's 1,797
      images, test = the last 297. cifar10 train: every ``data_batch_*`` present, in order.
    - ``n``: keep the first n points in file order (all if None); more than the split holds
      raises ValueError.
    - ``balanced``: needs ``n`` divisible by K; keep the first n/K points of each class (in file
      order overall); a class with fewer than n/K points raises ValueError.
    - ``root``: data root; else ``$AGOP_DATA``, else ``~/.cache/agop``.
    - ``download``: if files are missing, fetch them with torchvision (if installed) into the
      layout under the root.

    Pixels: digits / 16, the others / 255. Images are flattened C × H × W (channel-major).
    Missing files raise :class:`DatasetNotFoundError` (a FileNotFoundError) naming the files
    expected and the folder searched; corrupt files raise ValueError naming the file.
    """
    from agop._validate import check_int  # here, not at import: it loads torch (slow CLI start)

    info = DATASETS[_canonical_name(name)]
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if n is not None:
        n = check_int(n, "n", minimum=1)
    if not isinstance(balanced, bool):
        raise ValueError(f"balanced must be True or False; got {balanced!r}")
    if balanced and n is None:
        raise ValueError("balanced=True needs n (it takes the first n/K points of each class)")

    if info.folder is None:
        source, scale = None, 16.0
        pixels, labels = _load_digits(split)
    else:
        root_path, origin = _root_and_origin(root)
        source, scale = root_path / info.folder, 255.0
        reader = _READERS[info.name][0]
        loaded = reader(info, source, split)
        if loaded is None and download:
            _download(info, root_path, origin, split)
            loaded = reader(info, source, split)
        if loaded is None:
            raise _not_found(info, root_path, origin, split)
        pixels, labels = loaded

    bad = (labels < 0) | (labels >= len(info.classes))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{info.name} {split} in {source}: label {labels[i]} at index {i} is "
                         f"outside 0..{len(info.classes) - 1}")
    where = f"{info.name} {split}" + ("" if source is None else f" (in {source})")
    rows = _select(labels, n, balanced, info, where)
    X = np.asarray(pixels[rows], dtype=np.float32)
    X /= np.float32(scale)
    return Dataset(X=X, y=np.ascontiguousarray(labels[rows], dtype=np.int64),
                   classes=list(info.classes), image_shape=info.image_shape, name=info.name,
                   split=split, source=source)


def _select(labels: np.ndarray, n: int | None, balanced: bool, info: DatasetInfo,
            where: str):
    """Rows to keep: all, the first n, or the first n/K of each class (file order kept)."""
    total = len(labels)
    if n is None:
        return slice(None)
    if n > total:
        raise ValueError(f"n = {n} but {where} has only {total:,} points")
    if not balanced:
        return slice(0, n)
    k = len(info.classes)
    if n % k:
        raise ValueError(f"balanced=True takes n/K points per class, so n must be divisible by "
                         f"K = {k}; got n = {n} (try {n - n % k} or {n - n % k + k})")
    per = n // k
    picks = []
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per:
            raise ValueError(f"balanced n = {n} needs {per} points of class {c} "
                             f"({info.classes[c]!r}) but {where} has only {len(idx)}")
        picks.append(idx[:per])
    return np.sort(np.concatenate(picks))


# ----------------------------------------------------------------------------- download
def _download(info: DatasetInfo, root: Path, origin: str, split: str) -> None:
    """Fetch a dataset with torchvision into ``root/<folder>`` (all splits at once)."""
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise _not_found(info, root, origin, split, fix=(
            "download=True needs torchvision, which is not installed: `pip install torchvision`, "
            "or put the files in that folder yourself (layout: docs/datasets.md).")) from None
    dest = root / info.folder
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        tmp = Path(tmp)
        if info.name in ("mnist", "fashion-mnist"):
            cls = tvd.MNIST if info.name == "mnist" else tvd.FashionMNIST
            cls(str(tmp), train=True, download=True)
            raw = tmp / cls.__name__ / "raw"  # torchvision's layout: <root>/<ClassName>/raw/
            moves = [_idx_path(raw, base) or raw / base for s in SPLITS for base in info.files[s]]
        elif info.name == "cifar10":
            tvd.CIFAR10(str(tmp), train=True, download=True)  # the archive holds both splits
            moves = sorted(p for p in (tmp / "cifar-10-batches-py").iterdir() if p.is_file())
        else:
            for s in SPLITS:
                tvd.SVHN(str(tmp), split=s, download=True)
            moves = [tmp / f for s in SPLITS for f in info.files[s]]
        missing = [str(p) for p in moves if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(f"torchvision's download of {info.name} did not produce "
                                       f"the expected files: {', '.join(missing)}")
        for path in moves:
            shutil.move(str(path), str(dest / path.name))


# ----------------------------------------------------------------------------- describe
def _fmt_count(count) -> str:
    return "-" if count is None else f"{count:,}"


def count(name: str, split: str = "train", root: str | os.PathLike | None = None) -> int | None:
    """Number of points in a split, from the files' headers (no pixels are read); None if absent.

    Same ``name``/``root`` rules as :func:`load`; a corrupt file raises ``ValueError``.
    """
    info = DATASETS[_canonical_name(name)]
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if info.folder is None:
        return DIGITS_TRAIN if split == "train" else 1797 - DIGITS_TRAIN
    return _READERS[info.name][1](info, resolve_root(root) / info.folder, split)


def describe(root: str | os.PathLike | None = None) -> str:
    """A table of every dataset: the folder searched, found or missing, train/test sizes, shape.

    Reads only headers where the format has one (IDX, .mat); CIFAR-10 batches are unpickled
    (restricted) to count their labels. Corrupt files are reported, not raised.
    """
    root_path, origin = _root_and_origin(root)
    rows, notes = [], []
    for info in DATASETS.values():
        shape = "x".join(map(str, info.image_shape))
        if info.folder is None:
            ok = importlib.util.find_spec("sklearn") is not None
            rows.append((info.name, "found" if ok else "missing", _fmt_count(DIGITS_TRAIN),
                         _fmt_count(1797 - DIGITS_TRAIN), shape, "(built in, scikit-learn)"))
            continue
        folder = root_path / info.folder
        try:
            counts = {s: _READERS[info.name][1](info, folder, s) for s in SPLITS}
        except ValueError as exc:
            rows.append((info.name, "ERROR", "?", "?", shape, str(folder)))
            notes.append(f"{info.name}: {exc}")
            continue
        absent = [s for s in SPLITS if counts[s] is None]
        status = {0: "found", 1: "partial", 2: "missing"}[len(absent)]
        rows.append((info.name, status, _fmt_count(counts["train"]), _fmt_count(counts["test"]),
                     shape, str(folder)))
        if absent:
            notes.append(f"{info.name}: {' and '.join(absent)} missing; expected "
                         f"{_expected_files(info, absent)} in {folder}/")
        if info.name == "cifar10" and counts["train"] is not None:
            present = [p.name for p in _cifar_paths(info, folder, "train")]
            if len(present) < 5:
                notes.append(f"cifar10: train holds {', '.join(present)} only "
                             f"({len(present)} of the 5 official batches)")

    header = ("dataset", "status", "train", "test", "image", "folder searched")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(5)]
    right = (False, False, True, True, False)

    def line(r):
        cells = [c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(r, widths, right)]
        return "  ".join(cells + [r[5]])

    out = [f"data root: {root_path} (from {origin})"
           + ("" if root_path.is_dir() else "  [this folder does not exist]"), "",
           line(header), *(line(r) for r in rows)]
    if notes:
        out += [""] + [textwrap.fill(note, width=100, subsequent_indent="    ",
                                        break_on_hyphens=False) for note in notes]
    out += ["", "image = channels x height x width; the layout under the data root is in "
                "docs/datasets.md"]
    return "\n".join(out)
