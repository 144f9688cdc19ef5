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
import zlib
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
    "count",
    "describe",
    "load",
    "load_labels",
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
    ``classes[y]``. ``source``: the folder read (None for the built-in digits). ``rows``: the
    ``(start, stop)`` asked of :func:`load` (these are rows start … stop−1 of the selection),
    None for the whole selection.
    """

    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    image_shape: tuple[int, int, int]
    name: str
    split: str
    source: Path | None = field(default=None)
    rows: tuple[int, int] | None = field(default=None)

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
                f"source={where!r}" + ("" if self.rows is None else f", rows={self.rows}")
                + ")")


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


def _read_maybe_gzip(path: Path, nbytes: int | None = None, offset: int = 0) -> bytes:
    """The file's bytes (``nbytes`` of them from ``offset``; all if None), decompressed if it is
    gzip (judged by its magic bytes, not its name). A gzip stream is decompressed up to
    ``offset`` + ``nbytes`` and no further; a plain file is read from ``offset`` directly."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if gz else f
            if offset:
                stream.seek(offset)
            return stream.read() if nbytes is None else stream.read(nbytes)
    except (EOFError, gzip.BadGzipFile, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read the file ({exc}); it is truncated or corrupt; "
                         "replace it with a fresh copy") from None


def _size_matches(path: Path, total: int) -> bool:
    """Whether the file decompresses to ``total`` bytes, judged without decompressing: a plain
    file's size, or a gzip file's ISIZE trailer (the size mod 2^32 of its last member). False
    only means "look closer" (a multi-member gzip file can be fine)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return os.fstat(f.fileno()).st_size == total
        f.seek(0, os.SEEK_END)
        if f.tell() < 22:  # shorter than a gzip header + trailer
            return False
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little") == total % 2**32


def _check_idx_size(path: Path, shape: tuple[int, ...], rank: int) -> None:
    """Raise unless the file holds exactly the data its header states (cheaply where the size
    or the gzip trailer says so; else by decompressing it, as a full read would)."""
    header = 4 + 4 * rank
    expected = int(np.prod(shape))
    if _size_matches(path, header + expected):
        return
    held = len(_read_maybe_gzip(path)) - header  # a truncated gzip file raises here
    if held != expected:
        raise ValueError(f"{path}: the IDX header says shape {shape} ({expected} data bytes) "
                         f"but the file holds {held}; it is truncated or corrupt")


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


def _idx_source(info: DatasetInfo, folder: Path, split: str, limit, want):
    """(all labels, pixels(idx)) of an IDX split, or None if its files are absent.

    The labels file is read whole (one byte a point); of the images file only the header and,
    when pixels are asked for, the span of rows from the first to the last index (a seek into
    a plain file; a gzip file is decompressed up to the end of the span).
    """
    paths = _idx_paths(info, folder, split)
    if paths is None:
        return None
    labels = _read_idx(paths[1], 1)
    shape = _idx_shape(_read_maybe_gzip(paths[0], 16), paths[0], 3)
    if shape[1:] != info.image_shape[1:]:
        raise ValueError(f"{paths[0]}: images are {shape[1]}x{shape[2]}; "
                         f"{info.name} images are {info.image_shape[1]}x{info.image_shape[2]}")
    if len(labels) != shape[0]:
        raise ValueError(f"{paths[1]} holds {len(labels)} labels but {paths[0]} holds "
                         f"{shape[0]} images; the two files must match")
    _check_idx_size(paths[0], shape, 3)
    row = shape[1] * shape[2]

    def pixels(idx: np.ndarray) -> np.ndarray:
        a, b = int(idx[0]), int(idx[-1]) + 1
        raw = _read_maybe_gzip(paths[0], (b - a) * row, offset=16 + a * row)
        if len(raw) != (b - a) * row:
            raise ValueError(f"{paths[0]}: rows {a}..{b - 1} run past the end of the file; it "
                             "is truncated or corrupt")
        block = np.frombuffer(raw, dtype=np.uint8).reshape(b - a, row)
        return block if b - a == len(idx) else block[idx - a]

    return labels.astype(np.int64), pixels


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


def _cifar_source(info: DatasetInfo, folder: Path, split: str, limit, want):
    """(labels, pixels(idx)) of the CIFAR-10 batches present, or None if there are none.

    Batches are unpickled in order until ``limit`` labels are read (None: all); a pickle holds
    labels and pixels together, so each batch is read whole, and only the pixels of the global
    rows ``want = (start, stop)`` (None: all) are kept.
    """
    paths = _cifar_paths(info, folder, split)
    if not paths:
        return None
    label_parts, kept, offset = [], [], 0
    for path in paths:
        if limit is not None and offset >= limit:
            break
        data, labels = _read_cifar_batch(path)
        lo, hi = (offset, offset + len(labels)) if want is None else \
            (max(offset, want[0]), min(offset + len(labels), want[1]))
        if lo < hi:
            part = data if hi - lo == len(data) else data[lo - offset:hi - offset].copy()
            kept.append((lo, part))
        label_parts.append(labels)
        offset += len(labels)

    def pixels(idx: np.ndarray) -> np.ndarray:
        pieces = []
        for lo, part in kept:  # idx is sorted: the pieces come out in order
            inside = idx[(idx >= lo) & (idx < lo + len(part))] - lo
            if len(inside) == len(part):
                pieces.append(part)
            elif len(inside):
                pieces.append(part[inside])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    return np.concatenate(label_parts), pixels


def _count_cifar(info: DatasetInfo, folder: Path, split: str) -> int | None:
    paths = _cifar_paths(info, folder, split)
    return sum(len(_read_cifar_batch(p)[1]) for p in paths) if paths else None


# ----------------------------------------------------------------------------- SVHN .mat
def _svhn_path(info: DatasetInfo, folder: Path, split: str) -> Path | None:
    path = folder / info.files[split][0]
    return path if path.is_file() else None


def _svhn_mat(path: Path, read):
    from scipy.io import loadmat, whosmat

    try:
        return read(loadmat, whosmat)
    except NotImplementedError:
        raise ValueError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; the official "
                         "SVHN files are MATLAB v5") from None
    except (ValueError, OSError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable MATLAB file ({exc})") from None


def _svhn_source(info: DatasetInfo, folder: Path, split: str, limit, want):
    """(labels, pixels(idx)) of an SVHN .mat file, or None if absent: ``y`` and the header of
    ``X`` first; ``X`` itself only when pixels are asked for (the format cannot read part of
    a variable, so the whole of ``X`` is read then)."""
    path = _svhn_path(info, folder, split)
    if path is None:
        return None
    info_x = _svhn_mat(path, lambda loadmat, whosmat: {
        name: (shape, cls) for name, shape, cls in whosmat(path)})
    y = _svhn_mat(path, lambda loadmat, whosmat: loadmat(path, variable_names=["y"])).get("y")
    if "X" not in info_x or y is None:
        raise ValueError(f"{path}: needs variables 'X' and 'y'; found {sorted(info_x)}")
    shape, cls = info_x["X"]
    if len(shape) != 4 or tuple(shape[:3]) != (32, 32, 3) or cls != "uint8":
        raise ValueError(f"{path}: 'X' must be uint8 of shape (32, 32, 3, N); got {cls} "
                         f"{tuple(shape)}")
    y = np.asarray(y).reshape(-1)
    if len(y) != shape[3]:
        raise ValueError(f"{path}: 'y' holds {len(y)} labels for {shape[3]} images")
    bad = (y < 1) | (y > 10) | (y != np.round(y))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{path}: SVHN labels must be 1..10 (10 means digit 0); y[{i}] = {y[i]}")

    def pixels(idx: np.ndarray) -> np.ndarray:
        X = _svhn_mat(path, lambda loadmat, whosmat: loadmat(path, variable_names=["X"]))["X"]
        if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8 \
                or X.shape[3] != len(y):
            raise ValueError(f"{path}: 'X' must be uint8 of shape (32, 32, 3, {len(y)}); got "
                             f"{X.dtype} {X.shape}")
        a, b = int(idx[0]), int(idx[-1]) + 1
        X = X[..., a:b] if b - a == len(idx) else X[..., idx]
        # (H, W, C, N) -> (N, C, H, W): channel-major like CIFAR-10.
        return np.ascontiguousarray(X.transpose(3, 2, 0, 1)).reshape(len(idx), -1)

    return y.astype(np.int64) % 10, pixels


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
def _digits_source(split: str):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels, labels = bunch.data, bunch.target.astype(np.int64)
    rows = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    pixels, labels = pixels[rows], labels[rows]
    return labels, lambda idx: pixels[idx]


# A source returns (labels, pixels) or None when the files are absent: ``labels`` of the split
# (at least the first ``limit`` when one is given; all of them if it holds fewer), and
# ``pixels(idx)``, the rows at the sorted global indices ``idx`` (which lie in ``want`` when
# that is given). The counter reads a split's size from headers.
_READERS = {"mnist": (_idx_source, _count_idx), "fashion-mnist": (_idx_source, _count_idx),
            "cifar10": (_cifar_source, _count_cifar), "svhn": (_svhn_source, _count_svhn)}


# ----------------------------------------------------------------------------- load
def canonical_name(name) -> str:
    """The registry key of a dataset name (case, surrounding spaces and "_"/"-" ignored);
    ``ValueError`` naming the known datasets otherwise."""
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
         download: bool = False, rows: tuple[int, int] | None = None) -> Dataset:
    """Load one split of a dataset as float32 N × D pixels in [0, 1] and int64 labels.

    Paper: Appendix C, "the first 50,000 points" of MNIST, CIFAR-10, SVHN (file order).

    - ``name``: one of ``DATASETS`` (digits, mnist, fashion-mnist, cifar10, svhn).
    - ``split``: "train" or "test". digits: train = the first 1,500 of scikit-learn's 1,797
      images, test = the last 297. cifar10 train: every ``data_batch_*`` present, in order.
    - ``n``: keep the first n points in file order (all if None); more than the split holds
      raises ValueError.
    - ``balanced``: needs ``n`` divisible by K; keep the first n/K points of each class (in file
      order overall); a class with fewer than n/K points raises ValueError.
    - ``rows``: ``(start, stop)``: only rows start … stop−1 of the points selected by ``n`` /
      ``balanced`` (one rank's share: ``agop.distributed.row_range``); the same rows as
      ``load(...)`` sliced ``[start:stop]``. Only what those rows need is read where the format
      allows: MNIST images from the first to the last row wanted (a seek; a ``.gz`` file is
      decompressed up to there), CIFAR-10 batches up to the last one needed (a pickle is read
      whole: labels and pixels come together), SVHN and digits whole, then sliced.
      ``0 ≤ start < stop ≤`` the number selected, else ValueError.
    - ``root``: data root; else ``$AGOP_DATA``, else ``~/.cache/agop``.
    - ``download``: if files are missing, fetch them with torchvision (if installed) into the
      layout under the root.

    Pixels: digits / 16, the others / 255. Images are flattened C × H × W (channel-major).
    Missing files raise :class:`DatasetNotFoundError` (a FileNotFoundError) naming the files
    expected and the folder searched; corrupt files raise ValueError naming the file.
    :func:`load_labels` gives the labels alone, reading no pixels where the format allows.
    """
    info, source, labels, idx, pixels = _open(name, split, n, root, balanced, download, rows,
                                              need_pixels=True)
    X = np.asarray(pixels(idx), dtype=np.float32)
    X /= np.float32(16.0 if info.folder is None else 255.0)
    span = None if rows is None else (int(rows[0]), int(rows[1]))
    return Dataset(X=X, y=np.ascontiguousarray(labels[idx], dtype=np.int64),
                   classes=list(info.classes), image_shape=info.image_shape, name=info.name,
                   split=split, source=source, rows=span)


def load_labels(name: str = DEFAULT_DATASET, split: str = "train", n: int | None = None,
                root: str | os.PathLike | None = None, balanced: bool = False,
                download: bool = False, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The int64 labels of ``load(name, split, n, root, balanced, download, rows)``, same rules.

    Reads no pixels where the format allows: MNIST reads its labels file only (the images
    file's header is checked), SVHN its ``y`` (and the header of ``X``), digits are built in;
    CIFAR-10 pickles hold labels and pixels together, so its batches are unpickled (up to the
    n-th point) and their pixels dropped batch by batch. For what every rank needs whole, e.g.
    class-balanced centers chosen from all N labels while each rank loads its own rows.
    """
    _, _, labels, idx, _ = _open(name, split, n, root, balanced, download, rows,
                                 need_pixels=False)
    return np.ascontiguousarray(labels[idx], dtype=np.int64)


def _open(name, split, n, root, balanced, download, rows, need_pixels):
    """Validate the arguments, read the labels and return (info, source folder, labels of the
    split, the sorted global indices selected, pixels(idx))."""
    from agop._validate import check_int  # here, not at import: it loads torch (slow CLI start)

    info = DATASETS[canonical_name(name)]
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if n is not None:
        n = check_int(n, "n", minimum=1)
    if not isinstance(balanced, bool):
        raise ValueError(f"balanced must be True or False; got {balanced!r}")
    if balanced and n is None:
        raise ValueError("balanced=True needs n (it takes the first n/K points of each class)")
    if rows is not None:
        rows = _check_rows(rows)

    # What must be read: labels up to the n-th point (all for a balanced pick, which may reach
    # anywhere), pixels only of the global rows wanted when they are known in advance.
    limit = None if balanced else n if n is not None else None if rows is None else rows[1]
    want = None
    if not balanced:
        want = (0, n) if rows is None and n is not None else rows
        if rows is not None and n is not None:
            want = (min(rows[0], n), min(rows[1], n))
    if not need_pixels:
        want = (0, 0)

    if info.folder is None:
        source = None
        labels, pixels = _digits_source(split)
    else:
        root_path, origin = _root_and_origin(root)
        source = root_path / info.folder
        reader = _READERS[info.name][0]
        loaded = reader(info, source, split, limit, want)
        if loaded is None and download:
            _download(info, root_path, origin, split)
            loaded = reader(info, source, split, limit, want)
        if loaded is None:
            raise _not_found(info, root_path, origin, split)
        labels, pixels = loaded

    bad = (labels < 0) | (labels >= len(info.classes))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{info.name} {split} in {source}: label {labels[i]} at index {i} is "
                         f"outside 0..{len(info.classes) - 1}")
    where = f"{info.name} {split}" + ("" if source is None else f" (in {source})")
    idx = np.arange(len(labels))[_select(labels, n, balanced, info, where)]
    if rows is not None:
        if rows[1] > len(idx):
            raise ValueError(f"rows = ({rows[0]}, {rows[1]}) but only {len(idx):,} points are "
                             f"selected from {where}; need 0 ≤ start < stop ≤ {len(idx)}")
        idx = idx[rows[0]:rows[1]]
    return info, source, labels, idx, pixels


def _check_rows(rows) -> tuple[int, int]:
    """``rows`` as a (start, stop) pair of ints with 0 ≤ start < stop, else ValueError."""
    ok = isinstance(rows, (tuple, list)) and len(rows) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in rows)
    if not ok:
        raise ValueError(f"rows must be a (start, stop) pair of integers; got {rows!r}")
    start, stop = int(rows[0]), int(rows[1])
    if not 0 <= start < stop:
        raise ValueError(f"rows = ({start}, {stop}) is not a range of rows; need "
                         "0 ≤ start < stop")
    return start, stop


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
    info = DATASETS[canonical_name(name)]
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
