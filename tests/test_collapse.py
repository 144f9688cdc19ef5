"""Collapse metrics: exact special cases, invariances, and agreement with direct loops."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agop import collapse
from agop.collapse import CollapseAccumulator, gram, measure

KEYS = [
    "nc1", "nc1_authors", "nc1_pinv", "cdnv", "nc2", "nc2_squared", "nc2_orthogonal",
    "within_total", "between_total", "equinorm", "equiangular",
]


def simplex_etf(K: int, D: int, rng) -> np.ndarray:
    """K unit vectors in R^D (D ≥ K) with pairwise cosine −1/(K−1), summing to 0."""
    P = np.eye(K) - 1.0 / K
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    Q, _ = np.linalg.qr(rng.normal(size=(D, K)))
    return P @ Q.T


def rotation(D: int, rng) -> np.ndarray:
    Q, R = np.linalg.qr(rng.normal(size=(D, D)))
    return Q * np.sign(np.diag(R))


def labels_from_counts(counts, rng) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


def random_data(counts, D, rng, spread=1.0):
    y = labels_from_counts(counts, rng)
    means = rng.normal(size=(len(counts), D)) * 3
    return means[y] + spread * rng.normal(size=(len(y), D)), y


# Metrics bounded by O(1) whose value can be a rounding-level 0 (nc2 for K = 2, say) are compared
# with an absolute floor too; the ratio metrics (nc1, cdnv, …) are compared relatively only.
BOUNDED = {"nc2", "nc2_squared", "nc2_orthogonal", "within_total", "between_total", "equinorm",
           "equiangular"}


def assert_dicts_close(a, b, rtol):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rtol, abs=1e-14 if k in BOUNDED else 0), k


# --- exact special cases ------------------------------------------------------------------


@pytest.mark.parametrize("counts", [[4, 4, 4, 4, 4], [3, 1, 7, 2, 5]])
def test_simplex_etf_without_spread_is_fully_collapsed(counts):
    rng = np.random.default_rng(1)
    K, D = len(counts), 8
    y = labels_from_counts(counts, rng)
    offset = rng.normal(size=D)  # a global offset must be removed by the centering
    H = 2.5 * simplex_etf(K, D, rng)[y] + offset
    m = measure(H, y)
    for key in ["nc1", "nc1_authors", "nc1_pinv", "cdnv", "nc2", "nc2_squared", "within_total",
                "equinorm", "equiangular"]:
        assert abs(m[key]) < 1e-12, key
    assert m["between_total"] == pytest.approx(1.0, abs=1e-12)
    assert collapse.nc1(H, y) < 1e-12 and collapse.nc2(H, y) < 1e-12


def test_global_mean_is_the_mean_of_class_means():
    # Imbalanced collapsed ETF: centering by the mean of all samples would leave the centered
    # means off the ETF; the documented convention (mean of class means) gives exactly 0.
    rng = np.random.default_rng(2)
    counts, K, D = [1, 9, 2, 6], 4, 5
    y = labels_from_counts(counts, rng)
    H = simplex_etf(K, D, rng)[y]
    assert collapse.nc2(H, y) < 1e-12
    means = np.stack([H[y == c].mean(0) for c in range(K)])
    Hbar = means - H.mean(0)
    Hbar /= np.linalg.norm(Hbar, axis=1, keepdims=True)
    etf = K / (K - 1) * np.eye(K) - 1 / (K - 1)
    assert np.linalg.norm(Hbar @ Hbar.T - etf) / K**2 > 1e-2


def test_orthogonal_frames_versus_simplex():
    rng = np.random.default_rng(3)
    K, D = 4, 7
    y = labels_from_counts([2, 3, 2, 4], rng)
    Q, _ = np.linalg.qr(rng.normal(size=(D, K)))
    scaled = Q.T * np.array([1.0, 2.0, 3.0, 4.0])[:, None]  # orthogonal, unequal norms
    assert collapse.nc2_orthogonal(scaled[y], y) < 1e-12
    assert collapse.nc2(scaled[y], y) > 1e-2  # centering breaks orthogonality: not an ETF
    # Orthogonal means of equal norm, centered, are exactly a simplex ETF.
    assert collapse.nc2(Q.T[y], y) < 1e-12
    # A simplex ETF is not orthogonal: ‖Σ_ETF − I‖_F = √(K/(K−1)).
    etf = simplex_etf(K, D, rng)
    assert collapse.nc2_orthogonal(etf[y], y) == pytest.approx(np.sqrt(K / (K - 1)) / K**2,
                                                              rel=1e-12)


def test_two_classes_always_form_an_etf():
    rng = np.random.default_rng(4)
    H, y = random_data([5, 9], 6, rng)
    assert collapse.nc2(H, y) < 1e-12
    assert collapse.equiangular(H, y) < 1e-12


def test_collapsed_gram_is_block_structured():
    rng = np.random.default_rng(5)
    K, D = 4, 6
    y = labels_from_counts([3, 2, 4, 1], rng)
    H = simplex_etf(K, D, rng)[y] + rng.normal(size=D)
    G, order = gram(H, y)
    ys = y[order]
    expected = np.where(ys[:, None] == ys[None, :], 1.0, -1.0 / (K - 1))
    np.testing.assert_allclose(G, expected, atol=1e-12)


# --- agreement with direct computations ---------------------------------------------------


def direct_scatters(H, y, K):
    """Σ_W and Σ_B as explicit D × D matrices, sample by sample."""
    N, D = H.shape
    means = [sum(H[i] for i in range(N) if y[i] == c) / np.sum(y == c) for c in range(K)]
    mu_G = sum(means) / K
    Sw = np.zeros((D, D))
    for i in range(N):
        d = H[i] - means[y[i]]
        Sw += np.outer(d, d)
    Sb = sum(np.outer(m - mu_G, m - mu_G) for m in means) / K
    return Sw / N, Sb, means, mu_G


@pytest.mark.parametrize(
    "counts, D", [([6, 6, 6], 5), ([2, 11, 4, 7, 1], 9), ([3, 5, 4, 2, 6, 3], 3)]  # D < K − 1 too
)
def test_trace_metrics_match_explicit_scatter_matrices(counts, D):
    rng = np.random.default_rng(6)
    H, y = random_data(counts, D, rng)
    K = len(counts)
    Sw, Sb, _, _ = direct_scatters(H, y, K)
    m = measure(H, y)
    tw, tb = np.trace(Sw), np.trace(Sb)
    assert m["nc1"] == pytest.approx(tw / tb, rel=1e-12)
    assert m["nc1_authors"] == pytest.approx(np.trace(Sw / K) / tb, rel=1e-12)
    assert m["within_total"] == pytest.approx(tw / np.trace(Sw + Sb), rel=1e-12)
    assert m["between_total"] == pytest.approx(tb / np.trace(Sw + Sb), rel=1e-12)
    assert m["within_total"] + m["between_total"] == pytest.approx(1.0, abs=1e-14)
    pinv = np.linalg.pinv(Sb, rtol=1e-10, hermitian=True)
    assert m["nc1_pinv"] == pytest.approx(np.trace(Sw @ pinv) / K, rel=1e-9)


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_nc1_pinv_with_collinear_means_uses_only_their_line(offset):
    # Class means exactly on a line through μ_G: Σ_B = s² v vᵀ / K has rank 1, so
    # tr(Σ_W Σ_B⁺)/K = vᵀ Σ_W v / s² with s² = Σ_c (t_c − t̄)². A large offset adds round-off
    # directions to the centered means that must not count as between-class directions.
    rng = np.random.default_rng(21)
    K, D = 4, 5
    y = labels_from_counts([5, 3, 6, 4], rng)
    v = rng.normal(size=D)
    v /= np.linalg.norm(v)
    t = np.array([-2.0, -0.5, 1.0, 3.0])
    noise = rng.normal(size=(len(y), D))
    for c in range(K):
        noise[y == c] -= noise[y == c].mean(0)  # class means stay exactly t_c v
    H = (t[:, None] * v)[y] + 0.1 * noise
    Sw = direct_scatters(H, y, K)[0]
    expected = v @ Sw @ v / np.sum((t - t.mean()) ** 2)
    got = collapse.nc1_pinv(H + offset * rng.normal(size=D), y)
    assert got == pytest.approx(expected, rel=1e-7 if offset else 1e-12)


def _low_rank_features(seed, rank, n=100, K=10, D=64, offset=3.0, spread=0.5):
    """Float32 features whose class means span exactly ``rank`` directions (before rounding).

    Class means = offset·|g| (a positive common part, as after a ReLU) + T_c Vᵀ with V (D ×
    rank) orthonormal; within-class noise exactly centred per class, so the float64 Σ_B of the
    exact means, (T − T̄)ᵀ(T − T̄)/K in the basis V, is known. Returns (H32, y, V, T).
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(K), n))
    V = np.linalg.qr(rng.normal(size=(D, rank)))[0]
    T = 2.0 * rng.normal(size=(K, rank))
    means = offset * np.abs(rng.normal(size=D)) + T @ V.T
    noise = spread * rng.normal(size=(len(y), D))
    for c in range(K):
        noise[y == c] -= noise[y == c].mean(0)
    return (means[y] + noise).astype(np.float32), y, V, T


