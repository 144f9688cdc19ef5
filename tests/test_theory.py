"""Tests for agop.theory: Proposition 5.1, Theorems 5.4 and 5.5."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.spatial import distance

from agop import theory as th
from agop.kernels import LaplaceKernel
from agop.linalg import psd_power

SQRT_HALF = 1 / math.sqrt(2)


def pm1(n: int) -> np.ndarray:
    """Balanced ±1 labels: the first half +1."""
    return np.where(np.arange(n) < n // 2, 1.0, -1.0)


# ============================================================================ Proposition 5.1
def _inner_by_integration(r: float) -> float:
    """2·E[σ(w₁)σ(r w₁ + √(1−r²) w₂)] by a 2-D quadrature over the region where both are > 0."""
    s = math.sqrt(1 - r * r)
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    f = lambda w2, w1: w1 * (r * w1 + s * w2) * phi(w1) * phi(w2)  # noqa: E731
    # |w| ≤ 12 drops a Gaussian mass below 1e-30
    val, _ = integrate.dblquad(f, 0, 12, lambda w1: max(-r * w1 / s, -12.0), lambda w1: 12.0,
                               epsabs=1e-13, epsrel=1e-13)
    return 2 * val


@pytest.mark.parametrize("r", [-0.999, -0.7, -0.2, 0.0, 0.35, 0.8, 0.99, 0.999])
def test_inner_equals_double_integral(r):
    assert th.relu_feature_inner(r) == pytest.approx(_inner_by_integration(r), abs=1e-10)


def test_inner_closed_forms_and_special_values():
    r = np.linspace(-1, 1, 401)
    arccos_form = (np.sqrt(1 - r**2) + (np.pi - np.arccos(r)) * r) / np.pi
    np.testing.assert_allclose(th.relu_feature_inner(r), arccos_form, rtol=0, atol=1e-15)
    ri = r[1:-1]  # the paper's eq. (1) divides by √(1−r²)
    eq1 = ((1 - ri**2) ** 1.5 / np.pi + ri**2 * np.sqrt(1 - ri**2) / np.pi + ri / 2
           + ri / np.pi * np.arctan(ri / np.sqrt(1 - ri**2)))
    np.testing.assert_allclose(th.relu_feature_inner(ri), eq1, rtol=0, atol=1e-14)
    assert th.relu_feature_inner(1.0) == 1.0
    assert th.relu_feature_inner(0.0) == pytest.approx(1 / np.pi, abs=1e-16)
    assert th.relu_feature_inner(-1.0) == 0.0
    assert np.all(np.diff(th.relu_feature_inner(r)) > 0)  # increasing in r
    assert th.relu_feature_inner(torch.tensor([0.5, 1.0])).shape == (2,)
    assert np.ndim(th.relu_feature_inner(0.5)) == 0


def test_monte_carlo_agrees_with_theory_within_4_se():
    dist = np.array([0.0, 0.1, 0.5, 1.0, 1.41, 1.9, 2.0])
    sim = th.simulate_relu_features(dist, D=8192, trials=64, seed=1)
    r = 1 - dist**2 / 2
    inner = th.relu_feature_inner(r)
    se = np.where(sim.inner_se > 0, sim.inner_se, np.inf)
    assert np.all(np.abs(sim.inner - inner) < 4 * se)
    assert sim.inner[-1] == 0.0  # r = −1: σ(w)σ(−w) = 0 exactly
    pos = dist > 0
    z = np.abs(sim.distance[pos] - th.relu_feature_distance(dist[pos])) / sim.distance_se[pos]
    assert np.all(z < 4)
    assert abs(sim.sq_norm - 1.0) < 4 * sim.sq_norm_se  # E‖σ(Wx)‖² = 1 under N(0, 2/D)
    assert sim.distance[0] == 0.0 and sim.distance.shape == dist.shape
    # a different seed gives different draws; the same seed the same ones
    again = th.simulate_relu_features(dist, D=64, trials=5, seed=3)
    assert np.array_equal(again.distance, th.simulate_relu_features(dist, 64, 5, 3).distance)
    assert not np.array_equal(again.distance, th.simulate_relu_features(dist, 64, 5, 4).distance)


def test_feature_distance_equals_its_definition():
    d = np.linspace(0.05, 2.0, 200)
    direct = np.sqrt(2 - 2 * th.relu_feature_inner(1 - d**2 / 2))
    np.testing.assert_allclose(th.relu_feature_distance(d), direct, rtol=1e-12)
    np.testing.assert_allclose(th.relu_feature_ratio(d), direct / d, rtol=1e-12)
    assert th.relu_feature_distance(2.0) == pytest.approx(math.sqrt(2), abs=1e-15)
    assert th.relu_feature_ratio(2.0) == pytest.approx(SQRT_HALF, abs=1e-15)
    assert th.relu_feature_distance(0.0) == 0.0 and th.relu_feature_ratio(0.0) == 1.0


def test_feature_distance_is_accurate_without_cancellation():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50

    def exact_ratio(d):
        d = mpmath.mpf(d)
        r = 1 - d * d / 2
        k1 = (mpmath.sqrt(1 - r * r) + (mpmath.pi - mpmath.acos(r)) * r) / mpmath.pi
        return float(mpmath.sqrt(2 - 2 * k1) / d)

    # both sides of the series / direct switch at θ = 1 (d = 2 sin ½), and tiny distances
    d = [1e-9, 1e-6, 1e-3, 0.1, 2 * math.sin(0.5) - 1e-12, 2 * math.sin(0.5) + 1e-12, 1.5, 1.999]
    np.testing.assert_allclose(th.relu_feature_ratio(np.array(d)), [exact_ratio(x) for x in d],
                               rtol=1e-14)
    # ratio ≈ 1 − d/(3π) near 0
    assert th.relu_feature_ratio(1e-6) == pytest.approx(1 - 1e-6 / (3 * np.pi), abs=1e-12)


def test_ratio_decreases_monotonically_within_bounds():
    d = np.concatenate([np.geomspace(1e-8, 1e-2, 50)[:-1], np.linspace(1e-2, 2, 3000)])
    ratio = th.relu_feature_ratio(d)
    assert np.all(np.diff(ratio) < 0)
    assert ratio.min() >= SQRT_HALF - 1e-15 and ratio.max() <= 1.0
    # the feature distance exceeds the chord from (0, 0) to (2, √2)
    assert np.all(th.relu_feature_distance(d[:-1]) > d[:-1] * SQRT_HALF)


@pytest.mark.parametrize("call", [
    lambda: th.relu_feature_inner(1.1),
    lambda: th.relu_feature_inner([0.5, -1.5]),
    lambda: th.relu_feature_inner(np.nan),
    lambda: th.relu_feature_distance(2.5),
    lambda: th.relu_feature_ratio(-0.1),
    lambda: th.simulate_relu_features([0.5, 3.0]),
    lambda: th.simulate_relu_features(1.0, D=0),
    lambda: th.simulate_relu_features(1.0, trials=1),
])
def test_proposition_bad_input(call):
    with pytest.raises(ValueError, match=r"must|contains"):
        call()


def test_boundary_round_off_is_clipped():
    assert th.relu_feature_inner(1 + 1e-14) == 1.0
    assert th.relu_feature_ratio(2 + 1e-14) == pytest.approx(SQRT_HALF, abs=1e-15)


# ============================================================================ Theorem 5.4
def _data_gram(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, d))
    B /= np.linalg.norm(B, axis=1, keepdims=True)
    return B


def _feature_space_rfm(H, Y, lambda_k, lambda_phi, kappa, depth):
    """Linearized Deep RFM on explicit features with an autograd AGOP (independent check)."""
    H = torch.as_tensor(H, dtype=torch.float64)
    Y = torch.as_tensor(Y, dtype=torch.float64).reshape(len(H), -1)
    n = len(H)
    out = []
    for _ in range(depth):
        alpha = torch.linalg.solve(H @ H.T + lambda_k * torch.eye(n, dtype=H.dtype), Y)
        f = lambda z, H=H, alpha=alpha: alpha.T @ (H @ z)  # noqa: E731  f(z) = Σⱼ αⱼ h_jᵀz
        J = torch.stack([torch.func.jacrev(f)(h) for h in H])  # n × K × d
        M = torch.einsum("ikd,ike->de", J, J) / n  # the AGOP, averaged over the points
        Ht = H @ psd_power(M, 0.5) / math.sqrt(kappa)
        out.append(torch.linalg.matrix_norm(Ht @ Ht.T - Y @ Y.T, ord=2).item())
        # a feature map whose Gram adds λ_Φ I: append √λ_Φ·I as n new coordinates
        H = torch.cat([Ht, math.sqrt(lambda_phi) * torch.eye(n, dtype=H.dtype)], dim=1)
    return np.array(out)


@pytest.mark.parametrize("kappa", ["exact", "paper"])
def test_gram_recursion_matches_explicit_features(kappa):
    n, lam_k, lam_phi = 8, 0.05, 0.5
    H = _data_gram(n, 12)
    y = pm1(n)
    res = th.linearized_deep_rfm(H @ H.T, y, lam_k, lam_phi, 4, kappa=kappa)
    explicit = _feature_space_rfm(H, y, lam_k, lam_phi, res.kappa, 4)
    np.testing.assert_allclose(res.spectral, explicit, rtol=1e-8, atol=1e-12)


def test_gram_recursion_multiclass_matches_explicit_features():
    n, K = 9, 3
    H = _data_gram(n, 14, seed=2)
    Y = np.eye(K)[np.arange(n) % K]  # 0/1 one-hot, classes of equal size: YᵀY = 3·I
    res = th.linearized_deep_rfm(H @ H.T, Y, 0.05, 0.5, 3)
    np.testing.assert_allclose(res.spectral, _feature_space_rfm(H, Y, 0.05, 0.5, res.kappa, 3),
                               rtol=1e-8, atol=1e-12)
    assert np.all(np.diff(res.spectral) < 0) and res.spectral[-1] < 1e-2 * res.spectral[0]


def _rates(settings, n=24, depth=10):
    B = _data_gram(n, 48)
    y = pm1(n)
    return [th.contraction_rate(th.linearized_deep_rfm(B @ B.T + lp * np.eye(n), y, lk, lp,
                                                       depth).spectral)
            for lk, lp in settings]


def test_contracts_geometrically_slower_for_larger_lambda_k():
    rates = _rates([(0.01, 1.0), (0.05, 1.0), (0.2, 1.0), (0.5, 1.0)])
    assert rates[0] < 0.05  # λ_k/λ_Φ = 0.01: fast geometric contraction
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert rates[-1] < 1


def test_contracts_faster_for_larger_lambda_phi():
    rates = _rates([(0.1, 0.3), (0.1, 1.0), (0.1, 3.0)])
    assert rates[0] > rates[1] > rates[2]


def test_distance_is_monotone_and_frobenius_bounds_spectral():
    B = _data_gram(24, 48)
    res = th.linearized_deep_rfm(B @ B.T + np.eye(24), pm1(24), 0.1, 1.0, 8)
    assert np.all(np.diff(res.spectral) < 0)
    assert np.all(res.spectral <= res.frobenius + 1e-15)
    assert np.all(res.frobenius <= math.sqrt(2) * res.spectral + 1e-12)  # rank ≤ 2 differences
    gram0_distance = np.linalg.norm(B @ B.T + np.eye(24) - np.outer(pm1(24), pm1(24)), 2)
    assert res.initial == pytest.approx(gram0_distance)


def test_linear_feature_map_does_not_collapse():
    B = _data_gram(24, 48)
    res = th.linearized_deep_rfm(B @ B.T, pm1(24), 0.1, 0.0, 10)
    assert res.spectral[-1] > 0.1
    assert res.spectral[-1] == pytest.approx(res.spectral[-2], rel=1e-9)
    with pytest.raises(ValueError, match="undefined for lambda_phi = 0"):
        th.linearized_deep_rfm(B @ B.T, pm1(24), 0.1, 0.0, 3, kappa="paper")


def test_fixed_point_and_one_step_collapse():
    n, y = 16, pm1(16)
    A_star = np.outer(y, y) + 0.8 * np.eye(n)
    assert th.linearized_deep_rfm(A_star, y, 0.1, 0.8, 6).spectral.max() < 1e-12
    B = _data_gram(n, 32)
    assert th.linearized_deep_rfm(B @ B.T + np.eye(n), y, 0.0, 1.0, 1).spectral[0] < 1e-12
    # exact κ: its first-order expansion is the corrected 1 − 2λ_k/(n + λ_Φ)
    assert th.kappa_value("exact", 1e-5, 0.8, n) == pytest.approx(1 - 2e-5 / (n + 0.8), abs=1e-9)
    assert th.kappa_value("paper", 0.1, 0.5, n) == pytest.approx(1 - 0.2 * 3)


def test_paper_kappa_settles_at_the_scalar_fixed_point():
    n, lam_k, lam_phi = 24, 0.02, 1.0
    B = _data_gram(n, 48)
    res = th.linearized_deep_rfm(B @ B.T + np.eye(n), pm1(n), lam_k, lam_phi, 15, kappa="paper")
    t_star = th.collapsed_fixed_point(lam_k, lam_phi, n, "paper")
    assert res.spectral[-1] == pytest.approx(n * abs(t_star - 1), rel=1e-9)
    assert res.spectral[-1] > 50 * (lam_k / lam_phi) ** 2  # an O(λ_k) offset, not O(λ_k²)
    assert th.collapsed_fixed_point(lam_k, lam_phi, n, "exact") == pytest.approx(1, abs=1e-14)


def test_lemma_a2_closed_form_equals_numerical_inverse():
    for n, lam in ((10, 0.3), (31, 2.0)):
        y = np.where(np.random.default_rng(n).random(n) < 0.4, 1.0, -1.0)  # unbalanced is fine
        inv = np.linalg.inv(np.outer(y, y) + lam * np.eye(n))
        np.testing.assert_allclose(th.collapsed_gram_inverse(y, lam), inv, rtol=0, atol=1e-13)
        # and the identity the proof needs: (A*)⁻¹y = y/(n + λ_Φ)
        np.testing.assert_allclose(inv @ y, y / (n + lam), atol=1e-13)
    Y = np.eye(4)[np.arange(12) % 4]
    np.testing.assert_allclose(th.collapsed_gram_inverse(Y, 0.5),
                               np.linalg.inv(Y @ Y.T + 0.5 * np.eye(12)), atol=1e-13)


def test_contraction_rate_of_exact_sequences():
    assert th.contraction_rate(3.0 * 0.2 ** np.arange(8)) == pytest.approx(0.2, rel=1e-12)
    # entries at the round-off floor are ignored
    seq = np.concatenate([0.1 ** np.arange(6), [1e-16, 2e-16]])
    assert th.contraction_rate(seq) == pytest.approx(0.1, rel=1e-12)
    assert th.contraction_rate(np.ones(5)) == pytest.approx(1.0)


@pytest.mark.parametrize("call, match", [
    (lambda: th.linearized_deep_rfm(np.eye(4), [1, -1, 2, 1], 0.1, 1.0, 2), "±1"),
    (lambda: th.linearized_deep_rfm(np.eye(4), pm1(6), 0.1, 1.0, 2), "Gram matrix is 4 × 4"),
    (lambda: th.linearized_deep_rfm(np.eye(3)[:, :2], pm1(3), 0.1, 1.0, 2), "square"),
    (lambda: th.linearized_deep_rfm(np.triu(np.ones((4, 4))), pm1(4), 0.1, 1.0, 2), "symmetric"),
    (lambda: th.linearized_deep_rfm(np.eye(4), pm1(4), -0.1, 1.0, 2), "lambda_k"),
    (lambda: th.linearized_deep_rfm(np.eye(4), pm1(4), 0.1, -1.0, 2), "lambda_phi"),
    (lambda: th.linearized_deep_rfm(np.eye(4), pm1(4), 0.1, 1.0, 0), "depth"),
    (lambda: th.linearized_deep_rfm(np.zeros((4, 4)), pm1(4), 0.0, 1.0, 2), "positive definite"),
    (lambda: th.linearized_deep_rfm(np.eye(4), pm1(4), 0.1, 1.0, 2, kappa="half"), "kappa"),
    (lambda: th.linearized_deep_rfm(np.eye(4), pm1(4), 0.4, 1.0, 2, kappa="paper"), "≤ 0"),
    (lambda: th.collapsed_gram_inverse(np.eye(3)[[0, 0, 1, 2]], 1.0), "orthogonal with equal"),
    (lambda: th.collapsed_gram_inverse(pm1(4), 0.0), "lambda_phi"),
    (lambda: th.contraction_rate([1.0]), "at least 2"),
    (lambda: th.contraction_rate([1.0, 1e-20, 1e-21]), "fewer than 2"),
])
def test_theorem54_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ============================================================================ Theorem 5.5
def test_objective_equals_eigen_form():
    rng = np.random.default_rng(0)
    B = rng.standard_normal((30, 10))
    k = B @ B.T  # PSD and singular: the objective is still defined for μ > 0
    y = rng.standard_normal(30)
    evals, evecs = np.linalg.eigh(k)
    for mu in (0.01, 1.0, 50.0):
        eigen_form = np.sum((y @ evecs) ** 2 * evals / (evals + mu))
        assert th.krr_objective(k, y, mu) == pytest.approx(eigen_form, rel=1e-11)
        assert th.krr_objective(k, y, mu) == pytest.approx(
            y @ np.linalg.inv(k + mu * np.eye(30)) @ k @ y, rel=1e-9)


def test_collapsed_kernel_attains_the_bound():
    y = pm1(20)
    kstar = th.collapsed_kernel(y)
    assert np.array_equal(kstar, np.kron(np.eye(2), np.ones((10, 10))))  # I₂ ⊗ 1ₙ1ₙᵀ
    for mu in (0.5, 10.0, 1e3):
        assert th.krr_objective(kstar, y, mu) == pytest.approx(20 * 10 / (10 + mu), rel=1e-13)
        assert th.krr_bound(20, mu) == pytest.approx(20 * 10 / (10 + mu), rel=1e-15)
        assert th.krr_ratio(kstar, y, mu) == pytest.approx(1.0, abs=1e-13)


def test_bound_holds_on_random_kernels():
    for seed in range(5):
        N = 10 + 6 * seed
        y = pm1(N)
        kernels = th.random_kernels(N, seed)
        rng = np.random.default_rng(seed)
        # random points of the convex set of unit-diagonal PSD kernels with entries ≥ 0,
        # between its corners k*, 11ᵀ, I and a random kernel
        corners = [th.collapsed_kernel(y), np.ones((N, N)), np.eye(N), kernels["laplace-gauss"]]
        for i, w in enumerate(rng.dirichlet(np.full(4, 0.3), size=5)):
            kernels[f"mixture-{i}"] = sum(wi * c for wi, c in zip(w, corners))
        # Laplace kernel of two well-separated clusters, one per class
        clustered = rng.standard_normal((N, 3)) + 3 * y[:, None]
        kernels["laplace-clustered"] = np.exp(-distance.squareform(distance.pdist(clustered)) / 2)
        for name, k in kernels.items():
            assert np.allclose(np.diag(k), 1.0) and np.linalg.eigvalsh(k).min() > -1e-10, name
            for mu in (0.1, 1.0, 10.0, 100.0):
                assert th.krr_ratio(k, y, mu) <= 1 + 1e-12, (name, mu)


def test_bound_survives_an_optimizer_trying_to_beat_it():
    N, mu = 12, 3.0
    y = pm1(N)
    yt = torch.tensor(y)
    P = torch.randn(N, N, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([P], lr=0.05)

    def kernel():
        B = torch.exp(P)  # positive vectors: a Gram with positive entries, as every k_M has
        G = B @ B.T
        d = G.diagonal().rsqrt()
        return G * d[:, None] * d[None, :]  # unit diagonal, positive semi-definite

    for _ in range(400):
        k = kernel()
        obj = yt @ torch.linalg.solve(k + mu * torch.eye(N, dtype=torch.float64), k @ yt)
        opt.zero_grad()
        (-obj).backward()
        opt.step()
    ratio = th.krr_ratio(kernel().detach().numpy(), y, mu)
    assert 0.99 < ratio <= 1 + 1e-12  # it gets close, never above


def test_regularized_collapsed_kernel_approaches_the_bound():
    N, mu = 16, 5.0
    y = pm1(N)
    kstar = th.collapsed_kernel(y)
    eps = np.geomspace(1e-1, 1e-7, 7)
    ratios = np.array([th.krr_ratio((kstar + e * np.eye(N)) / (1 + e), y, mu) for e in eps])
    assert np.all(ratios < 1) and np.all(np.diff(ratios) > 0)
    assert 1 - ratios[-1] < 1e-6
    # without renormalizing the diagonal, k* + εI beats the bound: the unit diagonal matters
    assert th.krr_objective(kstar + 1e-2 * np.eye(N), y, mu) > th.krr_bound(N, mu)
    with pytest.raises(ValueError, match="unit-diagonal"):
        th.krr_ratio(kstar + 1e-2 * np.eye(N), y, mu)


def test_kernels_with_negative_entries_can_beat_the_bound():
    # the proof's Perron–Frobenius step needs positive entries (k_M = φ(‖x − z‖²_M) with φ > 0);
    # a unit-diagonal positive-definite kernel with negative entries beats 2n·n/(n + μ)
    N, mu, eps = 12, 3.0, 1e-6
    y = pm1(N)
    k = (np.outer(y, y) + eps * np.eye(N)) / (1 + eps)
    assert np.linalg.eigvalsh(k).min() > 0 and np.allclose(np.diag(k), 1)
    ratio = th.krr_objective(k, y, mu) / th.krr_bound(N, mu)
    assert ratio == pytest.approx((N + 2 * mu) / (N + mu), rel=1e-5)  # = 1.2
    with pytest.raises(ValueError, match="negative entr"):
        th.krr_ratio(k, y, mu)


def test_unbalanced_labels_exceed_the_balanced_bound():
    # why krr_ratio requires balanced labels: k* of classes of 14 and 2 beats 2n·n/(n + μ)
    y = np.where(np.arange(16) < 14, 1.0, -1.0)
    assert th.krr_objective(th.collapsed_kernel(y), y, 5.0) > th.krr_bound(16, 5.0)
    with pytest.raises(ValueError, match="as many"):
        th.krr_ratio(th.collapsed_kernel(y), y, 5.0)


@pytest.mark.parametrize("call, match", [
    (lambda: th.krr_objective(np.eye(4), pm1(4), -1.0), "mu"),
    (lambda: th.krr_objective(np.eye(4), pm1(4), 0.0), "mu"),
    (lambda: th.krr_objective(np.eye(4), pm1(6), 1.0), "one entry per row"),
    (lambda: th.krr_objective(-5 * np.eye(4), pm1(4), 1.0), "positive definite"),
    (lambda: th.krr_bound(7, 1.0), "even"),
    (lambda: th.krr_bound(8, -1.0), "mu"),
    (lambda: th.krr_ratio(np.eye(4), [1, -1, 0, 1], 1.0), "±1"),
    (lambda: th.collapsed_kernel([1.0, 0.5]), "±1"),
    (lambda: th.collapsed_kernel(np.ones((2, 2))), "1-D"),
])
def test_theorem55_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rfm_kernel_gets_closer_than_laplace_on_digits():
    from agop import datasets

    data = datasets.load("digits", n=600, balanced=True)
    keep = data.y < 2
    X, y = data.X[keep], np.where(data.y[keep] == 0, 1.0, -1.0)
    ks = th.rfm_kernels(X, y)
    for mu in (1.0, 10.0):
        plain, rfm = th.krr_ratio(ks["laplace"], y, mu), th.krr_ratio(ks["rfm"], y, mu)
        assert plain < rfm <= 1
    # k_M is the Laplace kernel of the rows of X M^{1/2}·s (Deep RFM's transform)
    X64 = X.astype(np.float64)
    Xn = torch.from_numpy(X64 / np.linalg.norm(X64, axis=1, keepdims=True))
    Z = Xn @ psd_power(torch.from_numpy(ks["agop"]), 0.5) * ks["scale"]
    np.testing.assert_allclose(LaplaceKernel(2.0)(Z).numpy(), ks["rfm"], rtol=0, atol=1e-10)
    # the metric scale makes the median pairwise distance equal to the plain kernel's
    iu = np.triu_indices(len(y), 1)
    assert np.median(-2 * np.log(ks["rfm"][iu])) == pytest.approx(
        np.median(-2 * np.log(ks["laplace"][iu])), rel=1e-9)
    with pytest.raises(ValueError, match="zero"):
        th.rfm_kernels(np.zeros((4, 3)), pm1(4))


def test_rfm_kernels_step_is_the_ridgeless_laplace_predictors_agop():
    """k_M's M is the AGOP of the ridgeless Laplace predictor on the unit-norm rows (Deep RFM's
    first layer), as kernel_ridge and kernel_agop give it directly; K is the Laplace kernel."""
    from agop import datasets
    from agop.agop import kernel_agop
    from agop.solve import kernel_ridge

    data = datasets.load("digits", n=300, balanced=True)
    keep = data.y < 2
    X, y = data.X[keep].astype(np.float64), np.where(data.y[keep] == 0, 1.0, -1.0)
    ks = th.rfm_kernels(X, y)
    Xn = torch.from_numpy(X / np.linalg.norm(X, axis=1, keepdims=True))
    kernel = LaplaceKernel(2.0)
    K = kernel(Xn)
    M = kernel_agop(kernel, Xn, kernel_ridge(K, torch.from_numpy(y)[:, None], 0.0).coef)
    np.testing.assert_allclose(ks["laplace"], K.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ks["agop"], M.numpy(), rtol=1e-9, atol=1e-12 * float(M.abs().max()))
    assert ks["jitter"] == 0.0


# ============================================================================ what the mutants showed
@pytest.mark.parametrize("call, message", [
    (lambda: th.relu_feature_distance(2.5), "^dist must lie in"),
    (lambda: th.relu_feature_ratio(-0.1), "^dist must lie in"),
    (lambda: th.relu_feature_ratio(np.nan), "^dist contains"),
    (lambda: th.simulate_relu_features(3.0), "^dist must lie in"),
    (lambda: th.simulate_relu_features(1.0, D=0), "^D must be"),
    (lambda: th.simulate_relu_features(1.0, trials=1), "^trials must be an integer ≥ 2"),
    (lambda: th.collapsed_gram_inverse(pm1(4), 0.0), "^lambda_phi must"),
    (lambda: th.collapsed_fixed_point(0.1, 1.0, 4.0, iterations=0), "^iterations must"),
    (lambda: th.contraction_rate([1.0, np.nan]), "^distances contains"),
    (lambda: th.contraction_rate([0.0, 1.0]), "positive first one"),
    (lambda: th.random_kernels(1), "^N must be an integer ≥ 2"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_simulation_defaults_and_standard_errors():
    dist = np.array([0.3, 1.0, 1.7])
    sim = th.simulate_relu_features(dist)
    assert (sim.D, sim.trials) == (8192, 100)
    explicit = th.simulate_relu_features(dist, D=8192, trials=100, seed=0)
    assert np.array_equal(sim.inner, explicit.inner)
    assert np.array_equal(sim.distance, explicit.distance)
    # the standard errors are those of means of 100 trials of sums over 8192 i.i.d. terms:
    # about 1e-3, so that "within 4 se" of the theory is a sharp test
    assert np.all(sim.inner_se < 5e-3) and np.all(sim.distance_se < 5e-3)
    assert np.all(np.abs(sim.inner - th.relu_feature_inner(1 - dist**2 / 2)) < 1e-2)
    # two trials are enough to estimate a standard error
    assert th.simulate_relu_features(dist, D=16, trials=2).trials == 2


def test_sin_minus_theta_cos_is_accurate_on_both_sides_of_the_series_switch():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    theta = np.array([0.3, 0.999, 1.0, 1.3, 1.7, 1.99, 2.5, 3.1])
    exact = np.array([float(mpmath.sin(t) - t * mpmath.cos(t))
                      for t in (mpmath.mpf(float(x)) for x in theta)])
    np.testing.assert_allclose(th._sin_minus_theta_cos(theta), exact, rtol=1e-15, atol=0)


def test_collapsed_fixed_point_defaults_to_the_exact_kappa():
    assert th.collapsed_fixed_point(0.3, 1.0, 8.0) == th.collapsed_fixed_point(0.3, 1.0, 8.0,
                                                                                "exact")
    assert th.collapsed_fixed_point(0.3, 1.0, 8.0) == pytest.approx(1.0, abs=1e-14)


def test_contraction_rate_at_the_edges_of_its_fit():
    assert th.contraction_rate([1.0, 0.5]) == pytest.approx(0.5, rel=1e-14)  # two entries
    # an entry exactly at floor·d₀ is round-off floor, not fitted (d₀ ≠ 1 on purpose)
    d0, floor = 4.0, 1e-12
    assert th.contraction_rate([d0, 2.0, floor * d0], floor) == pytest.approx(0.5, rel=1e-14)
    # float32 input is fitted in float64
    d32 = (3.0 * 0.2 ** np.arange(8)).astype(np.float32)
    slope = np.polyfit(np.arange(8), np.log(d32.astype(np.float64)), 1)[0]
    assert th.contraction_rate(d32) == pytest.approx(math.exp(slope), rel=1e-13)


def test_random_kernels_follow_their_documented_construction():
    # rebuilt from the docstring with the same generator, draw by draw
    N, seed = 9, 4
    rng = np.random.default_rng(seed)
    expected = {}
    for r in (2, 2, 18):  # 2, max(1, N // 4), 2N
        B = np.abs(rng.standard_normal((N, r)))
        G = B @ B.T
        n = np.sqrt(np.diag(G))
        expected[f"correlation-{r}"] = G / n[:, None] / n[None, :]
    expected["laplace-gauss"] = np.exp(-distance.cdist(*(2 * [rng.standard_normal((N, 5))])) / 2)
    expected["laplace-uniform"] = np.exp(-distance.cdist(*(2 * [rng.uniform(size=(N, 20))])) / 2)
    expected["gaussian"] = np.exp(-distance.cdist(*(2 * [rng.standard_normal((N, 3))])) ** 2 / 2)
    y = np.array([1.0] * 4 + [-1.0] * 5)
    expected["near-collapsed"] = (0.95 * (np.outer(y, y) > 0) + 0.05 * expected["correlation-18"])
    got = th.random_kernels(N, seed)
    assert sorted(got) == sorted(expected)
    for name, k in expected.items():
        np.testing.assert_allclose(got[name], k, rtol=1e-12, atol=1e-15, err_msg=name)
        assert np.all(np.diag(got[name]) == 1.0), name
    assert np.array_equal(th.random_kernels(N)["gaussian"], th.random_kernels(N, 0)["gaussian"])
    assert th.random_kernels(2)["correlation-1"].shape == (2, 2)  # max(1, N // 4) = 1


@pytest.mark.parametrize("call, message", [
    (lambda: th.kappa_value("exact", -0.1, 1.0, 4.0), "^lambda_k must"),
    (lambda: th.kappa_value("exact", 0.1, -1.0, 4.0), "^lambda_phi must"),
    (lambda: th.kappa_value("exact", 0.1, 1.0, 0.0), "^m must"),
    (lambda: th.kappa_value(-0.5, 0.1, 1.0, 4.0), "^kappa must"),
    (lambda: th.kappa_value("paper", 0.25, 1.0, 4.0), "≤ 0"),  # κ = 1 − 2·0.25·2 = 0 exactly
    (lambda: th.linearized_deep_rfm(np.triu(np.ones((4, 4))), pm1(4), 0.1, 1.0, 2),
     "^gram0 must be symmetric"),
    (lambda: th.linearized_deep_rfm(np.eye(4), pm1(4), 0.1, 1.0, 0), "^depth must"),
    (lambda: th.collapsed_kernel(np.array([1.0, 0.5])), "^y must hold ±1"),
    (lambda: th.rfm_kernels(np.ones((4, 3)), np.array([1.0, 2.0, 1.0, -1.0])), "^y must hold ±1"),
    (lambda: th.rfm_kernels(np.zeros((4, 3)), pm1(4)), "^X row 0"),
])
def test_theorem_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kappa_number_is_used_as_is_and_collapsed_kernel_is_float64():
    assert th.kappa_value(0.9, 0.1, 1.0, 4.0) == 0.9
    assert th.kappa_value(np.float32(0.5), 0.1, 1.0, 4.0) == 0.5
    k = th.collapsed_kernel(np.array([1, -1, 1], dtype=np.float32))
    assert k.dtype == np.float64
    assert np.array_equal(k, [[1, 0, 1], [0, 1, 0], [1, 0, 1]])


@pytest.mark.parametrize("call, message", [
    (lambda: th.relu_feature_inner(1.5), r"^r must lie in \[-1, 1\]; got \S*1\.5\)?$"),
    (lambda: th.relu_feature_inner([0.2, 0.3, -1.5]), r"^r must lie in .* at index \(2,\)$"),
    (lambda: th.collapsed_kernel(np.array([1.0, -1.0, 0.5])),
     r"^y must hold ±1 labels \(binary classification\); y\[2\] = "),
    (lambda: th.collapsed_kernel(np.array([1.0, np.nan])), "^y contains"),
    (lambda: th.collapsed_gram_inverse(np.array([[np.nan, 0.0], [0.0, 1.0]]), 1.0),
     "^y contains"),
    (lambda: th.collapsed_gram_inverse(np.zeros((4, 2)), 1.0), "orthogonal with equal norms"),
    (lambda: th.krr_objective(np.triu(np.ones((3, 3))), np.ones(3), 1.0),
     r"^k must be symmetric; k\[0, 1\]"),
    (lambda: th.krr_objective(np.eye(3), np.array([1.0, np.nan, 0.0]), 1.0), "^y contains"),
    (lambda: th.krr_objective(np.eye(3), np.ones(3), 0.0), "^mu must"),
    (lambda: th.krr_bound(1, 1.0), "^n_total must be an integer ≥ 2"),
    (lambda: th.krr_bound(4, -1.0), "^mu must"),
    (lambda: th.krr_ratio(np.triu(np.ones((2, 2))), pm1(2), 1.0), "^k must be symmetric"),
    (lambda: th.krr_ratio(np.diag([1.0, 1.5]), pm1(2), 1.0), r"k\[1, 1\] = \S*1\.5"),
    (lambda: th.krr_ratio(np.array([[1.0, -0.5], [-0.5, 1.0]]), pm1(2), 1.0),
     r"k\[0, 1\] = \S*-0\.5"),
    (lambda: th.krr_ratio(np.eye(2), np.array([1.0, 2.0]), 1.0), "^y must hold ±1"),
    (lambda: th.rfm_kernels(np.array([[1.0, np.nan], [0.0, 1.0]]), pm1(2)), "^X contains"),
])
def test_more_errors_name_the_argument_and_the_entry(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_domain_edges_and_scalar_results():
    from agop.theory import _DOMAIN_TOL

    # values within the round-off tolerance of the domain are clipped, not refused
    assert th.relu_feature_inner(-1.0 - _DOMAIN_TOL) == th.relu_feature_inner(-1.0)
    assert th.relu_feature_inner(1.0 + _DOMAIN_TOL) == 1.0
    # a scalar in, a Python/NumPy scalar out (not a 0-d array); float32 in, float64 out
    assert type(th.relu_feature_inner(0.3)) is np.float64
    assert type(th.relu_feature_distance(0.3)) is np.float64
    assert th.relu_feature_inner(np.array([0.3], dtype=np.float32)).dtype == np.float64
    assert th.relu_feature_inner(np.float32(0.3)) == th.relu_feature_inner(float(np.float32(0.3)))
    # a single ±1 label is a valid (if trivial) problem
    assert np.array_equal(th.collapsed_kernel(np.array([1.0])), [[1.0]])


def test_collapsed_targets_tolerance_is_relative_to_m():
    # one-hot of 2 classes × 1 sample (m = 1) is allowed; YᵀY = m·I is checked to 1e-10·m
    np.testing.assert_allclose(th.collapsed_gram_inverse(np.eye(2), 2.0),
                               np.eye(2) / 2.0 - np.eye(2) / (2.0 * 3.0), rtol=1e-15)
    Y = np.kron(np.eye(2), np.ones((2, 1))) * 10.0  # m = 200, tolerance 1e-10·m = 2e-8
    near = Y.copy()
    near[0, 0] += 7.5e-10  # (YᵀY)[0, 0] = m + 1.5e-8: within it
    th.collapsed_gram_inverse(near, 1.0)
    off = Y.copy()
    off[0, 0] += 1e-8  # m + 2e-7: beyond it, though only 1e-9 of m (the check is absolute)
    with pytest.raises(ValueError, match="orthogonal with equal norms"):
        th.collapsed_gram_inverse(off, 1.0)


def test_simulation_is_its_documented_monte_carlo():
    # rebuilt from the docstring: x = e₁, y = r e₁ + √(1 − r²) e₂, W's first two columns
    dist, D, trials, seed = np.array([[0.4, 1.2]]), 32, 6, 5
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, trials, D)) * math.sqrt(2.0 / D)
    fx = np.maximum(w[0], 0.0)
    sim = th.simulate_relu_features(dist, D=D, trials=trials, seed=seed)
    assert sim.distance.shape == dist.shape and np.array_equal(sim.dist, dist)
    for (i, j), d in np.ndenumerate(dist):
        r = 1 - d**2 / 2
        fy = np.maximum(r * w[0] + math.sqrt(1 - r * r) * w[1], 0.0)
        dd, ip = np.linalg.norm(fx - fy, axis=1), (fx * fy).sum(axis=1)
        assert sim.distance[i, j] == pytest.approx(dd.mean(), rel=1e-12)
        assert sim.distance_se[i, j] == pytest.approx(dd.std(ddof=1) / math.sqrt(trials),
                                                      rel=1e-12)
        assert sim.inner[i, j] == pytest.approx(ip.mean(), rel=1e-12)
        assert sim.inner_se[i, j] == pytest.approx(ip.std(ddof=1) / math.sqrt(trials), rel=1e-12)
    sq = (fx * fx).sum(axis=1)
    assert sim.sq_norm == pytest.approx(sq.mean(), rel=1e-12)
    assert sim.sq_norm_se == pytest.approx(sq.std(ddof=1) / math.sqrt(trials), rel=1e-12)
    scalar = th.simulate_relu_features(0.4, D=D, trials=trials, seed=seed)
    assert np.ndim(scalar.distance) == 0 and scalar.distance == sim.distance[0, 0]


def test_linearized_result_keeps_the_last_gram():
    n = 6
    res = th.linearized_deep_rfm(np.eye(n) + 0.1, pm1(n), 0.05, 1.0, 3)
    y = pm1(n)
    assert res.gram.shape == (n, n)
    assert res.spectral[-1] == pytest.approx(np.linalg.norm(res.gram - np.outer(y, y), 2),
                                             rel=1e-12)


def test_rfm_kernels_take_integer_labels():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((8, 4))
    y = np.array([1, -1] * 4)
    a, b = th.rfm_kernels(X, y), th.rfm_kernels(X, y.astype(np.float64))
    for key in ("laplace", "rfm"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-14)


@pytest.mark.parametrize("call, message", [
    (lambda: th.collapsed_gram_inverse(np.array([1.0, 0.5]), 1.0), "^y must hold ±1"),
    (lambda: th.krr_objective(np.array([[np.nan]]), np.ones(1), 1.0), "^k contains"),
    # symmetry is checked to 1e-10 · max(max|k|, 1): 1.5e-10 off on a kernel with entries ≤ 1
    (lambda: th.krr_objective(np.array([[1.0, 0.5], [0.5 + 1.5e-10, 1.0]]), np.ones(2), 1.0),
     "^k must be symmetric"),
])
def test_collapse_and_krr_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_symmetry_and_sign_tolerances_scale_as_documented():
    # 1e-10 off on entries of size 100 is within 1e-10·100 = 1e-8
    k = np.array([[100.0, 50.0], [50.0 + 1e-10, 100.0]])
    assert th.krr_objective(k, np.ones(2), 1.0) > 0
    # an entry of exactly −1e-12 is round-off, accepted (below it: refused)
    k = np.array([[1.0, -1e-12], [-1e-12, 1.0]])
    assert th.krr_ratio(k, pm1(2), 1.0) == pytest.approx(1.0, abs=1e-9)
