"""Input validation shared by every public function.

Every check raises ``ValueError`` whose message names the argument, what is wrong, and where
(the first offending row / column / label), so that bad input never becomes a silent wrong
number. Functions here accept numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor, or nested sequence


def to_numpy(a: ArrayLike) -> np.ndarray:
    """Return ``a`` as a numpy array without copying when possible (tensors are detached)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            a = a.float()
        return a.numpy()
    return np.asarray(a)


def check_finite(a: ArrayLike, name: str) -> None:
    """Raise if ``a`` holds NaN or ±inf; the message gives the first bad index and the count."""
    if isinstance(a, torch.Tensor):
        bad = ~torch.isfinite(a)
        if bool(bad.any()):
            idx = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
            raise ValueError(
                f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); "
                f"the first is at index {idx}"
            )
        return
    arr = np.asarray(a)
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); "
            f"the first is at index {idx}"
        )


def check_matrix(a: ArrayLike, name: str, *, min_rows: int = 1, finite: bool = True) -> None:
    """Raise unless ``a`` is a 2-D array (N × D) with at least ``min_rows`` rows and ≥ 1 column."""
    shape = tuple(a.shape) if hasattr(a, "shape") else np.shape(a)
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (N, D) with samples as rows; got shape {shape}"
        )
    if shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s); got shape {shape}")
    if shape[1] < 1:
        raise ValueError(f"{name} must have at least one column; got shape {shape}")
    if finite:
        check_finite(a, name)


def as_float64_matrix(a: ArrayLike, name: str = "H", *, min_rows: int = 1) -> np.ndarray:
    """Validate ``a`` as an N × D finite matrix and return it as float64 numpy."""
    arr = to_numpy(a)
    if arr.dtype == object:
        raise ValueError(f"{name} must be numeric; got an object array")
    check_matrix(arr, name, min_rows=min_rows)
    if arr.dtype.kind == "c":
        raise ValueError(f"{name} must be real-valued; got dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.float64)


def as_float64_tensor(a: ArrayLike, name: str = "H", *, min_rows: int = 1) -> torch.Tensor:
    """Validate ``a`` as an N × D finite real matrix; return it as a float64 torch tensor.

    Tensors stay on their device (no copy to the host); anything else becomes a CPU tensor.
    """
    if not isinstance(a, torch.Tensor):
        arr = np.asarray(a)
        if arr.dtype == object:
            raise ValueError(f"{name} must be numeric; got an object array")
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be real-valued; got dtype {arr.dtype}")
        a = torch.from_numpy(np.ascontiguousarray(arr))
    elif a.is_complex():
        raise ValueError(f"{name} must be real-valued; got dtype {a.dtype}")
    check_matrix(a, name, min_rows=min_rows)
    return a.detach().to(torch.float64)


def as_labels(
    y: ArrayLike,
    n: int | None = None,
    *,
    num_classes: int | None = None,
    name: str = "y",
    min_classes: int = 2,
    require_all: bool = True,
) -> tuple[np.ndarray, int]:
    """Validate integer class labels and return ``(y as int64 numpy, K)``.

    - ``n``: the number of samples the labels must match (``len(H)``).
    - ``num_classes``: K; labels must lie in 0..K−1. If None, K = max(y) + 1.
    - ``require_all``: every class 0..K−1 must have at least one sample (an empty class makes
      class means undefined).
    - ``min_classes``: at least this many distinct classes must be present.
    """
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", minimum=1)
    arr = to_numpy(y)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer labels; got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(
            f"{name} has {arr.shape[0]} label(s) but the features have {n} row(s); "
            "they must match one label per sample"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype.kind == "f":
        check_finite(arr, name)
        if not np.all(arr == np.round(arr)):
            i = int(np.argmax(arr != np.round(arr)))
            raise ValueError(f"{name} must hold integer labels; {name}[{i}] = {float(arr[i])!r}")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer labels; got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        i = int(np.argmin(arr))
        raise ValueError(f"{name} must hold labels in 0..K-1; {name}[{i}] = {arr[i]} is negative")
    if num_classes is None:
        num_classes = int(arr.max()) + 1
    elif arr.max() >= num_classes:
        i = int(np.argmax(arr >= num_classes))
        raise ValueError(
            f"{name} must hold labels in 0..{num_classes - 1} (K = {num_classes}); "
            f"{name}[{i}] = {arr[i]}"
        )
    counts = np.bincount(arr, minlength=num_classes)
    present = int((counts > 0).sum())
    if present < min_classes:
        raise ValueError(
            f"{name} must contain at least {min_classes} classes; found {present} "
            f"(labels present: {sorted(np.flatnonzero(counts).tolist())})"
        )
    if require_all and present < num_classes:
        empty = np.flatnonzero(counts == 0).tolist()
        raise ValueError(
            f"class(es) {empty} of {name} have no samples (K = {num_classes}); every class "
            "needs at least one sample for class means to be defined"
        )
    return arr, int(num_classes)


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (or ≥ 0 with ``allow_zero``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")


def check_int(value: int, name: str, *, minimum: int = 1) -> int:
    """Raise unless ``value`` is an integer ≥ ``minimum``; return it as int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}; got {value}")
    return int(value)


def metric_float(v: Any) -> float:
    """A metric value as a float: None, empty, text or a bool give NaN (a number read from a
    record, or an undefined metric)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def finite_positive(*values: float) -> bool:
    """True when every value is a finite number > 0 (a ratio or a logarithm of them is defined)."""
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)