def _pinv_paths(H, y, K):
    """nc1_pinv in memory, streamed in batches of 1000, 128 and 7 rows, with two threads,
    and merged from three accumulators in two orders."""
    values = {"measure": collapse.nc1_pinv(H, y)}
    for rows in (1000, 128, 7):
        acc = CollapseAccumulator(K, H.shape[1])
        for i in range(0, len(y), rows):
            acc.update(H[i:i + rows], y[i:i + rows])
        values[f"batches of {rows}"] = acc.compute()["nc1_pinv"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        acc = CollapseAccumulator(K, H.shape[1])
        for i in range(0, len(y), 128):
            acc.update(torch.from_numpy(H[i:i + 128]), y[i:i + 128])
        values["two threads"] = acc.compute()["nc1_pinv"]
    finally:
        torch.set_num_threads(threads)
    part = np.random.default_rng(0).integers(0, 3, size=len(y))
    accs = [CollapseAccumulator(K, H.shape[1]) for _ in range(3)]
    for r, acc in enumerate(accs):
        acc.update(H[part == r], y[part == r])
    values["merged 2, 0, 1"] = (CollapseAccumulator.from_state(accs[2].state())
                                .merge(accs[0]).merge(accs[1]).compute()["nc1_pinv"])
    values["merged 0, 1, 2"] = accs[0].merge(accs[1]).merge(accs[2]).compute()["nc1_pinv"]
    return values


@pytest.mark.parametrize("seed, rank", [(0, 1), (1, 1), (2, 3)])
def test_nc1_pinv_of_float32_low_rank_means_inverts_only_their_span(seed, rank):
    # The float32 rounding of the features leaves directions with singular values
    # ~1e-7 in the centered class means; inverting them gave nc1_pinv ~1e15, and a streamed
    # scatter's rounding divided by those s² gave values of either sign that changed with the
    # batch size and the thread count. Independent value: the float64 pseudo-inverse of the
    # exact Σ_B (rank ``rank``, known from the construction) and Σ_W of the float32 data.
    K = 10
    H, y, V, T = _low_rank_features(seed, rank, K=K)
    H64 = H.astype(np.float64)
    Sw = direct_scatters(H64, y, K)[0]
    Tc = T - T.mean(0)
    Sb = V @ (Tc.T @ Tc / K) @ V.T  # D × D, rank ``rank`` exactly
    expected = np.trace(Sw @ np.linalg.pinv(Sb, rtol=1e-8, hermitian=True)) / K
    S = np.linalg.svd(np.stack([H64[y == c].mean(0) for c in range(K)])
                      - np.mean([H64[y == c].mean(0) for c in range(K)], axis=0),
                      compute_uv=False)
    assert 0 < S[rank] < 1e-6 * S[0]  # rounding directions are there to be dropped
    nc1 = collapse.nc1(H, y)
    values = _pinv_paths(H, y, K)
    for where, v in values.items():
        assert v >= 0, where
        # the float32 rounding moves the means' span by ~1e-7 relative
        assert v == pytest.approx(expected, rel=1e-5), where
        assert abs(v - values["measure"]) <= 1e-10 * nc1, where  # the stated agreement


def test_nc1_pinv_is_never_negative_where_sigma_w_vanishes_along_the_means():
    # Within-class spread 1e3 orthogonal to the class means, plus mean directions of size 1e-10
    # (below the cutoff): the true value along the kept direction is 0, and a streamed
    # scatter's rounding there is ±1e-13; it must not come out negative, in any batching.
    rng = np.random.default_rng(31)
    K, D = 10, 32
    y = rng.permutation(np.repeat(np.arange(K), 100))
    Q = np.linalg.qr(rng.normal(size=(D, D)))[0]
    means = (1e3 * np.abs(rng.normal(size=D)) + np.outer(2 * rng.normal(size=K), Q[:, 0])
             + 1e-10 * rng.normal(size=(K, 5)) @ Q[:, 1:6].T)
    noise = 1e3 * rng.normal(size=(len(y), D - 6)) @ Q[:, 6:].T
    for c in range(K):
        noise[y == c] -= noise[y == c].mean(0)
    H = means[y] + noise
    nc1 = collapse.nc1(H, y)
    for where, v in _pinv_paths(H, y, K).items():
        assert 0 <= v <= 1e-12 * nc1, where


def test_nc1_pinv_cutoff_follows_the_features_dtype():
    # Few samples and a large common part: √(1000·N·ε)·s_max alone would keep the float32
    # rounding directions of these means; the features' own precision must drop them, in
    # memory and streamed (the accumulator keeps the coarsest dtype it was fed, in its state).
    K = 10
    H, y, V, T = _low_rank_features(5, 1, n=3, K=K, offset=1e3, spread=1e-3)
    H64 = H.astype(np.float64)
    Tc = T - T.mean(0)
    Sb = V @ (Tc.T @ Tc / K) @ V.T
    expected = np.trace(direct_scatters(H64, y, K)[0] @ np.linalg.pinv(Sb, rtol=1e-8,
                                                                       hermitian=True)) / K
    got = collapse.nc1_pinv(H, y)
    assert got == pytest.approx(expected, rel=1e-3)
    # The same numbers handed in as float64 count as exact: their rounding directions are kept.
    assert collapse.nc1_pinv(H64, y) > 1e3 * expected
    acc = CollapseAccumulator(K, H.shape[1])
    acc.update(H64[:7], y[:7])  # float64 first: the coarsest dtype seen still wins
    acc.update(torch.from_numpy(H[7:]), y[7:])
    assert float(acc.state()["input_eps"]) == np.finfo(np.float32).eps
    assert acc.compute()["nc1_pinv"] == pytest.approx(got, rel=1e-9)
    back = CollapseAccumulator.from_state(acc.state())
    assert back.compute()["nc1_pinv"] == pytest.approx(got, rel=1e-9)
    exact = CollapseAccumulator(K, H.shape[1])
    exact.update(H64, y)
    assert exact.compute()["nc1_pinv"] > 1e3 * expected
    assert exact.merge(back).compute()["nc1_pinv"] < 2 * expected  # merge keeps float32's ε


def test_nc1_pinv_refuses_means_that_differ_only_at_the_features_rounding():
    # float32 features near 1e3 whose class means differ by one float32 step (6.1e-5): above
    # the float64 rounding of the means, below the features' own precision.
    step = float(np.spacing(np.float32(1e3)))
    y = np.repeat(np.arange(3), 4)
    H = np.full((12, 8), 1e3, dtype=np.float32)
    H[:, 0] += (y * step).astype(np.float32)
    with pytest.raises(ValueError, match="differ only at the rounding of the features"):
        collapse.nc1_pinv(H, y)
    values = measure(H, y, strict=False)
    assert np.isnan(values["nc1_pinv"]) and values["nc1"] == 0.0
    acc = CollapseAccumulator(3, 8)
    acc.update(H, y)
    assert np.isnan(acc.compute(strict=False)["nc1_pinv"])


def test_from_state_rejects_a_bad_input_eps():
    good = {"counts": np.array([2.0, 3.0]), "shifted_means": np.zeros((2, 3)),
            "sum_squares": np.ones(2)}
    for bad, message in [(0.0, "machine epsilon"), (1.5, "machine epsilon"),
                         (1.0, "machine epsilon"),
                         (np.nan, "NaN or inf"), (np.ones(2), r"has shape \(2,\)")]:
        with pytest.raises(ValueError, match=message):
            CollapseAccumulator.from_state({**good, "input_eps": np.asarray(bad)})


def test_extreme_scales_give_the_metrics_of_scale_one_or_a_refusal():
    # Every metric is scale-invariant. Before, features near 1e300 overflowed their squares
    # (NaN, or an OverflowError-like warning) and near 1e-160 lost digits silently.
    rng = np.random.default_rng(32)
    H, y = random_data([4, 5, 3], 3, rng)
    m, (G, _) = measure(H, y), gram(H, y)
    for scale in (2.0**-1000, 1e-300, 1e-160, 1e160, 1e300, 2.0**1000):
        assert_dicts_close(measure(H * scale, y), m, rtol=1e-12)
        np.testing.assert_allclose(gram(H * scale, y)[0], G, rtol=0, atol=1e-14)
        acc = CollapseAccumulator(3, 3)
        acc.update(H[:4], y[:4])
        with pytest.raises(ValueError, match="outside .*rescale the features"):
            acc.update(H[4:] * scale, y[4:])
        assert acc.count == 4  # a refused batch leaves the accumulator as it was
    # the largest finite scale: max |h| = 2^1023 must come down by 2^-1024 exactly (in two
    # steps); a factor off by even 2^10 leaves squares near 2^1040, which overflow
    top = H * (2.0**1023 / np.abs(H).max())
    assert np.isfinite(top).all() and np.abs(top).max() > 2.0**1022
    assert_dicts_close(measure(top, y), m, rtol=1e-12)
    np.testing.assert_allclose(gram(top, y)[0], G, rtol=0, atol=1e-14)


def test_cdnv_matches_double_loop():
    rng = np.random.default_rng(7)
    counts = [3, 8, 1, 5]
    H, y = random_data(counts, 4, rng)
    K = len(counts)
    mu = [H[y == c].mean(0) for c in range(K)]
    var = [np.mean([np.sum((h - mu[c]) ** 2) for h in H[y == c]]) for c in range(K)]
    pairs = [(var[a] + var[b]) / (2 * np.sum((mu[a] - mu[b]) ** 2))
             for a in range(K) for b in range(K) if a != b]
    assert collapse.cdnv(H, y) == pytest.approx(np.mean(pairs), rel=1e-12)


def test_nc2_family_matches_explicit_gram():
    rng = np.random.default_rng(8)
    counts = [4, 2, 6, 3, 5]
    H, y = random_data(counts, 7, rng)
    K = len(counts)
    means = np.stack([H[y == c].mean(0) for c in range(K)])
    Hbar = means - means.mean(0)
    norms = np.linalg.norm(Hbar, axis=1)
    Hbar = Hbar / norms[:, None]
    etf = (1 + 1 / (K - 1)) * np.eye(K) - np.ones((K, K)) / (K - 1)
    gap = Hbar @ Hbar.T - etf
    Hhat = means / np.linalg.norm(means, axis=1, keepdims=True)
    cosines = [Hbar[a] @ Hbar[b] for a in range(K) for b in range(a + 1, K)]
    m = measure(H, y)
    assert m["nc2"] == pytest.approx(np.sqrt(np.sum(gap**2)) / K**2, rel=1e-12)
    assert m["nc2_squared"] == pytest.approx(np.sum(gap**2) / K**2, rel=1e-12)
    assert m["nc2_squared"] == pytest.approx(K**2 * m["nc2"] ** 2, rel=1e-12)
    assert m["nc2_orthogonal"] == pytest.approx(
        np.sqrt(np.sum((Hhat @ Hhat.T - np.eye(K)) ** 2)) / K**2, rel=1e-12)
    assert m["equinorm"] == pytest.approx(np.std(norms) / np.mean(norms), rel=1e-12)
    assert m["equiangular"] == pytest.approx(np.std(cosines), rel=1e-12)


def test_each_function_matches_measure():
    rng = np.random.default_rng(9)
    H, y = random_data([3, 4, 5], 4, rng)
    H_before = H.copy()
    m = measure(H, y)
    assert list(m) == KEYS
    for key in KEYS:
        assert getattr(collapse, key)(H, y) == m[key]
    gram(H, y)
    CollapseAccumulator(3, 4).update(H, y)
    np.testing.assert_array_equal(H, H_before)  # the caller's array is never written to


def test_gram_matches_explicit_normalization():
    rng = np.random.default_rng(10)
    H, y = random_data([3, 5, 2], 4, rng)
    G, order = gram(H, y)
    np.testing.assert_array_equal(order, np.argsort(y, kind="stable"))
    assert all(np.all(np.diff(order[y[order] == c]) > 0) for c in range(3))  # file order kept
    mu_G = np.mean([H[y == c].mean(0) for c in range(3)], axis=0)
    X = np.array([(H[i] - mu_G) / np.linalg.norm(H[i] - mu_G) for i in order])
    np.testing.assert_allclose(G, X @ X.T, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.diag(G), 1.0, atol=1e-14)


# --- invariances --------------------------------------------------------------------------


def test_rotation_and_scaling_invariance():
    rng = np.random.default_rng(11)
    H, y = random_data([4, 7, 3, 5], 6, rng)
    m = measure(H, y)
    moved = measure(0.37 * H @ rotation(6, rng), y)
    assert_dicts_close(moved, m, rtol=1e-10)


def test_translation_invariance_except_orthogonal_frame():
    rng = np.random.default_rng(12)
    H, y = random_data([4, 7, 3, 5], 6, rng)
    m = measure(H, y)
    shifted = measure(H + 5.0 * rng.normal(size=6), y)
    assert shifted["nc2_orthogonal"] != pytest.approx(m["nc2_orthogonal"], rel=1e-3)
    del m["nc2_orthogonal"], shifted["nc2_orthogonal"]
    assert_dicts_close(shifted, m, rtol=1e-10)


def test_large_common_offset_changes_nothing_but_rounding():
    # With an offset of 1e6 the centered means only sum to 0 up to ~1e-10, which leaves a
    # spurious tiny singular value above the relative cutoff; nc1_pinv must still drop it.
    rng = np.random.default_rng(20)
    H, y = random_data([4, 7, 3, 5], 6, rng)
    m = measure(H, y)
    Hoff = H + 1e6 * rng.normal(size=6)
    acc = CollapseAccumulator(4, 6)
    acc.update(Hoff[:9], y[:9])
    acc.update(Hoff[9:], y[9:])
    for got in (measure(Hoff, y), acc.compute()):
        del got["nc2_orthogonal"]
        assert_dicts_close(got, {k: v for k, v in m.items() if k != "nc2_orthogonal"}, rtol=1e-8)


# --- streaming ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    D=st.integers(1, 6),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    seed=st.integers(0, 2**32 - 1),
    as_tensor=st.booleans(),
)
def test_streaming_equals_in_memory(counts, D, cuts, seed, as_tensor):
    rng = np.random.default_rng(seed)
    H, y = random_data(counts, D, rng)
    bounds = sorted({int(round(c * len(y))) for c in cuts} | {0, len(y)})
    acc = CollapseAccumulator(len(counts), D)
    for a, b in zip(bounds[:-1], bounds[1:]):
        Hb, yb = H[a:b], y[a:b]
        acc.update(torch.from_numpy(Hb) if as_tensor else Hb,
                   torch.from_numpy(yb) if as_tensor else yb)
    assert acc.count == len(y)
    np.testing.assert_array_equal(acc.class_counts, counts)
    assert_dicts_close(acc.compute(), measure(H, y), rtol=1e-10)


