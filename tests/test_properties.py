"""Property-based tests over the public entry points.

Any input (shapes, float32 or float64, NaN or inf, duplicate rows, constant columns, one class,
tiny and huge scales) either gives finite numbers that satisfy the quantity's own invariants and
agree with an independent computation, or raises ValueError/TypeError with a one-line message:
never another exception from deep inside, never a silent wrong number.

Covered: :func:`agop.collapse.measure`, :class:`agop.collapse.CollapseAccumulator`,
:func:`agop.kernel_agop`, :func:`agop.kernel_ridge`, :meth:`agop.DeepRFM.fit` (and what
``agop rfm`` records of it), :func:`agop.layer_agops` on a small MLP. Bounded: at most 150
examples each, derandomized (the same examples on every run), the whole file in about 20 s with
one thread. ``--hypothesis-show-statistics`` lists what the examples computed or refused.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agop import collapse
from agop.agop import kernel_agop
from agop.kernels import LaplaceKernel
from agop.solve import kernel_ridge

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# Scales every entry point meets besides 1 (half the examples): features near the float64
# limits, and near float32's.
SCALES = [1e-300, 1e-30, 1e-8, 1e8, 1e30, 1e300]


@st.composite
def matrices(draw, *, min_rows: int = 1, max_rows: int = 10, max_cols: int = 4,
             cols: int | None = None, bad: bool = True, scales=SCALES,
             grid: bool = False) -> np.ndarray:
    """An N × D float64 or float32 array (D = ``cols`` if given): moderate values (with
    ``grid``, multiples of 1/8: rows equal or well apart), then (each maybe) a duplicated row,
    a constant column, a scale from ``scales`` and, with ``bad``, one NaN or ±inf entry."""
    N = draw(st.integers(min_rows, max_rows))
    D = cols if cols is not None else draw(st.integers(1, max_cols))
    values = (st.integers(-32, 32).map(lambda k: k / 8) if grid
              else st.floats(-4, 4, width=64))
    X = draw(hnp.arrays(np.float64, (N, D), elements=values, fill=st.nothing()))
    if N > 1 and draw(st.booleans()):
        X[draw(st.integers(0, N - 1))] = X[draw(st.integers(0, N - 1))]
    if draw(st.integers(0, 3)) == 3:
        X[:, draw(st.integers(0, D - 1))] = draw(st.floats(-4, 4))
    X = X * draw(st.one_of(st.just(1.0), st.sampled_from(scales)))
    if bad and draw(st.integers(0, 9)) == 9:  # hypothesis favours 0: the usual case
        X[draw(st.integers(0, N - 1)), draw(st.integers(0, D - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf]))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    with np.errstate(over="ignore", under="ignore"):
        return X.astype(dtype)  # 1e300 becomes inf in float32: a non-finite input to refuse


def labels(draw, N: int, max_classes: int = 4) -> np.ndarray:
    """N labels in 0..K−1, (i + a shift drawn per sample) mod K: every class present when the
    shifts are 0 (hypothesis's simplest case), any labelling otherwise; K = 1 (one class) one
    time in eight."""
    K = 1 if draw(st.integers(0, 7)) == 7 else draw(st.integers(2, max_classes))
    shift = draw(st.lists(st.integers(0, K - 1), min_size=N, max_size=N))
    return (np.arange(N) + np.array(shift, dtype=np.int64)) % K


def refused(exc: BaseException) -> None:
    """The only acceptable failure: a ValueError or TypeError that says, in one line, why."""
    assert isinstance(exc, (ValueError, TypeError)), (
        f"{type(exc).__name__} from deep inside: {exc}")
    msg = str(exc).strip()
    assert msg and "\n" not in msg, f"{type(exc).__name__} without a one-line message: {msg!r}"


def attempt(fn, *args, **kwargs):
    """fn(*args, **kwargs), or None after checking that its failure is a proper refusal.

    Overflow, division by zero and invalid operations in numpy are errors here: a metric that
    computed through an inf or a NaN is a silent wrong number, not a result.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with np.errstate(over="raise", divide="raise", invalid="raise"):
                out = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any other type is the defect under test
        refused(exc)
        event(f"refused: {str(exc)[:48]}")  # --hypothesis-show-statistics lists what was tried
        return None
    event("computed")
    return out


def finite(X) -> bool:
    return bool(np.isfinite(np.asarray(X, dtype=np.float64)).all())


def normalized(X) -> np.ndarray:
    """X as float64 times an exact power of two that brings max |x| near 1 (for the direct
    computations, which would overflow where the library may not)."""
    X = np.asarray(X, dtype=np.float64)
    big = np.abs(X).max()
    return X if big == 0 else np.ldexp(X, -math.frexp(big)[1])


# --- collapse metrics ---------------------------------------------------------------------


METRICS = ("nc1", "nc1_authors", "nc1_pinv", "cdnv", "nc2", "nc2_squared", "nc2_orthogonal",
           "within_total", "between_total", "equinorm", "equiangular")
NONNEGATIVE = ("nc1", "nc1_authors", "nc1_pinv", "cdnv", "nc2", "nc2_squared", "nc2_orthogonal",
               "equinorm", "equiangular")


def check_metric_invariants(m: dict[str, float], K: int, strict: bool) -> None:
    assert tuple(m) == METRICS
    for name, v in m.items():
        assert isinstance(v, float), name
        assert math.isfinite(v) or (not strict and math.isnan(v)), (name, v)
    for name in NONNEGATIVE:
        assert not m[name] < 0, (name, m[name])
    nc1, nc2 = m["nc1"], m["nc2"]
    if not math.isnan(nc1):
        assert m["nc1_authors"] == pytest.approx(nc1 / K, rel=1e-12)
        assert m["within_total"] == pytest.approx(nc1 / (1 + nc1), rel=1e-9, abs=1e-15)
        assert m["within_total"] + m["between_total"] == pytest.approx(1.0, abs=1e-12)
        assert 0 <= m["within_total"] <= 1 and 0 <= m["between_total"] <= 1
    if not math.isnan(nc2):
        assert m["nc2_squared"] == pytest.approx(K**2 * nc2**2, rel=1e-9, abs=1e-300)
        assert nc2 <= 2 / K + 1e-12  # ‖H̄H̄ᵀ‖_F ≤ K and ‖Σ_ETF‖_F ≤ K for unit rows
    if not math.isnan(m["equiangular"]):
        assert m["equiangular"] <= 1 + 1e-12  # a std of cosines
    if not math.isnan(m["nc2_orthogonal"]):
        assert m["nc2_orthogonal"] <= (K + math.sqrt(K)) / K**2 + 1e-12
    if not math.isnan(m["equinorm"]):
        assert m["equinorm"] <= math.sqrt(K - 1) + 1e-12  # a coefficient of variation


def direct_nc1(H, y, K) -> float:
    """tr Σ_W / tr Σ_B with plain numpy loops (μ_G the mean of the class means)."""
    H = normalized(H)
    means = np.stack([H[y == c].mean(0) for c in range(K)])
    tr_w = sum(np.sum((H[y == c] - means[c]) ** 2) for c in range(K)) / len(y)
    return tr_w / (np.sum((means - means.mean(0)) ** 2) / K)


@st.composite
def labelled_features(draw):
    H = draw(matrices())
    y = labels(draw, H.shape[0])
    return (torch.from_numpy(H) if draw(st.booleans()) else H), y


@settings(max_examples=150, **SETTINGS)
@given(data=labelled_features())
def test_measure_gives_invariant_numbers_or_a_refusal(data):
    H, y = data
    K = int(y.max()) + 1
    loose = attempt(collapse.measure, H, y, strict=False)
    strict = attempt(collapse.measure, H, y)
    if loose is None:  # bad input (NaN, one class, an empty class): refused either way
        assert strict is None
        assert not finite(H) or len(np.unique(y)) < max(K, 2)
        return
    assert finite(H) and len(np.unique(y)) == K >= 2
    check_metric_invariants(loose, K, strict=False)
    if strict is not None:
        check_metric_invariants(strict, K, strict=True)
        assert strict == loose
    else:  # strict refuses exactly when some metric is undefined
        assert any(math.isnan(v) for v in loose.values())
    if not math.isnan(loose["nc1"]):
        expected = direct_nc1(H, y, K)
        # the centered means of nearly coinciding classes cancel: compare to their rounding
        assert loose["nc1"] == pytest.approx(expected, rel=1e-6)


@settings(max_examples=120, **SETTINGS)
@given(data=labelled_features(), cuts=st.lists(st.floats(0, 1), max_size=4),
       merge=st.booleans())
def test_accumulator_agrees_with_measure_or_refuses(data, cuts, merge):
    H, y = data
    K = int(y.max()) + 1
    N = len(y)
    bounds = sorted({int(round(c * N)) for c in cuts} | {0, N})

    def streamed():
        accs = [collapse.CollapseAccumulator(K, H.shape[1])]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if merge:
                accs.append(collapse.CollapseAccumulator(K, H.shape[1]))
            accs[-1].update(H[a:b], y[a:b])
        acc = accs[0]
        for other in accs[1:]:
            acc.merge(other)
        return acc.compute(strict=False)

    got = attempt(streamed)
    expected = attempt(collapse.measure, H, y, strict=False)
    if got is None:
        return  # refused (bad input, one class, or features beyond the accumulator's window)
    assert expected is not None, "the accumulator gave numbers where measure refused"
    check_metric_invariants(got, K, strict=False)
    for name, v in got.items():
        assert math.isnan(v) == math.isnan(expected[name]), name
        if math.isnan(v):
            continue
        # nc1_pinv agrees to its stated tolerance, a fraction of NC1 (docs/collapse.md)
        floor = 1e-9 * got["nc1"] if name == "nc1_pinv" else 1e-12
        assert v == pytest.approx(expected[name], rel=1e-8, abs=floor), name


# --- kernel AGOP and kernel ridge ---------------------------------------------------------

# Scales at which the squared distances of the kernels neither overflow nor underflow in
# float32, and points on a grid (equal or well apart); beyond them see the xfail tests below
# (defects of agop.kernels / agop.agop that these tests found).
KERNEL_SCALES = [1e-4, 1e4]


def autograd_agop(C: torch.Tensor, coef: torch.Tensor, P: torch.Tensor, L: float) -> np.ndarray:
    """(1/n) Σ_i J_iᵀ J_i of f(x) = Σ_j coef_j exp(−‖x − c_j‖/L), J_i by autograd (float64)."""
    C, coef, P = (t.to(torch.float64) for t in (C, coef, P))

    def f(x):
        return torch.exp(-torch.linalg.vector_norm(x - C, dim=1) / L) @ coef

    J = [torch.autograd.functional.jacobian(f, p) for p in P]  # K × D each
    return (sum(j.T @ j for j in J) / len(J)).numpy()


@st.composite
def agop_inputs(draw):
    C = draw(matrices(max_rows=8, scales=KERNEL_SCALES, grid=True))
    N, D = C.shape
    K = draw(st.integers(1, 3))
    coef = draw(hnp.arrays(np.float64, (N, K), elements=st.floats(-3, 3, width=64)))
    coef = coef.astype(C.dtype)
    points = None
    if draw(st.booleans()):
        points = draw(matrices(max_rows=6, cols=D, bad=False, scales=KERNEL_SCALES, grid=True))
        points = points.astype(C.dtype)
    method = draw(st.sampled_from(["auto", "direct", "gram"]))
    L = draw(st.sampled_from([0.5, 2.0, 10.0]))
    return C, coef, points, method, L


@settings(max_examples=50, **SETTINGS)
@given(inputs=agop_inputs())
def test_kernel_agop_is_a_psd_matrix_equal_to_autograd_or_a_refusal(inputs):
    C, coef, points, method, L = inputs
    Ct, At = torch.from_numpy(C), torch.from_numpy(coef)
    Pt = None if points is None else torch.from_numpy(points)
    M = attempt(kernel_agop, LaplaceKernel(L), Ct, At, Pt, method=method)
    if M is None:
        return
    assert finite(C) and finite(coef) and (points is None or finite(points))
    D = C.shape[1]
    M = M.to(torch.float64).numpy()
    assert M.shape == (D, D) and np.isfinite(M).all()
    scale = np.abs(M).max()
    np.testing.assert_allclose(M, M.T, rtol=0, atol=1e-5 * scale)
    assert np.linalg.eigvalsh((M + M.T) / 2).min() >= -1e-5 * max(np.trace(M), 1e-300)
    if points is None:  # the self terms dropped: the two exact algorithms must agree
        if C.dtype == np.float64:
            other = "gram" if method == "direct" else "direct"
            M2 = kernel_agop(LaplaceKernel(L), Ct, At, method=other)
            np.testing.assert_allclose(M, M2.numpy(), rtol=1e-8, atol=1e-10 * scale)
        return
    dist = torch.cdist(Pt.double(), Ct.double())
    if float(dist.min()) < 1e-6 * max(float(dist.max()), 1e-300):
        return  # a point on a center: the Laplace kernel's cusp, no gradient to compare
    expected = autograd_agop(Ct, At, Pt, L)
    tol = 1e-10 if C.dtype == np.float64 else 1e-4
    np.testing.assert_allclose(M, expected, rtol=tol, atol=tol * np.abs(expected).max())


@st.composite
def ridge_inputs(draw):
    X = draw(matrices(max_rows=9, scales=KERNEL_SCALES))
    K = draw(st.integers(1, 3))
    Y = draw(hnp.arrays(np.float64, (X.shape[0], K), elements=st.floats(-2, 2, width=64)))
    ridge = draw(st.sampled_from([0.0, 0.0, 1e-8, 1e-3, 1.0]))
    return X, Y.astype(X.dtype), ridge, draw(st.booleans())


@settings(max_examples=50, **SETTINGS)
@given(inputs=ridge_inputs())
def test_kernel_ridge_solves_what_it_reports_or_refuses(inputs):
    X, Y, ridge, vector = inputs
    Xt = torch.from_numpy(X)
    Kmat = attempt(LaplaceKernel(2.0), Xt)
    if Kmat is None:
        return
    if finite(X):  # a kernel matrix: symmetric (to rounding), entries in [0, 1], unit diagonal
        Kd = Kmat.to(torch.float64)
        assert torch.isfinite(Kd).all() and bool(((Kd >= 0) & (Kd <= 1)).all())
        assert bool((Kd.diagonal() == 1).all())
        assert float((Kd - Kd.T).abs().max()) <= 10 * float(torch.finfo(Kmat.dtype).eps)
    Yt = torch.from_numpy(Y[:, 0] if vector else Y)
    Y = Y[:, :1] if vector else Y
    res = attempt(kernel_ridge, Kmat, Yt, ridge)
    if res is None:
        assert not (finite(Kmat) and finite(Y))  # a finite kernel matrix is PSD: solvable
        return
    assert res.coef.shape == Yt.shape
    # the input's dtype, or float64 where the solve was refined or factored in float64
    assert res.coef.dtype in (Kmat.dtype, torch.float64)
    assert res.jitter >= 0 and res.ridge == ridge and res.dtype in ("float32", "float64")
    a = res.coef.to(torch.float64).reshape(len(X), -1)
    assert torch.isfinite(a).all()
    A = Kmat.to(torch.float64) + (ridge + res.jitter) * torch.eye(len(X), dtype=torch.float64)
    # Cholesky is backward stable: α solves the reported system to rounding, however
    # ill-conditioned (duplicate rows) it is; ε of the coarser of input and factor dtypes
    eps = float(torch.finfo(Kmat.dtype).eps)
    resid = torch.linalg.matrix_norm(A @ a - torch.from_numpy(Y).to(torch.float64))
    bound = 10 * len(X) * eps * (torch.linalg.matrix_norm(A, 2) * torch.linalg.matrix_norm(a)
                                 + np.linalg.norm(Y))
    assert float(resid) <= float(bound)


@pytest.mark.xfail(strict=False, reason="found by the property tests, not fixed here (agop/"
                   "kernels.py): the squared distances ‖x‖² + ‖z‖² − 2xᵀz overflow (float32 |x| "
                   "≳ 1e19, float64 ≳ 1e154), so the kernel matrix and kernel_agop are NaN "
                   "without an error")
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e20), (torch.float64, 1e200)])
def test_kernels_of_huge_finite_features_are_finite_or_refused(dtype, scale):
    X = (torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=torch.float64) * scale)
    X = X.to(dtype)
    for fn in (lambda: LaplaceKernel(2.0)(X),
               lambda: kernel_agop(LaplaceKernel(2.0), X, torch.ones(3, 1, dtype=dtype))):
        out = attempt(fn)
        assert out is None or bool(torch.isfinite(out).all())


