"""Bad input to every collapse function raises a ValueError that says what and where."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agop import collapse
from agop._validate import as_labels, to_numpy
from agop.collapse import CollapseAccumulator

FUNCTIONS = [getattr(collapse, name) for name in collapse.__all__ if name != "CollapseAccumulator"]

RNG = np.random.default_rng(0)
H0 = RNG.normal(size=(9, 4))
Y0 = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])


def with_value(a, index, value):
    a = a.copy()
    a[index] = value
    return a


# (case id, H, y, num_classes, message pattern)
CASES = [
    ("nan", with_value(H0, (2, 1), np.nan), Y0, None,
     r"H contains 1 non-finite value\(s\) \(NaN or inf\); the first is at index \(2, 1\)"),
    ("inf", with_value(H0, (4, 0), -np.inf), Y0, None,
     r"H contains 1 non-finite value\(s\).*index \(4, 0\)"),
    ("nan-tensor", torch.from_numpy(with_value(H0, (7, 3), np.nan)), Y0, None,
     r"H contains 1 non-finite value\(s\).*index \(7, 3\)"),
    ("short-y", H0, Y0[:-1], None, r"y has 8 label\(s\) but the features have 9 row\(s\)"),
    ("long-y", H0, np.append(Y0, 0), None, r"y has 10 label\(s\) but the features have 9 row"),
    ("1-D H", H0[:, 0], Y0, None, r"H must be a 2-D array of shape \(N, D\).*got shape \(9,\)"),
    ("3-D H", H0.reshape(9, 2, 2), Y0, None, r"H must be a 2-D array.*got shape \(9, 2, 2\)"),
    ("no rows", H0[:0], Y0[:0], None, r"H must have at least 1 row\(s\); got shape \(0, 4\)"),
    ("no columns", H0[:, :0], Y0, None, r"H must have at least one column; got shape \(9, 0\)"),
    ("complex", H0 + 1j, Y0, None, r"H must be real-valued"),
    ("one class", H0, np.zeros(9, dtype=int), None,
     r"y must contain at least 2 classes; found 1 \(labels present: \[0\]\)"),
    ("empty class", H0, Y0 % 2, 3, r"class\(es\) \[2\] of y have no samples \(K = 3\)"),
    ("empty middle class", H0, np.where(Y0 == 1, 2, Y0), None,
     r"class\(es\) \[1\] of y have no samples \(K = 3\)"),
    ("label >= K", H0, with_value(Y0, 5, 3), 3, r"labels in 0\.\.2 \(K = 3\); y\[5\] = 3"),
    ("negative label", H0, with_value(Y0, 4, -1), None, r"y\[4\] = -1 is negative"),
    ("fractional label", H0, with_value(Y0.astype(float), 3, 1.5), None,
     r"y must hold integer labels; y\[3\] = 1\.5"),
    ("nan label", H0, with_value(Y0.astype(float), 6, np.nan), None,
     r"y contains 1 non-finite value\(s\).*index \(6,\)"),
    ("string labels", H0, Y0.astype(str), None, r"y must hold integer labels; got dtype <U"),
    ("2-D labels", H0, np.stack([Y0, Y0], 1), None, r"y must be a 1-D array of integer labels"),
    ("K not an int", H0, Y0, 2.5, r"num_classes must be an integer ≥ 1; got 2\.5"),
    ("K = 0", H0, Y0, 0, r"num_classes must be an integer ≥ 1; got 0"),
]


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("H, y, K, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_function_rejects_bad_input(func, H, y, K, pattern):
    with pytest.raises(ValueError, match=pattern):
        func(H, y, num_classes=K)


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f.__name__)
def test_valid_label_forms_are_accepted(func):
    # Float labels holding integers, a column vector, and a tensor all mean the same labels.
    expected = func(H0, Y0)
    for y in (Y0.astype(float), Y0[:, None], torch.from_numpy(Y0), Y0.astype(np.uint8)):
        got = func(H0, y)
        if isinstance(expected, tuple):
            np.testing.assert_array_equal(got[0], expected[0])
        else:
            assert got == expected


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"num_classes": 1, "dim": 4}, r"num_classes must be an integer ≥ 2; got 1"),
        ({"num_classes": 3.0, "dim": 4}, r"num_classes must be an integer ≥ 2; got 3\.0"),
        ({"num_classes": 3, "dim": 0}, r"dim must be an integer ≥ 1; got 0"),
    ],
)
def test_accumulator_rejects_bad_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CollapseAccumulator(**kwargs)


@pytest.mark.parametrize(
    "H, y, pattern",
    [
        (with_value(H0, (1, 2), np.nan), Y0, r"H_batch contains 1 non-finite.*index \(1, 2\)"),
        (H0[:, :3], Y0, r"H_batch has 3 feature column\(s\) but the accumulator was built with "
                        r"dim = 4"),
        (H0, Y0[:5], r"y_batch has 5 label\(s\) but the features have 9 row\(s\)"),
        (H0[:, 0], Y0, r"H_batch must be a 2-D array.*got shape \(9,\)"),
        (H0.reshape(9, 2, 2), Y0, r"H_batch must be a 2-D array.*got shape \(9, 2, 2\)"),
        (H0[:0], Y0[:2], r"H_batch has 0 rows but y_batch is not empty"),
        (H0, with_value(Y0, 8, 3),
         r"y_batch must hold labels in 0\.\.2 \(K = 3\); y_batch\[8\] = 3"),
        (H0, with_value(Y0, 0, -2), r"y_batch\[0\] = -2 is negative"),
        (H0, with_value(Y0.astype(float), 2, 0.5), r"y_batch must hold integer labels"),
    ],
)
def test_accumulator_update_rejects_bad_batches_and_keeps_its_state(H, y, pattern):
    acc = CollapseAccumulator(3, 4)
    acc.update(H0[:4], Y0[:4])
    with pytest.raises(ValueError, match=pattern):
        acc.update(H, y)
    assert acc.count == 4
    acc.update(H0[4:], Y0[4:])
    assert acc.compute() == pytest.approx(collapse.measure(H0, Y0), rel=1e-12)


def test_accumulator_compute_needs_every_class():
    acc = CollapseAccumulator(3, 4)
    with pytest.raises(ValueError, match=r"class\(es\) \[0, 1, 2\] have no samples among the 0"):
        acc.compute()
    acc.update(H0[Y0 == 0], Y0[Y0 == 0])  # one class only: fine for a batch, not for compute
    with pytest.raises(ValueError, match=r"class\(es\) \[1, 2\] have no samples among the 3 seen"):
        acc.compute()


def test_to_numpy_accepts_bfloat16_tensors():
    t = torch.tensor([[1.5, -2.25]], dtype=torch.bfloat16)
    a = to_numpy(t)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, [[1.5, -2.25]])


def test_as_labels_returns_int64_and_k():
    labels, K = as_labels([0.0, 2.0, 1.0], 3, num_classes=4, require_all=False)
    assert labels.dtype == np.int64 and K == 4
    np.testing.assert_array_equal(labels, [0, 2, 1])