def test_accumulator_single_class_batches_empty_batches_and_reset():
    rng = np.random.default_rng(13)
    H, y = random_data([5, 3, 4], 3, rng)
    acc = CollapseAccumulator(3, 3)
    acc.update(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    for c in [2, 0, 1]:
        acc.update(H[y == c], y[y == c])
    assert_dicts_close(acc.compute(), measure(H, y), rtol=1e-10)
    acc.reset()
    assert acc.count == 0
    acc.update(H[:6], y[:6])
    acc.update(H[6:], y[6:])
    assert_dicts_close(acc.compute(), measure(H, y), rtol=1e-10)


def test_accumulator_without_pinv_omits_it():
    rng = np.random.default_rng(14)
    H, y = random_data([5, 3, 4], 3, rng)
    acc = CollapseAccumulator(3, 3, pinv=False)
    acc.update(H, y)
    expected = measure(H, y)
    del expected["nc1_pinv"]
    assert_dicts_close(acc.compute(), expected, rtol=1e-12)


def exact_nc1_and_cdnv(H, y, K):
    """nc1 and cdnv of the float64 data in exact rational arithmetic."""
    X = [[Fraction(v) for v in row] for row in H.tolist()]
    N, D = len(X), len(X[0])
    idx = [[i for i in range(N) if y[i] == c] for c in range(K)]
    mu = [[sum(X[i][d] for i in I) / len(I) for d in range(D)] for I in idx]
    ss = [sum((X[i][d] - mu[c][d]) ** 2 for i in I for d in range(D)) for c, I in enumerate(idx)]
    mu_G = [sum(m[d] for m in mu) / K for d in range(D)]
    tr_b = sum((m[d] - mu_G[d]) ** 2 for m in mu for d in range(D)) / K
    var = [ss[c] / len(idx[c]) for c in range(K)]
    pairs = [(var[a] + var[b]) / (2 * sum((mu[a][d] - mu[b][d]) ** 2 for d in range(D)))
             for a in range(K) for b in range(a + 1, K)]
    return float(sum(ss) / N / tr_b), float(sum(pairs) / len(pairs))


def _nearly_collapsed(rng):
    """Spread 1e-7 around 3 class means of norm 1e3 in 4 dimensions (NC1 ~ 1e-20), classes of
    9, 14 and 7 points: (H, y, K)."""
    K, D = 3, 4
    y = labels_from_counts([9, 14, 7], rng)
    means = rng.normal(size=(K, D))
    means *= 1e3 / np.linalg.norm(means, axis=1, keepdims=True)
    return means[y] + 1e-7 * rng.normal(size=(len(y), D)), y, K


def test_tiny_nc1_is_accurate_in_memory_and_streaming():
    # Within-class noise 1e-7 around means of norm ~1e3: NC1 ~ 1e-20. Raw sums of squares
    # lose every digit here; the two-pass and shifted Chan merges must not.
    rng = np.random.default_rng(15)
    H, y, K = _nearly_collapsed(rng)
    nc1_exact, cdnv_exact = exact_nc1_and_cdnv(H, y, K)

    class_means = np.stack([H[y == c].mean(0) for c in range(K)])
    tr_b = np.sum((class_means - class_means.mean(0)) ** 2) / K
    counts = np.bincount(y, minlength=K)
    raw_tr_w = (np.sum(H**2) - np.sum(counts[:, None] * class_means**2)) / len(y)
    raw_nc1 = raw_tr_w / tr_b
    assert abs(raw_nc1 / nc1_exact - 1) > 1e-3  # the naive formula really fails here

    m = measure(H, y)
    assert m["nc1"] == pytest.approx(nc1_exact, rel=1e-10)
    assert m["cdnv"] == pytest.approx(cdnv_exact, rel=1e-10)
    for cuts in ([1, 2, 3, 5, 8, 13, 21], [15], list(range(1, 30))):
        acc = CollapseAccumulator(K, H.shape[1])
        for a, b in zip([0, *cuts], [*cuts, len(y)]):
            acc.update(H[a:b], y[a:b])
        streamed = acc.compute()
        assert streamed["nc1"] == pytest.approx(nc1_exact, rel=1e-10)
        assert streamed["cdnv"] == pytest.approx(cdnv_exact, rel=1e-10)
        assert_dicts_close(streamed, m, rtol=1e-10)


# --- input types --------------------------------------------------------------------------


def test_torch_input_equals_numpy_input():
    rng = np.random.default_rng(16)
    H, y = random_data([4, 6, 5], 5, rng)
    assert measure(torch.from_numpy(H), torch.from_numpy(y)) == measure(H, y)
    G_t, order_t = gram(torch.from_numpy(H), torch.from_numpy(y))
    G, order = gram(H, y)
    np.testing.assert_array_equal(G_t, G)
    np.testing.assert_array_equal(order_t, order)


def test_low_precision_input_is_upcast_exactly():
    rng = np.random.default_rng(17)
    H, y = random_data([4, 6, 5], 5, rng)
    H32 = H.astype(np.float32)
    expected = measure(H32.astype(np.float64), y)
    assert measure(H32, y) == expected
    assert measure(torch.from_numpy(H32), y) == expected
    bf = torch.from_numpy(H32).to(torch.bfloat16)
    assert measure(bf, y) == measure(bf.float().numpy().astype(np.float64), y)


@pytest.mark.gpu
def test_cuda_tensors_equal_cpu():
    rng = np.random.default_rng(18)
    H, y = random_data([4, 6, 5], 5, rng)
    Ht, yt = torch.from_numpy(H).cuda(), torch.from_numpy(y).cuda()
    assert measure(Ht, yt) == measure(H, y)
    acc = CollapseAccumulator(3, 5)
    acc.update(Ht[:7], yt[:7])
    acc.update(Ht[7:].float(), yt[7:])
    expected = measure(np.concatenate([H[:7], H[7:].astype(np.float32)]), y)
    assert_dicts_close(acc.compute(), expected, rtol=1e-10)


# --- degenerate but valid data ------------------------------------------------------------


def test_coinciding_class_means_raise():
    rng = np.random.default_rng(19)
    y = np.array([0, 0, 1, 1, 2, 2])
    noise = rng.normal(size=(3, 4))
    H = np.concatenate([noise, -noise])[[0, 3, 1, 4, 2, 5]]  # every class mean is 0
    for f in [collapse.nc1, collapse.nc1_pinv, collapse.nc2, collapse.within_total, measure]:
        with pytest.raises(ValueError, match="class means coincide"):
            f(H, y)
    with pytest.raises(ValueError, match="class means coincide"):
        collapse.nc1(np.ones((6, 3)), y)  # constant features


def test_compute_refuses_an_empty_class_and_is_strict_by_default():
    # measure() is strict by default and so is compute(): an undefined metric raises; with
    # strict=False it is NaN and the others are measure(strict=False)'s
    y = np.array([0, 0, 1, 1, 2, 2])
    H = np.array([[-1.1], [-0.9], [-0.1], [0.1], [0.9], [1.1]])  # class 1's mean is μ_G
    acc = CollapseAccumulator(3, 1)
    acc.update(H, y)
    for f in (lambda: measure(H, y), acc.compute, lambda: acc.compute(strict=True)):
        with pytest.raises(ValueError, match="^the mean of class 1 equals the global mean"):
            f()
    loose, expected = acc.compute(strict=False), measure(H, y, strict=False)
    nan = {k for k, v in expected.items() if np.isnan(v)}
    assert nan and nan == {k for k, v in loose.items() if np.isnan(v)}
    assert_dicts_close({k: v for k, v in loose.items() if k not in nan},
                       {k: v for k, v in expected.items() if k not in nan}, rtol=1e-12)
    # a class never fed: refused whatever strict says, before any metric is tried
    acc = CollapseAccumulator(4, 1)
    acc.update(H, y)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"^class\(es\) \[3\] have no samples among the 6 "
                                             r"seen \(K = 4\)"):
            acc.compute(strict=strict)


