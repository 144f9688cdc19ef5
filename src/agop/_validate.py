"""Input validation shared by every public function.

Every check raises ``ValueError`` whose message names the argument, what is wrong, and where
(the first offending row / column / label), so that bad input never becomes a silent wrong
number. Functions here accept numpy arrays and torch tensors alike.
"""

from __future__ import annotations

import decimal
import math
import numbers
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


_REAL = (numbers.Real, decimal.Decimal)  # what an object array may hold where numbers are taken
_COMPLEX = "Complex data not supported"  # scikit-learn's words, which its estimator checks expect


class NotNumericError(ValueError, TypeError):
    """An element of an object array that is not a real number.

    A ValueError, as every input error of agop, and a TypeError, as Python's ``float()`` and
    scikit-learn's estimator checks have it for an object that is not a number.
    """


def check_real(a: ArrayLike, name: str, *, allow_object: bool = False) -> None:
    """Raise unless ``a`` holds real numbers: a bool, integer or floating dtype.

    Complex values would lose their imaginary part and an object array may hold anything (None,
    strings, nested lists), so both are refused rather than converted; so are strings, bytes
    and dates, and a nested sequence that is not rectangular. With ``allow_object`` (scikit-
    learn's estimators take object arrays of numbers) an object array passes if every element
    is a real number; the message names the first that is not.
    """
    if isinstance(a, torch.Tensor):
        if a.is_complex():
            raise ValueError(f"{name} must be real-valued ({_COMPLEX}); got dtype {a.dtype}")
        return
    dtype = getattr(a, "dtype", None)
    if not isinstance(dtype, np.dtype):  # a list, a scalar, or a dtype-less array-like
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as exc:
            first = str(exc).split(". ")[0].strip()
            raise ValueError(f"{name} must be a rectangular array of numbers ({first})") from None
        dtype = a.dtype
    if dtype == object:
        if not allow_object:
            raise ValueError(f"{name} must be numeric; got an object array (convert it with "
                             ".astype(float) if it holds numbers)")
        arr = np.asarray(a)
        real = np.frompyfunc(lambda v: isinstance(v, _REAL), 1, 1)
        bad = np.argwhere(~real(arr).astype(bool)) if arr.size else []
        if len(bad):
            idx = tuple(int(i) for i in bad[0])
            v = arr[idx]
            try:
                float(v)
                why = ("text is not taken as a number" if isinstance(v, (str, bytes))
                       else "not a real number")
            except (TypeError, ValueError) as exc:
                why = str(exc)
            raise NotNumericError(f"{name} must hold real numbers; {name}{list(idx)} is a "
                                  f"{type(v).__name__}, {v!r:.40} ({why})")
        check_finite(arr.astype(np.float64), name)
        return
    if dtype.kind == "c":
        raise ValueError(f"{name} must be real-valued ({_COMPLEX}); got dtype {dtype}")
    if dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric; got dtype {dtype}")


def check_matrix(a: ArrayLike, name: str, *, min_rows: int = 1, finite: bool = True) -> None:
    """Raise unless ``a`` is a 2-D array (N × D) of real numbers (:func:`check_real`) with at
    least ``min_rows`` rows and ≥ 1 column."""
    check_real(a, name)
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
    check_real(a, name)
    arr = to_numpy(a)
    check_matrix(arr, name, min_rows=min_rows)
    return np.asarray(arr, dtype=np.float64)


def as_float64_tensor(a: ArrayLike, name: str = "H", *, min_rows: int = 1) -> torch.Tensor:
    """Validate ``a`` as an N × D finite real matrix; return it as a float64 torch tensor.

    Tensors stay on their device (no copy to the host); anything else becomes a CPU tensor.
    """
    check_real(a, name)
    if not isinstance(a, torch.Tensor):
        a = torch.from_numpy(np.ascontiguousarray(np.asarray(a)))
    check_matrix(a, name, min_rows=min_rows)
    return a.detach().to(torch.float64)


def check_row_norms(X: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    """Raise unless every row of the finite matrix X can be scaled to unit norm in ``dtype``.

    X (N × D, any floating dtype) is about to be cast to ``dtype`` (default: X's) and each row
    divided by its Euclidean norm (Algorithm 1's "normalize the data"). That fails silently
    when a value overflows ``dtype`` (inf), when the squares in a row's norm overflow (largest
    |x| above √(max/D): the norm is inf and the row becomes 0) or underflow (largest |x| below
    √tiny but not 0: the norm is 0 or has lost its digits). The message names the first such
    row and the overflow or underflow. A row of exact zeros is left to the caller.
    """
    dtype = X.dtype if dtype is None else dtype
    info = torch.finfo(dtype)
    big = X.detach().abs().amax(dim=1).to(torch.float64)  # (N,)
    what = str(dtype).replace("torch.", "")
    limit = min(float(info.max), math.sqrt(float(info.max) / X.shape[1]))
    over = torch.nonzero(big > limit)
    if over.numel():
        i = int(over[0])
        cause = (f"exceed the largest {what}, {float(info.max):.3g}" if float(big[i]) > info.max
                 else f"square to more than the largest {what}, {float(info.max):.3g}, in the "
                      f"row's norm (limit {limit:.3g} with {X.shape[1]} column(s))")
        raise ValueError(f"{name} overflows {what}: row {i} has values up to {float(big[i]):.3g} "
                         f"that {cause} ({over.numel()} such row(s)); rescale it")
    floor = math.sqrt(float(info.tiny))
    under = torch.nonzero((big > 0) & (big < floor))
    if under.numel():
        i = int(under[0])
        raise ValueError(f"{name} underflows {what}: row {i} has values of at most "
                         f"{float(big[i]):.3g}, whose squares in the row's norm fall below the "
                         f"smallest normal {what} (limit {floor:.3g}; {under.numel()} such "
                         "row(s)); rescale it")


def check_standardization(mean: np.ndarray, scale: np.ndarray, name: str,
                          X: torch.Tensor | None = None) -> None:
    """Raise if per-column float64 statistics of X overflowed or underflowed.

    ``mean`` and ``scale`` (D,) are the column means and population standard deviations.
    Overflow (|x| near 1e154 or more: the squares, or the sums, exceed the largest float64)
    leaves them non-finite; underflow (a column that varies by less than about 1e-154) leaves a
    standard deviation below √tiny, or 0 while the column (``X``, if given) is not constant.
    Either way dividing by ``scale`` would give a wrong feature, not an error.
    """
    bad = np.flatnonzero(~np.isfinite(mean) | ~np.isfinite(scale))
    if bad.size:
        j = int(bad[0])
        stat = "mean" if not np.isfinite(mean[j]) else "variance"
        reach = ""
        if X is not None:
            reach = f" (values up to {float(X[:, j].abs().max()):.3g})"
        raise ValueError(f"{name} overflows float64 when standardized: the {stat} of column {j}"
                         f"{reach} exceeds the largest float64, 1.8e+308 ({bad.size} such "
                         "column(s)); rescale it")
    floor = math.sqrt(float(np.finfo(np.float64).tiny))
    small = (scale > 0) & (scale < floor)
    if X is not None:
        spread = _host_np((X.amax(dim=0) - X.amin(dim=0)).to(torch.float64))
        small |= (scale == 0) & (spread > 0)
    under = np.flatnonzero(small)
    if under.size:
        j = int(under[0])
        raise ValueError(f"{name} underflows float64 when standardized: column {j} varies, but "
                         f"its standard deviation {float(scale[j]):.3g} is below the smallest "
                         f"normal float64's square root ({floor:.3g}; {under.size} such "
                         "column(s)); rescale it")


def _host_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


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
