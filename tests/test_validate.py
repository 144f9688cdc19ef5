"""Bad input to every collapse function raises a ValueError that says what and where."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agop import collapse
from agop._validate import (NotNumericError, as_labels, check_real, check_row_norms,
                            check_standardization, to_numpy)
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
    ("complex", H0 + 1j, Y0, None, r"H must be real-valued \(Complex data not supported\)"),
    ("complex-tensor", torch.from_numpy(H0 + 1j), Y0, None, r"H must be real-valued"),
    ("object", H0.astype(object), Y0, None, r"H must be numeric; got an object array"),
    ("strings", H0.astype(str), Y0, None, r"H must be numeric; got dtype <U"),
    ("dates", np.zeros((9, 4), dtype="datetime64[D]"), Y0, None,
     r"H must be numeric; got dtype datetime64"),
    ("ragged", [[1.0, 2.0]] * 8 + [[1.0]], Y0, None, r"H must be a rectangular array of numbers"),
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


# --- what is a real number, and what survives float arithmetic --------------------------------


@pytest.mark.parametrize("a, pattern", [
    (np.array([[1.0, None]], dtype=object), r"X\[0, 1\] is a NoneType, None \(float\(\) argument"),
    (np.array([[{"a": 1}, 2.0]], dtype=object), r"X\[0, 0\] is a dict"),
    (np.array([[1.0, 2j]], dtype=object), r"X\[0, 1\] is a complex, 2j"),
    (np.array([[1.0, "1.5"]], dtype=object), r"X\[0, 1\] is a str, '1\.5' \(text is not taken"),
])
def test_object_arrays_pass_only_if_every_element_is_a_real_number(a, pattern):
    with pytest.raises(NotNumericError, match=pattern) as err:
        check_real(a, "X", allow_object=True)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="X must be numeric; got an object array"):
        check_real(a, "X")  # where numbers are needed as such (the metrics), never converted
    from fractions import Fraction

    check_real(np.array([[Fraction(1, 3), 2, np.float32(0.5), True]], dtype=object), "X",
               allow_object=True)
    with pytest.raises(ValueError, match=r"X contains 1 non-finite value\(s\).*index \(0, 1\)"):
        check_real(np.array([[1.0, float("nan")]], dtype=object), "X", allow_object=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_norms_refuse_overflow_and_underflow_exactly_where_normalizing_fails(dtype):
    info, D = torch.finfo(dtype), 4
    limit, floor = np.sqrt(float(info.max) / D), np.sqrt(float(info.tiny))
    name = str(dtype).replace("torch.", "")
    ok = torch.tensor([[limit * 0.99] * D, [floor * 1.01] + [0.0] * (D - 1), [0.0] * D,
                       [1.0, -2.0, 3.0, 0.5]], dtype=torch.float64)
    check_row_norms(ok, "X", dtype)  # rows of zeros are left to the caller
    Z = ok[[0, 1, 3]].to(dtype)
    norms = (Z / Z.norm(dim=1, keepdim=True)).norm(dim=1)
    np.testing.assert_allclose(norms.double().numpy(), 1.0, rtol=4 * float(info.eps))
    cases = [(limit * 1.01, rf"X overflows {name}: row 1 has values up to .* that square to "
                            rf"more than the largest {name}"),
             (floor * 0.99, rf"X underflows {name}: row 1 has values of at most"),
             (1e-300, rf"X underflows {name}")]
    if dtype == torch.float32:
        cases.append((1e39, r"X overflows float32: row 1 has values up to 1e\+39 that exceed "
                            r"the largest float32"))
    for value, pattern in cases:
        bad = ok.clone()
        bad[1, 0] = value
        with pytest.raises(ValueError, match=pattern):
            check_row_norms(bad, "X", dtype)


def test_standardization_statistics_refuse_overflow_and_underflow():
    X = torch.tensor([[1.0, 2.0, 5.0], [3.0, 2.0, 6.0]], dtype=torch.float64)
    mean, scale = X.mean(0).numpy(), X.std(0, correction=0).numpy()
    check_standardization(mean, scale, "X", X)  # a constant column (scale 0) is fine
    big = X * 1e300
    with pytest.raises(ValueError, match=r"X overflows float64 when standardized: the variance "
                                         r"of column 0 \(values up to 3e\+300\)"):
        check_standardization(big.mean(0).numpy(), big.std(0, correction=0).numpy(), "X", big)
    with pytest.raises(ValueError, match=r"the mean of column 1"):
        check_standardization(np.array([0.0, np.inf]), np.array([1.0, 1.0]), "X")
    tiny = X * 1e-300
    with pytest.raises(ValueError, match=r"X underflows float64 when standardized: column 0 "
                                         r"varies, but its standard deviation 0 "):
        check_standardization(tiny.mean(0).numpy(), tiny.std(0, correction=0).numpy(), "X", tiny)
    with pytest.raises(ValueError, match="underflows float64"):  # subnormal: digits lost
        check_standardization(mean, np.array([1e-160, 0.0, 1.0]), "X")


# --- DeepRFM takes its input through the same checks -----------------------------------------


def _rfm_data():
    rng = np.random.default_rng(3)
    return rng.standard_normal((30, 4)), np.arange(30) % 3


def _refusal(X, y, **params) -> BaseException:
    from agop.models.deep_rfm import DeepRFM

    with pytest.raises((ValueError, TypeError)) as err:
        DeepRFM(depth=1, width=16, device="cpu", **params).fit(X, y)
    assert "\n" not in str(err.value), str(err.value)
    return err.value


def test_deep_rfm_refuses_complex_and_non_numeric_objects_in_one_line():
    X, y = _rfm_data()
    for Xc in (X + 1j, torch.from_numpy(X + 1j)):
        err = _refusal(Xc, y)
        assert isinstance(err, ValueError) and "X must be real-valued" in str(err)
    for element in (None, {"a": 1}, 1j, "text"):
        Xo = X.astype(object)
        Xo[2, 1] = element
        err = _refusal(Xo, y)
        assert isinstance(err, ValueError) and "X[2, 1] is a" in str(err), str(err)


def test_deep_rfm_takes_object_arrays_of_numbers_as_the_numbers():
    from agop.models.deep_rfm import DeepRFM

    X, y = _rfm_data()
    a = DeepRFM(depth=1, width=16, device="cpu", dtype="float64").fit(X, y)
    b = DeepRFM(depth=1, width=16, device="cpu", dtype="float64").fit(X.astype(object), y)
    np.testing.assert_array_equal(a.decision_function(X), b.decision_function(X))


@pytest.mark.parametrize("standardize", [True, False])
def test_deep_rfm_names_overflow_and_underflow_not_zero_rows(standardize):
    X, y = _rfm_data()
    for scale, word in ((1e300, "overflows"), (1e-300, "underflows")):
        msg = str(_refusal(X * scale, y, standardize=standardize))
        assert word in msg and "all zeros" not in msg, msg
    if standardize:  # standardized features are O(1): any scale a float64 holds works
        from agop.models.deep_rfm import DeepRFM

        ref = DeepRFM(depth=1, width=16, device="cpu").fit(X, y).predict(X)
        for scale in (1e-100, 1e100):
            model = DeepRFM(depth=1, width=16, device="cpu").fit(X * scale, y)
            np.testing.assert_array_equal(model.predict(X * scale), ref)
            msg = str(pytest.raises(ValueError, model.predict, X * 1e300).value)
            assert "X after standardization overflows float32" in msg, msg