def test_one_undefined_direction_raises_only_where_needed():
    y = np.array([0, 0, 1, 1, 2, 2])
    # Means −1, 0, +1 on a line: class 1's mean is μ_G, so nc2 is undefined but nc1 is not.
    H = np.array([[-1.1], [-0.9], [-0.1], [0.1], [0.9], [1.1]])
    assert collapse.nc1(H, y) == pytest.approx((6 * 0.01 / 6) / (2 / 3))
    with pytest.raises(ValueError, match="mean of class 1 equals the global mean"):
        collapse.nc2(H, y)
    with pytest.raises(ValueError, match="mean of class 1 is 0"):
        collapse.nc2_orthogonal(H, y)
    with pytest.raises(ValueError, match="mean of class 1 equals the global mean"):
        measure(H, y)
    # Two classes with one mean: cdnv is undefined, nc1 is not.
    H2 = np.array([[0.0, 1], [0, -1], [1, 0], [-1, 0], [5, 5], [5, 6]])
    # tr Σ_W = (2 + 2 + 0.5)/6, μ_G = (5, 5.5)/3, tr Σ_B = 331.5/27.
    assert collapse.nc1(H2, y) == pytest.approx(0.75 / (331.5 / 27), rel=1e-12)
    with pytest.raises(ValueError, match="classes 0 and 1 have the same mean"):
        collapse.cdnv(H2, y)