@pytest.mark.xfail(strict=False, reason="found by the property tests, not fixed here (agop/"
                   "kernels.py): at |x| ~ 1e-200 (float64; 1e-30 in float32) the squared "
                   "distances underflow to 0, the Laplace gradient weights are set to 0 there, "
                   "and "
                   "kernel_agop returns 0 instead of an AGOP of size 1/L²")
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-30), (torch.float64, 1e-200)])
def test_kernel_agop_of_tiny_features_is_not_zero(dtype, scale):
    C = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    P = torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    coef = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    # the limit s → 0 of the AGOP at s·C, s·P: k → 1, ∇k → −(x − c)/(L ‖x − c‖), scale-free
    U = P[:, None, :] - C[None, :, :]
    U = U / torch.linalg.vector_norm(U, dim=2, keepdim=True)
    G = -(U * coef[None, :, 0, None]).sum(1) / 2.0  # n × D, one output
    expected = (G.T @ G / len(P)).numpy()
    M = kernel_agop(LaplaceKernel(2.0), (C * scale).to(dtype), coef.to(dtype),
                    (P * scale).to(dtype))
    np.testing.assert_allclose(M.double().numpy(), expected, rtol=1e-3)


@pytest.mark.xfail(strict=False, reason="found by the property tests, not fixed here (agop/"
                   "agop.py): centers much closer than their size (1e-12 apart near 1) give a "
                   "wrong AGOP: at 1e-12 the gram form is 1.7% off and the direct form 7e-5, at "
                   "4e-110 the gram form drops the pair and the direct form gives 5e185 (its "
                   "distance and difference are computed in different coordinates)")