def test_gram_rejects_a_sample_at_the_global_mean():
    # Class means (2, 0) and (1, 0.5), so μ_G = (1.5, 0.25): row 0 sits exactly there.
    H = np.array([[1.5, 0.25], [2.5, -0.25], [1.0, 1.5], [1.0, -0.5]])
    y = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="row 0 of H equals the global mean"):
        gram(H, y)


def test_non_strict_gives_nan_for_undefined_metrics_only():
    # Two classes whose centered means are ±v but one class mean is 0 (uncentered):
    # nc2_orthogonal is undefined, NC1 is not.
    H = np.array([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [2.0, 0.1]])
    y = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="nc2_orthogonal"):
        measure(H, y)
    values = measure(H, y, strict=False)
    assert np.isnan(values["nc2_orthogonal"])
    assert values["nc1"] == pytest.approx(collapse.nc1(H, y))
    acc = CollapseAccumulator(2, 2)
    acc.update(H, y)
    streamed = acc.compute(strict=False)
    assert np.isnan(streamed["nc2_orthogonal"]) and streamed["nc1"] == pytest.approx(values["nc1"])


# --- merging, public state, all_reduce ----------------------------------------------------


def assert_same_statistics(got: CollapseAccumulator, want: CollapseAccumulator, rtol=1e-12):
    """Equal counts; class means, sums of squares and scatter equal to ``rtol`` of their scale."""
    np.testing.assert_array_equal(got.class_counts, want.class_counts)
    g, w = got.state(), want.state()
    assert g.keys() == w.keys()
    np.testing.assert_allclose(got.class_means, want.class_means, rtol=rtol,
                               atol=rtol * np.abs(want.class_means).max())
    for key in ("sum_squares", "scatter"):
        if key in w:
            a, b = g[key].cpu().numpy(), w[key].cpu().numpy()
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=key)


def fed(H, y, K, rows_per_batch, pinv=True) -> CollapseAccumulator:
    acc = CollapseAccumulator(K, H.shape[1], pinv=pinv)
    for rows in rows_per_batch:
        acc.update(H[rows], y[rows])
    return acc


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    D=st.integers(1, 6),
    share=st.floats(0, 1),
    absent=st.integers(0, 4),
    batches=st.integers(1, 3),
    pinv=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_merged_halves_equal_one_accumulator_fed_everything(counts, D, share, absent, batches,
                                                            pinv, seed):
    rng = np.random.default_rng(seed)
    K = len(counts)
    H, y = random_data(counts, D, rng)
    in_a = rng.random(len(y)) < share  # a random split, possibly empty or lopsided
    in_a[y == absent % K] = False  # one class (at least) is absent from half a
    a, b = (fed(H, y, K, np.array_split(np.flatnonzero(m), batches), pinv) for m in (in_a, ~in_a))
    full = fed(H, y, K, [np.arange(len(y))], pinv)
    before_b = b.state()
    ab = CollapseAccumulator.from_state(a.state()).merge(b)
    ba = CollapseAccumulator.from_state(b.state()).merge(a)
    for merged in (ab, ba):
        assert_same_statistics(merged, full)
    for k, v in b.state().items():  # the argument of merge is left as it was
        assert torch.equal(v, before_b[k]), k
    expected = measure(H, y)
    if not pinv:
        del expected["nc1_pinv"]
    assert_dicts_close(ab.compute(), expected, rtol=1e-10)


def test_merge_keeps_a_tiny_nc1_exact():
    # Spread 1e-7 around means of norm 1e3 (NC1 ~ 1e-20), split over three accumulators whose
    # shifts differ: the merge must work relative to the shifts, as update does.
    rng = np.random.default_rng(21)
    H, y, K = _nearly_collapsed(rng)
    nc1_exact, cdnv_exact = exact_nc1_and_cdnv(H, y, K)
    part = rng.integers(0, 3, size=len(y))
    accs = [fed(H, y, K, [np.flatnonzero(part == r)]) for r in range(3)]
    merged = accs[2].merge(accs[0]).merge(accs[1])
    got = merged.compute()
    assert got["nc1"] == pytest.approx(nc1_exact, rel=1e-10)
    assert got["cdnv"] == pytest.approx(cdnv_exact, rel=1e-10)
    assert_dicts_close(got, measure(H, y), rtol=1e-10)


def test_merging_an_empty_accumulator_or_itself():
    rng = np.random.default_rng(22)
    H, y = random_data([4, 5, 3], 3, rng)
    acc = fed(H, y, 3, [np.arange(len(y))])
    expected = acc.compute()
    assert acc.merge(CollapseAccumulator(3, 3)) is acc
    assert acc.compute() == expected
    empty = CollapseAccumulator(3, 3).merge(acc)
    assert empty.compute() == expected  # copied exactly into an empty accumulator
    twice = fed(np.concatenate([H, H]), np.concatenate([y, y]), 3, [np.arange(2 * len(y))])
    assert_same_statistics(acc.merge(acc), twice)  # every sample counted twice


def test_merge_refuses_accumulators_of_another_shape():
    acc = CollapseAccumulator(3, 4)
    for other in (CollapseAccumulator(4, 4), CollapseAccumulator(3, 5),
                  CollapseAccumulator(3, 4, pinv=False)):
        with pytest.raises(ValueError, match=r"cannot merge .* \(num_classes, dim, pinv\)"):
            acc.merge(other)
    with pytest.raises(ValueError, match="can only merge a CollapseAccumulator"):
        acc.merge({"counts": np.ones(3)})


def test_state_is_public_float64_and_round_trips():
    rng = np.random.default_rng(23)
    H, y = random_data([4, 6, 5], 5, rng)
    acc = fed(H, y, 3, [np.arange(7), np.arange(7, len(y))])
    state = acc.state()
    assert list(state) == ["counts", "shifts", "shifted_means", "sum_squares", "scatter",
                           "input_eps"]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes == {"counts": (3,), "shifts": (3, 5), "shifted_means": (3, 5),
                      "sum_squares": (3,), "scatter": (5, 5), "input_eps": ()}
    assert float(state["input_eps"]) == np.finfo(np.float64).eps  # float64 batches only
    assert all(v.dtype == torch.float64 for v in state.values())
    np.testing.assert_array_equal(state["counts"].numpy(), [4, 6, 5])
    np.testing.assert_allclose((state["shifts"] + state["shifted_means"]).numpy(),
                               np.stack([H[y == c].mean(0) for c in range(3)]), rtol=1e-13)
    ss = [np.sum((H[y == c] - H[y == c].mean(0)) ** 2) for c in range(3)]
    np.testing.assert_allclose(state["sum_squares"].numpy(), ss, rtol=1e-12)
    R = H - np.stack([H[y == c].mean(0) for c in range(3)])[y]
    np.testing.assert_allclose(state["scatter"].numpy(), R.T @ R, rtol=1e-12, atol=1e-12)
    state["counts"][0] = 99  # a copy: the accumulator is not changed through it
    assert acc.class_counts[0] == 4

    back = CollapseAccumulator.from_state(acc.state())
    assert (back.num_classes, back.dim, back.pinv) == (3, 5, True)
    assert back.compute() == acc.compute()
    assert back.class_counts.dtype == acc.class_counts.dtype == np.int64  # equal to acc
    np.testing.assert_array_equal(back.class_counts, acc.class_counts)
    # a class with count 0 keeps zeros, whatever statistics were passed for it
    unseen = {k: v.clone() for k, v in acc.state().items()}
    unseen["counts"][1] = 0
    for k in ("shifts", "shifted_means", "sum_squares"):
        unseen[k][1] = 7.0
    back = CollapseAccumulator.from_state(unseen).state()
    assert all(float(back[k][1].abs().sum()) == 0.0
               for k in ("counts", "shifts", "shifted_means", "sum_squares"))
    assert all(torch.equal(back[k][[0, 2]], unseen[k][[0, 2]])
               for k in ("counts", "shifts", "shifted_means", "sum_squares"))
    # a device named, tensors that require grad (e.g. gathered from a training loop)
    tracked = {k: v.clone().requires_grad_(True) for k, v in acc.state().items()}
    back = CollapseAccumulator.from_state(tracked, device="cpu")
    assert back.compute() == acc.compute()
    assert all(not v.requires_grad for v in back.state().values())
    # plain statistics (no shifts: shifted_means are then the class means), numpy, no scatter
    plain = {"counts": np.array([4, 6, 5]), "shifted_means": acc.class_means,
             "sum_squares": np.array(ss)}
    light = CollapseAccumulator.from_state(plain)
    assert light.pinv is False
    expected = measure(H, y)
    del expected["nc1_pinv"]
    assert_dicts_close(light.compute(), expected, rtol=1e-12)
    assert CollapseAccumulator(3, 5).state()["counts"].sum() == 0  # nothing seen: zeros
    # nothing seen yet: zeros on the accumulator's device if it has one (CPU otherwise)
    empty = CollapseAccumulator(3, 5, pinv=False, device="meta").state()
    assert list(empty) == ["counts", "shifts", "shifted_means", "sum_squares", "input_eps"]
    assert all(v.device.type == "meta" and v.dtype == torch.float64 for v in empty.values())
    assert {k: tuple(v.shape) for k, v in empty.items()} == {
        "counts": (3,), "shifts": (3, 5), "shifted_means": (3, 5), "sum_squares": (3,),
        "input_eps": ()}