@pytest.mark.parametrize("gap", [1e-12, 4e-110])
@pytest.mark.parametrize("method", ["direct", "gram"])
def test_kernel_agop_of_nearly_duplicate_centers(gap, method):
    c = np.array([1.0, gap, 0.0])
    # in one dimension ∇k(p, c) = −sign(p − c)·exp(−|p − c|/L)/L: exact for any gap
    L = 0.5
    g = [sum(-np.sign(p - q) * np.exp(-abs(p - q) / L) / L for q in c if q != p) for p in c]
    expected = float(np.mean(np.square(g)))  # 2.8132 for gap 1e-12
    M = kernel_agop(LaplaceKernel(L), torch.from_numpy(c[:, None]),
                    torch.ones(3, 1, dtype=torch.float64), method=method)
    assert float(M[0, 0]) == pytest.approx(expected, rel=1e-6)


# --- Deep RFM ---------------------------------------------------------------------------------


@st.composite
def rfm_inputs(draw):
    X = draw(matrices(min_rows=2, max_rows=14, scales=[1e-300, 1e-30, 1e30, 1e300],
                      grid=True))
    y = labels(draw, X.shape[0], max_classes=3)
    params = dict(depth=draw(st.integers(1, 2)), width=draw(st.sampled_from([8, 16])),
                  dtype=draw(st.sampled_from(["float32", "float64"])),
                  standardize=draw(st.booleans()), ridge=draw(st.sampled_from([0.0, 1e-3])),
                  device="cpu")
    return X, y, params