def test_from_state_rejects_bad_statistics():
    good = {"counts": np.array([2.0, 3.0]), "shifted_means": np.zeros((2, 3)),
            "sum_squares": np.ones(2)}
    cases = [
        ({"counts": good["counts"]}, "lacks"),
        ({**good, "means": np.zeros((2, 3))}, "unknown key"),
        ({**good, "counts": np.array([2.0, 3.0, 1.0])}, r"state\['counts'\] has shape"),
        ({**good, "scatter": np.eye(2)}, r"state\['scatter'\] has shape \(2, 2\).*\(3, 3\)"),
        ({**good, "counts": np.array([2.5, 3.0])}, "non-negative integers"),
        ({**good, "counts": np.array([-1.0, 3.0])}, "non-negative integers"),
        ({**good, "sum_squares": np.array([1.0, np.nan])}, "NaN or inf"),
        ({**good, "shifted_means": np.zeros(3)}, "must be K × D"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            CollapseAccumulator.from_state(state)


def test_all_reduce_without_torch_distributed_is_a_no_op():
    assert not torch.distributed.is_initialized()
    rng = np.random.default_rng(24)
    H, y = random_data([3, 4], 2, rng)
    acc = fed(H, y, 2, [np.arange(len(y))])
    before = acc.state()
    assert acc.all_reduce() is acc
    for k, v in acc.state().items():
        assert torch.equal(v, before[k]), k


def _distributed_data():
    """The data of the all_reduce test and each rank's rows (class 3 only on rank 1)."""
    rng = np.random.default_rng(25)
    H, y = random_data([6, 2, 5, 4], 3, rng)
    on_0 = (rng.random(len(y)) < 0.6) & (y != 3)
    return H, y, [np.flatnonzero(on_0), np.flatnonzero(~on_0)]


def _all_reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of test_all_reduce_over_gloo: feed its rows, all_reduce, save the states."""
    import datetime
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        H, y, rows = _distributed_data()
        acc = fed(H, y, 4, np.array_split(rows[rank], 2))
        assert acc.all_reduce() is acc
        only_rank_0 = fed(H, y, 4, [np.arange(len(y))] if rank == 0 else [], pinv=False)
        only_rank_0.all_reduce()
        nobody = CollapseAccumulator(4, 3)
        nobody.all_reduce()  # no rank has data: still no data, no error
        assert nobody.count == 0
        try:
            CollapseAccumulator(3 + rank, 3).all_reduce()
            mismatch = "no error"
        except ValueError as e:
            mismatch = str(e)
        torch.save({"acc": acc.state(), "only_rank_0": only_rank_0.state(),
                    "mismatch": mismatch}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_gloo_gives_every_rank_the_merged_statistics(tmp_path):
    import socket

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, 2, port, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, "a rank did not finish within 120 s"
    assert [p.exitcode for p in procs] == [0, 0]

    H, y, _ = _distributed_data()
    full = fed(H, y, 4, [np.arange(len(y))])
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("acc", "only_rank_0"):
        for k, v in results[0][key].items():  # identical on every rank, bit for bit
            assert torch.equal(v, results[1][key][k]), (key, k)
    merged = CollapseAccumulator.from_state(results[0]["acc"])
    assert_same_statistics(merged, full)
    assert_dicts_close(merged.compute(), measure(H, y), rtol=1e-10)
    only = CollapseAccumulator.from_state(results[0]["only_rank_0"])
    assert only.pinv is False
    expected = measure(H, y)
    del expected["nc1_pinv"]
    assert_dicts_close(only.compute(), expected, rtol=1e-12)
    for r in range(2):
        assert "all ranks must agree" in results[r]["mismatch"], results[r]["mismatch"]


METRIC_FUNCTIONS = ("nc1", "nc1_authors", "cdnv", "nc2", "nc2_squared", "nc2_orthogonal",
                    "within_total", "between_total", "equinorm", "equiangular")


@pytest.mark.parametrize("name", METRIC_FUNCTIONS)
def test_each_metric_honours_num_classes(name):
    # labels 0..2: num_classes=4 declares an empty class 3 (refused), num_classes=2 a label
    # out of range (refused); without num_classes K = 3 is inferred
    import agop.collapse as collapse_module

    f = getattr(collapse_module, name)
    rng = np.random.default_rng(0)
    H, y = rng.normal(size=(12, 5)), np.arange(12) % 3
    assert f(H, y) == f(H, y, num_classes=3)
    with pytest.raises(ValueError, match="no samples"):
        f(H, y, num_classes=4)
    with pytest.raises(ValueError, match="^y must hold labels in 0..1"):
        f(H, y, num_classes=2)


def test_gram_refuses_a_class_without_samples():
    # its other input checks: test_every_metric_checks_its_inputs_and_names_them
    from agop.collapse import gram

    rng = np.random.default_rng(1)
    H, y = rng.normal(size=(12, 5)), np.arange(12) % 3
    with pytest.raises(ValueError, match="no samples"):
        gram(H, y, num_classes=4)


def _row_near_global_mean(offset):
    """40 rows in 2 classes whose global mean μ_G is 0 to rounding; row 0 is ``offset``·e₁ away
    from it, every other row has norm about 1."""
    rng = np.random.default_rng(2)
    U = rng.normal(size=(19, 3))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    e = np.array([offset, 0.0, 0.0])
    H = np.concatenate([e[None], U, -e[None], -U])  # class 0: rows 0..19, class 1: the mirror
    y = np.repeat([0, 1], 20)
    return H, y


def test_gram_refuses_a_row_at_the_global_mean_to_rounding_of_the_largest_row():
    # the tolerance is 4·N·ε·max‖h_i‖ ≈ 3.6e-14 here (N = 40): not N·ε of ‖H‖_F (6× larger),
    # nor D·ε (13× smaller)
    from agop.collapse import gram

    G, _ = gram(*_row_near_global_mean(1e-13))  # 3× the tolerance: a direction, kept
    assert G[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="^row 0 of H equals the global mean"):
        gram(*_row_near_global_mean(1e-14))  # below it: no direction


def test_nc1_pinv_honours_num_classes():
    rng = np.random.default_rng(0)
    H, y = rng.normal(size=(12, 5)), np.arange(12) % 3
    assert collapse.nc1_pinv(H, y) == collapse.nc1_pinv(H, y, num_classes=3)
    with pytest.raises(ValueError, match="no samples"):
        collapse.nc1_pinv(H, y, num_classes=4)


def test_accumulator_errors_name_the_argument():
    with pytest.raises(ValueError, match="^num_classes must be an integer ≥ 2"):
        CollapseAccumulator(1, 3)
    with pytest.raises(ValueError, match="^dim must be an integer ≥ 1"):
        CollapseAccumulator(3, 0)
    acc = CollapseAccumulator(3, 2)
    with pytest.raises(ValueError, match="^H_batch "):
        acc.update(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="^y_batch has 2 label"):
        acc.update(np.ones((1, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="^y_batch must hold labels in 0..2"):
        acc.update(np.ones((1, 2)), np.array([3]))


def test_merge_leaves_the_other_accumulator_unchanged():
    rng = np.random.default_rng(5)
    H, y = rng.normal(size=(30, 4)), np.arange(30) % 3
    a, b = CollapseAccumulator(3, 4), CollapseAccumulator(3, 4)
    a.update(H[:15], y[:15])
    b.update(H[15:], y[15:])
    before = {k: v.clone() for k, v in b.state().items()}
    a.merge(b)
    a.update(H[:5], y[:5])  # a's statistics change in place after the merge
    assert all(torch.equal(v, b.state()[k]) for k, v in before.items())


def test_measure_honours_num_classes():
    rng = np.random.default_rng(0)
    H, y = rng.normal(size=(12, 5)), np.arange(12) % 3
    with pytest.raises(ValueError, match="no samples"):
        measure(H, y, num_classes=4)


# --- tolerances and cut-offs at their exact constants --------------------------------------


def test_pinv_cutoff_is_the_largest_of_its_three_documented_terms():
    # √(max(D, 1000·N)·ε)·s_max, √D·ε_in·r (r² = Σ_c mean_{i∈c} ‖x_i‖²) and 4·N·ε·max_c ‖μ_c‖,
    # each made the largest in turn; the statistics are given exactly (no rounding to hide in)
    from agop.collapse import _EPS, _pinv_cutoff, _Stats

    eps32 = float(np.finfo(np.float32).eps)

    def stats(counts, means, ss, input_eps=_EPS):
        return _Stats(np.asarray(counts), np.asarray(means, dtype=float),
                      np.asarray(ss, dtype=float), None, input_eps)

    def documented(s, s_max):
        D, N = s.means.shape[1], int(np.sum(s.counts))
        r = np.sqrt(np.sum(s.ss / s.counts + np.linalg.norm(s.means, axis=1) ** 2))
        terms = (np.sqrt(max(D, 1000 * N) * _EPS) * s_max, np.sqrt(D) * s.input_eps * r,
                 4 * N * _EPS * np.linalg.norm(s.means, axis=1).max())
        return max(terms), int(np.argmax(terms))

    wide = np.zeros((2, 3000))  # D = 3000 > 1000·N = 2000
    wide[0, 0], wide[1, 1] = 3.0, 2.0
    far = wide.copy()
    far[:, 2] = 1e3
    cases = [  # (statistics, s_max, the term that should be the largest)
        (stats([1, 1], wide, [0.0, 0.0]), 2.5, 0),  # √(D·ε)·s_max
        (stats([5, 7, 3], [[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], [4.0, 2.0, 1.0]), 1.7, 0),
        (stats([5, 7, 3], [[1e3, 2.0], [1e3, -1.0], [1e3, 0.0]], [4.0, 2.0, 1.0], eps32), 1e-4, 1),
        (stats([1, 1], far, [0.0, 0.0]), 1e-12, 1),  # √D·ε·r > 4·N·ε·max‖μ‖ for √D > 4N
        (stats([400, 600], [[1e3, 0.0], [1e3, 1e-9]], [1.0, 2.0]), 1e-12, 2),
    ]
    for s, s_max, dominant in cases:
        expected, which = documented(s, s_max)
        assert which == dominant, (which, dominant)
        assert _pinv_cutoff(s, s_max) == pytest.approx(expected, rel=1e-12)


def test_coinciding_means_are_judged_at_exactly_four_n_eps_of_the_largest_mean():
    # two classes whose means differ by k·ε at norm 1 (single samples: the means are exact);
    # a third class far away. N = 3, so the tolerance is 4·3·ε·max‖μ‖ = 12ε: 14ε apart is a
    # difference, 10ε apart is not (cdnv compares squared distances with the tolerance squared)
    from agop.collapse import _EPS

    def data(k):
        H = np.array([[1.0, 0.0], [1.0 + k * _EPS, 0.0], [0.0, 1.0]])
        return H, np.arange(3)

    assert collapse.cdnv(*data(14)) == 0.0  # single samples: no spread, distinct means
    with pytest.raises(ValueError, match="^classes 0 and 1 have the same mean"):
        collapse.cdnv(*data(10))


def test_input_eps_is_that_of_the_floating_dtype_handed_in():
    from agop.collapse import _EPS, _input_eps

    eps32, eps16 = float(np.finfo(np.float32).eps), float(np.finfo(np.float16).eps)
    assert _input_eps(torch.ones(2, dtype=torch.float32)) == eps32
    assert _input_eps(np.ones(2, dtype=np.float16)) == eps16
    assert _input_eps(torch.ones(2, dtype=torch.float64)) == _EPS

    class Odd:  # a dtype numpy does not know
        dtype = "no such dtype"

    for a in (torch.arange(3), torch.ones(2, dtype=torch.bool), np.arange(3), np.ones(2, bool),
              [[1.0, 2.0]], [[1, 2]], Odd()):
        assert _input_eps(a) == _EPS, a
    # integer features: the float64 cut-off, the same numbers as their float64 copy
    rng = np.random.default_rng(3)
    H, y = rng.integers(-5, 6, size=(30, 4)), np.arange(30) % 3
    ref = measure(H.astype(np.float64), y)
    assert measure(torch.from_numpy(H), y) == ref
    assert measure(H.tolist(), y) == ref


@pytest.mark.parametrize("f", [measure, collapse.gram] + [getattr(collapse, k) for k in KEYS])
def test_every_metric_checks_its_inputs_and_names_them(f):
    # N = 12 rows of D = 5 features (N ≠ D), errors name H and y
    rng = np.random.default_rng(1)
    H, y = rng.normal(size=(12, 5)), np.arange(12) % 3
    with pytest.raises(ValueError, match="^y must hold labels in 0..1"):
        f(H, y, num_classes=2)
    with pytest.raises(ValueError, match="^y has 11 label"):
        f(H, y[:-1])
    bad = H.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="^H "):
        f(bad, y)