def _measured(X, y, params):
    from agop.experiments.rfm import measure_fit
    from agop.models.deep_rfm import DeepRFM

    model = DeepRFM(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "recorded as NaN": checked below
        rows = measure_fit(model, X, y)
    return model, rows


@settings(max_examples=80, **SETTINGS)
@given(inputs=rfm_inputs())
def test_deep_rfm_fit_records_invariant_numbers_or_refuses(inputs):
    X, y, params = inputs
    out = attempt(_measured, X, y, params)
    if out is None:
        return
    model, rows = out
    assert finite(X) and len(np.unique(y)) >= 2
    K = len(model.classes_)
    assert [r["layer"] for r in rows if r["stage"] == "input"] == list(
        range(1, params["depth"] + 2))
    for r in rows:
        assert 0.0 <= r["train_acc"] <= 1.0 and r["test_acc"] is None
        m = {k: r[k] for k in METRICS}
        check_metric_invariants(m, K, strict=False)  # an undefined side metric: NaN, no error
    score = model.score(X, y)
    assert 0.0 <= score <= 1.0
    assert np.isfinite(model.decision_function(X)).all()


def test_deep_rfm_records_an_undefined_side_metric_as_nan_and_fits_on():
    # Class 0 is {v, −v}: its mean is 0, so nc2_orthogonal (which needs the direction of every
    # uncentered class mean) is undefined at layer 1; the MLP study records NaN there, and so
    # must Deep RFM, with a warning, fitting every layer.
    from agop.experiments.rfm import measure_fit
    from agop.models.deep_rfm import DeepRFM

    rng = np.random.default_rng(5)
    v = rng.standard_normal((10, 5))
    X = np.concatenate([v, -v, rng.standard_normal((20, 5)) + 3])
    y = np.repeat([0, 1, 2], [20, 10, 10])
    model = DeepRFM(depth=2, width=16, standardize=False, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = measure_fit(model, X, y)
    said = [str(w.message) for w in caught]
    assert ("collapse metrics ['nc2_orthogonal'] undefined at layer 1 input; recorded as NaN"
            in said)
    assert len(rows) == 2 * 3 + 1 and model.layers_done_ == 3
    first = rows[0]
    assert first["stage"] == "input" and math.isnan(first["nc2_orthogonal"])
    assert all(math.isfinite(first[k]) for k in METRICS if k != "nc2_orthogonal")
    assert rows[-1]["train_acc"] == model.score(X, y)


@settings(max_examples=40, phases=[Phase.explicit, Phase.generate], **SETTINGS)
@given(inputs=rfm_inputs())
@example(inputs=(np.array([[1.0, 0.0]] + [[1.0, 1.0]] * 9), np.array([0] * 9 + [1]),
                 dict(depth=1, width=8, dtype="float32", standardize=False, ridge=0.0,
                      device="cpu")))  # recorded 0.1, score 0.9
def test_deep_rfm_recorded_train_accuracy_is_what_score_gives(inputs):
    X, y, params = inputs
    out = attempt(_measured, X, y, params)
    if out is None:
        return
    model, rows = out
    assert rows[-1]["train_acc"] == model.score(X, y)


# --- layer AGOPs of an MLP --------------------------------------------------------------------


@st.composite
def mlp_inputs(draw):
    X = draw(matrices(max_rows=8, max_cols=4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    K = draw(st.integers(2, 3))
    as_tensor = draw(st.booleans())
    return X, dtype, K, as_tensor, draw(st.integers(0, 2**16))


def autograd_layer_agops(model: torch.nn.Sequential, X: torch.Tensor) -> list[np.ndarray]:
    """AGOP w.r.t. each Linear's input: (1/N) Σ_i J_iᵀJ_i with J_i = ∂f/∂x_l by autograd
    through the rest of the network (a float64 copy)."""
    net = [m.double() for m in _copy(model)]
    out, x = [], X.to(torch.float64)
    linear = [i for i, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
    for i, m in enumerate(net):
        if i in linear:
            tail = torch.nn.Sequential(*net[i:])
            J = [torch.autograd.functional.jacobian(tail, row) for row in x]  # K × D_l each
            out.append((sum(j.T @ j for j in J) / len(J)).numpy())
        x = m(x).detach()
    return out


def _copy(model):
    import copy

    return list(copy.deepcopy(model))


@settings(max_examples=30, **SETTINGS)
@given(inputs=mlp_inputs())
def test_layer_agops_of_an_mlp_are_psd_and_equal_autograd_or_a_refusal(inputs):
    from agop import layer_agops
    from agop.models.mlp import MLP

    X, dtype, K, as_tensor, seed = inputs
    model = MLP(X.shape[1], K, width=5, depth=2, init_scale=1.0,
                generator=torch.Generator().manual_seed(seed)).to(dtype).eval()
    Xin = torch.from_numpy(X) if as_tensor else X
    got = attempt(layer_agops, model, Xin)
    if got is None:
        return
    Xm = torch.as_tensor(X).to(dtype)
    assert torch.isfinite(Xm).all()
    got = list(got.values()) if isinstance(got, dict) else got
    expected = autograd_layer_agops(model, Xm)
    assert len(got) == len(expected) == 3  # two hidden layers and the readout
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for M, E in zip(got, expected):
        M = M.to(torch.float64).numpy()
        assert M.shape == E.shape and np.isfinite(M).all()
        scale = max(np.abs(E).max(), 1e-300)
        np.testing.assert_allclose(M, M.T, rtol=0, atol=1e-12 * scale)
        assert np.linalg.eigvalsh(M).min() >= -1e-10 * scale
        np.testing.assert_allclose(M, E, rtol=tol, atol=tol * scale)
