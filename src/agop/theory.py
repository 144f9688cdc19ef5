"""The paper's theory made executable: Proposition 5.1, Theorems 5.4 and 5.5.

- Proposition 5.1 (Section 5.2, Appendix A): the expected inner product of ReLU random features
  of two unit vectors, the expected feature distance as a function of the input distance
  (Figure 4), and a Monte-Carlo counterpart.
- Theorem 5.4 (Section 5.3, Appendix A.2): the linearized Deep RFM recursion on Gram matrices,
  its distance to the collapsed Gram YYᵀ layer by layer, and Lemma A.2's closed-form inverse.
- Theorem 5.5 (Section 5.4, Appendix A.1): the kernel ridge objective yᵀ(k + μI)⁻¹ky, its
  upper bound N·(N/2)/(N/2 + μ) for unit-diagonal kernels with non-negative entries (as every
  k_M = φ(‖x − z‖²_M) with φ > 0 has) and balanced ±1 labels, and the collapsed kernel k*
  that attains it.

Everything is computed in float64. The paper stores data as columns (d × n); the Gram matrices
here are n × n either way. The numerical checks of ``agop theory`` (the rows of ``theory.csv``,
the figures) are the experiment :mod:`agop.experiments.theory`; nothing here writes files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import linalg as sla

from agop._validate import as_float64_matrix, check_finite, check_int, check_positive, to_numpy

# Round-off allowance for inputs on the boundary of their domain (r = ±1, dist = 2): values
# this far outside are clipped, anything further raises.
_DOMAIN_TOL = 1e-12


# ============================================================================ Proposition 5.1
def _as_float_array(a, name: str) -> np.ndarray:
    arr = np.asarray(to_numpy(a), dtype=np.float64)
    check_finite(arr, name)
    return arr


def _in_range(a, name: str, lo: float, hi: float) -> np.ndarray:
    arr = _as_float_array(a, name)
    bad = (arr < lo - _DOMAIN_TOL) | (arr > hi + _DOMAIN_TOL)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f" at index {idx}" if idx else ""
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}]; got {arr[idx]!r}{where}")
    return np.clip(arr, lo, hi)


def _scalar_or_array(x: np.ndarray):
    return x[()] if x.ndim == 0 else x


def relu_feature_inner(r):
    """E[σ(Wx)ᵀσ(Wy)] for unit x, y with xᵀy = r and W_ij ~ N(0, 2/D) i.i.d. (Prop. 5.1, eq. (1)).

    Computed in the degree-1 arc-cosine form (√(1−r²) + (π − arccos r)·r)/π, equal to eq. (1)
    on (−1, 1) (arctan(r/√(1−r²)) = arcsin r) and exact at r = ±1, where eq. (1) divides by
    zero. The value does not depend on D. ``r``: scalar or array in [−1, 1]; same shape back.
    """
    r = _in_range(r, "r", -1.0, 1.0)
    return _scalar_or_array((np.sqrt((1.0 - r) * (1.0 + r)) + (np.pi - np.arccos(r)) * r) / np.pi)


def _sin_minus_theta_cos(theta: np.ndarray) -> np.ndarray:
    """sin θ − θ cos θ for θ ∈ [0, π], by its Taylor series below 1 (the difference cancels)."""
    out = np.sin(theta) - theta * np.cos(theta)
    small = theta < 1.0
    t = theta[small]
    # sin θ − θ cos θ = Σ_{k≥1} (−1)^{k+1} 2k θ^{2k+1}/(2k+1)!; 10 terms reach 1e-19 at θ = 1
    series = np.zeros_like(t)
    for k in range(10, 0, -1):
        series += (-1) ** (k + 1) * 2 * k * t ** (2 * k + 1) / math.factorial(2 * k + 1)
    out[small] = series
    return out


def _feature_distance_sq_ratio(dist: np.ndarray) -> np.ndarray:
    """(feature distance / input distance)² for dist ∈ (0, 2], without cancellation near 0."""
    theta = 2.0 * np.arcsin(dist / 2.0)  # the angle between x and y: dist = 2 sin(θ/2)
    # 2 − 2·k₁(cos θ) = dist² − (2/π)(sin θ − θ cos θ)
    return 1.0 - (2.0 / np.pi) * _sin_minus_theta_cos(theta) / dist**2


def relu_feature_distance(dist):
    """Large-D limit of E‖σ(Wx) − σ(Wy)‖ for unit x, y with ‖x − y‖ = dist (Fig. 4, left).

    The squared feature distance is a sum of D i.i.d. terms, so it concentrates and
    E‖·‖ → √(E‖σ(Wx)‖² + E‖σ(Wy)‖² − 2E[σ(Wx)ᵀσ(Wy)]) = √(2 − 2·relu_feature_inner(r)) with
    r = 1 − dist²/2 and E‖σ(Wx)‖² = D·(2/D)·E[σ(g)²] = 1. At finite D the mean is smaller by
    O(1/D) (Jensen). ``dist``: scalar or array in [0, 2]; same shape back; √2 at dist = 2.
    """
    dist = _in_range(dist, "dist", 0.0, 2.0)
    return _scalar_or_array(dist * np.sqrt(_ratio_sq(dist)))


def _ratio_sq(dist: np.ndarray) -> np.ndarray:
    out = np.ones_like(dist)
    pos = dist > 0
    out[pos] = _feature_distance_sq_ratio(dist[pos])
    return out


def relu_feature_ratio(dist):
    """E‖σ(Wx) − σ(Wy)‖ / ‖x − y‖ in the large-D limit (Figure 4, right).

    Decreases monotonically from 1 (its limit at dist → 0, returned at dist = 0) to 1/√2 at
    dist = 2 (r = −1: the features are orthogonal, each of unit norm). ``dist`` in [0, 2].
    """
    dist = _in_range(dist, "dist", 0.0, 2.0)
    return _scalar_or_array(np.sqrt(_ratio_sq(dist)))


@dataclass(frozen=True)
class ReluSimulation:
    """Monte-Carlo estimates of Proposition 5.1 (:func:`simulate_relu_features`).

    Every array has the shape of ``dist``; ``*_se`` are standard errors over ``trials``
    independent draws of W. ``distance``: ‖σ(Wx) − σ(Wy)‖; ``inner``: σ(Wx)ᵀσ(Wy);
    ``sq_norm``: the mean of ‖σ(Wx)‖² over the trials (expected 1 under N(0, 2/D)).
    """

    dist: np.ndarray
    distance: np.ndarray
    distance_se: np.ndarray
    inner: np.ndarray
    inner_se: np.ndarray
    sq_norm: float
    sq_norm_se: float
    D: int
    trials: int


def simulate_relu_features(dist, D: int = 8192, trials: int = 100, seed: int = 0) -> ReluSimulation:
    """Monte-Carlo of σ(Wx), σ(Wy) for unit x, y at the distances ``dist`` (Prop. 5.1, Fig. 4).

    W has i.i.d. N(0, 2/D) entries (D rows). By the rotation invariance of W's rows, x = e₁ and
    y = r e₁ + √(1−r²) e₂ with r = 1 − dist²/2 lose no generality, so only W's first two
    columns are drawn. Each trial draws one W shared by all distances (common random numbers:
    the curve is smooth, the errors correlated across distances).
    """
    d = _in_range(dist, "dist", 0.0, 2.0)
    D = check_int(D, "D")
    trials = check_int(trials, "trials", minimum=2)
    flat = np.atleast_1d(d).ravel()
    r = 1.0 - flat**2 / 2.0
    s = np.sqrt((1.0 - r) * (1.0 + r))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((2, trials, D)) * math.sqrt(2.0 / D)
    fx = np.maximum(w[0], 0.0)
    stats = {k: np.empty((len(flat), 2)) for k in ("distance", "inner")}
    for i in range(len(flat)):
        fy = np.maximum(r[i] * w[0] + s[i] * w[1], 0.0)
        for key, values in (("distance", np.linalg.norm(fx - fy, axis=1)),
                            ("inner", np.einsum("td,td->t", fx, fy))):
            stats[key][i] = values.mean(), values.std(ddof=1) / math.sqrt(trials)
    sq = np.einsum("td,td->t", fx, fx)
    shape = np.shape(d)

    def out(a):
        return a.reshape(shape)

    return ReluSimulation(
        dist=out(flat), distance=out(stats["distance"][:, 0]),
        distance_se=out(stats["distance"][:, 1]), inner=out(stats["inner"][:, 0]),
        inner_se=out(stats["inner"][:, 1]),
        sq_norm=float(sq.mean()), sq_norm_se=float(sq.std(ddof=1) / math.sqrt(trials)),
        D=D, trials=trials)


# ============================================================================ Theorem 5.4
def _collapse_targets(y, n: int | None = None) -> tuple[np.ndarray, float]:
    """Y as n × K float64 with YᵀY = m·I (Lemma A.2's yyᵀ = m·UUᵀ); returns (Y, m).

    A 1-D ``y`` must hold ±1 labels (then m = n); an n × K matrix must have orthogonal columns
    of equal squared norm m, e.g. the 0/1 one-hot matrix of classes of equal size.
    """
    arr = np.asarray(to_numpy(y), dtype=np.float64)
    if arr.ndim == 1:
        _check_pm1(arr, "y")
        arr = arr[:, None]
    else:
        arr = as_float64_matrix(arr, "y")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"y has {arr.shape[0]} row(s) but the Gram matrix is {n} × {n}")
    gram = arr.T @ arr
    m = float(gram[0, 0])
    if m <= 0 or not np.allclose(gram, m * np.eye(arr.shape[1]), rtol=0, atol=1e-10 * m):
        raise ValueError(
            "the columns of y must be orthogonal with equal norms (YᵀY = m·I, the setting of "
            f"Lemma A.2, e.g. one-hot 0/1 labels of equal-size classes); got YᵀY = {gram.tolist()}"
        )
    return arr, m


def _check_pm1(y: np.ndarray, name: str, *, balanced: bool = False) -> None:
    check_finite(y, name)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector of ±1 labels; got shape {y.shape}")
    bad = np.abs(y) != 1
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name} must hold ±1 labels (binary classification); {name}[{i}] = {y[i]!r}")
    if balanced and y.sum() != 0:
        raise ValueError(
            f"{name} must have as many +1 as −1 labels (Theorem 5.5's two classes of n points); "
            f"got {int((y > 0).sum())} and {int((y < 0).sum())}"
        )


def collapsed_gram_inverse(y, lambda_phi: float) -> np.ndarray:
    """(YYᵀ + λ_Φ I)⁻¹ in closed form (Lemma A.2): λ_Φ⁻¹I − λ_Φ⁻¹(λ_Φ + m)⁻¹ YYᵀ.

    ``y``: ±1 vector (n,) (then m = ‖y‖² = n) or n × K with YᵀY = m·I. Returns n × n float64.
    """
    Y, m = _collapse_targets(y)
    check_positive(lambda_phi, "lambda_phi")
    lam = float(lambda_phi)
    return np.eye(len(Y)) / lam - (Y @ Y.T) / (lam * (lam + m))


def kappa_value(kappa: str | float, lambda_k: float, lambda_phi: float, m: float) -> float:
    """The per-layer scale κ of the linearized recursion (Section 5.3).

    - ``"paper"``: κ = 1 − 2λ_k(1 + λ_Φ⁻¹), as printed. Its derivation uses
      yyᵀ(A*)⁻¹ = (1 + λ_Φ⁻¹)yyᵀ, but Lemma A.2 gives yyᵀ(A*)⁻¹ = (m + λ_Φ)⁻¹yyᵀ; with this κ
      the recursion settles at a distance O(λ_k·m) from yyᵀ, not O(λ_k²/λ_Φ²).
    - ``"exact"``: κ = ((m + λ_Φ)/(m + λ_Φ + λ_k))², which makes A* = YYᵀ + λ_Φ I an exact
      fixed point (its first-order expansion is the corrected 1 − 2λ_k/(m + λ_Φ)).
    - a number: used as is (must be > 0).

    ``m`` = ‖y‖² (n for ±1 labels), the nonzero eigenvalue of YYᵀ.
    """
    check_positive(lambda_k, "lambda_k", allow_zero=True)
    check_positive(lambda_phi, "lambda_phi", allow_zero=True)
    check_positive(m, "m")
    lambda_k, lambda_phi, m = float(lambda_k), float(lambda_phi), float(m)
    if kappa == "exact":
        return ((m + lambda_phi) / (m + lambda_phi + lambda_k)) ** 2
    if kappa == "paper":
        if lambda_phi == 0:
            raise ValueError("kappa='paper' is undefined for lambda_phi = 0 (κ contains 1/λ_Φ); "
                             "use kappa='exact'")
        value = 1.0 - 2.0 * lambda_k * (1.0 + 1.0 / lambda_phi)
        if value <= 0:
            raise ValueError(f"kappa='paper' gives κ = 1 − 2λ_k(1 + 1/λ_Φ) = {value:.4g} ≤ 0 for "
                             f"λ_k = {lambda_k}, λ_Φ = {lambda_phi}: no rescaling (the theorem assumes κ > 1/2)")
        return value
    if isinstance(kappa, str):
        raise ValueError(f"kappa must be 'exact', 'paper' or a number > 0; got {kappa!r}")
    check_positive(kappa, "kappa")
    return float(kappa)


@dataclass(frozen=True)
class LinearizedRFMResult:
    """Distances of the linearized Deep RFM Grams to YYᵀ (:func:`linearized_deep_rfm`).

    ``spectral[i]`` / ``frobenius[i]``: ‖X̃ᵀX̃ − YYᵀ‖ (operator norm, the theorem's; and
    Frobenius) for X̃ = X̃_{i+2}, the Gram after i + 1 RFM steps (the paper's layers 2..L+1).
    ``initial``: ‖gram0 − YYᵀ‖₂. ``gram``: the last X̃ᵀX̃ (n × n).
    """

    spectral: np.ndarray
    frobenius: np.ndarray
    initial: float
    kappa: float
    gram: np.ndarray


def linearized_deep_rfm(gram0, y, lambda_k: float, lambda_phi: float, depth: int, *,
                        kappa: str | float = "exact") -> LinearizedRFMResult:
    """Iterate the Gram recursion of Theorem 5.4 (Section 5.3) for ``depth`` layers.

    With A = X_lᵀX_l (n × n) and the kernel k_lin(X) = XᵀX + λ_k I, the ridgeless coefficients
    are α = (A + λ_k I)⁻¹Y; the predictor f(z) = Σⱼ αⱼ x_jᵀz has the constant gradient Xα, so
    its AGOP (averaged over the points) is M = Xααᵀ Xᵀ and
        X̃ᵀX̃ = κ⁻¹ XᵀMX = κ⁻¹ A(A + λ_k I)⁻¹ YYᵀ (A + λ_k I)⁻¹ A,
    then the linearized feature map adds λ_Φ I: X_{l+1}ᵀX_{l+1} = X̃ᵀX̃ + λ_Φ I.

    Parameters
    ----------
    gram0 : array_like
        X₁ᵀX₁, symmetric positive semi-definite n × n (Assumption 5.3 asks λ_min ≥ λ_Φ).
    y : array_like
        ±1 labels (n,) or n × K with YᵀY = m·I (see :func:`collapsed_gram_inverse`).
    lambda_k : float
        λ_k ≥ 0 (0: a linear kernel, which collapses in one step if A is invertible).
    lambda_phi : float
        λ_Φ ≥ 0 (0: a linear feature map; the paper: no collapse).
    depth : int
        The number of RFM steps.
    kappa : {"exact", "paper"} or float
        See :func:`kappa_value`; default ``"exact"`` so that the collapsed Gram is a fixed
        point and the distance contracts to 0.

    Returns
    -------
    LinearizedRFMResult
        The distances to YYᵀ after each step, and the last Gram.
    """
    G = _symmetric(gram0, "gram0")
    n = G.shape[0]
    Y, m = _collapse_targets(y, n)
    kap = kappa_value(kappa, lambda_k, lambda_phi, m)
    lambda_k, lambda_phi = float(lambda_k), float(lambda_phi)
    depth = check_int(depth, "depth")
    target = Y @ Y.T
    initial = float(np.linalg.norm(G - target, 2))
    eye = np.eye(n)
    spectral, frobenius = [], []
    for layer in range(depth):
        try:
            factor = sla.cho_factor(G + lambda_k * eye)
        except sla.LinAlgError:
            raise ValueError(f"X_{layer + 1}ᵀX_{layer + 1} + λ_k I is not positive definite "
                             "(gram0 singular with lambda_k = 0?)") from None
        # A(A + λ_k I)⁻¹Y = Y − λ_k(A + λ_k I)⁻¹Y: one solve, no product with A
        V = Y - lambda_k * sla.cho_solve(factor, Y)
        gram = (V @ V.T) / kap
        diff = gram - target
        spectral.append(np.linalg.norm(diff, 2))
        frobenius.append(np.linalg.norm(diff, "fro"))
        G = gram + lambda_phi * eye
    return LinearizedRFMResult(np.array(spectral), np.array(frobenius), initial, kap, gram)


def collapsed_fixed_point(lambda_k: float, lambda_phi: float, m: float,
                          kappa: str | float = "exact", iterations: int = 500) -> float:
    """t* with t*·YYᵀ the limit of the linearized recursion started on span(YYᵀ) (Thm 5.4).

    On X̃ᵀX̃ = t·YYᵀ the recursion acts on t alone: t ← c(t)²/κ with
    c(t) = (t m + λ_Φ)/(t m + λ_Φ + λ_k); the limiting distance to YYᵀ is m·|t* − 1|
    (0 for ``kappa="exact"``).
    """
    kap = kappa_value(kappa, lambda_k, lambda_phi, m)
    t = 1.0
    for _ in range(check_int(iterations, "iterations")):
        t = ((t * m + lambda_phi) / (t * m + lambda_phi + lambda_k)) ** 2 / kap
    return t


def contraction_rate(distances, floor: float = 1e-12) -> float:
    """Per-layer contraction factor ρ of a distance sequence: exp of the least-squares slope
    of log d_l against l (ρ < 1: geometric convergence, as Theorem 5.4 predicts).

    Only the leading entries above ``floor``·d₀ are fitted: below that the sequence sits at the
    round-off floor of float64 and no longer contracts. Needs at least two such entries.
    """
    d = np.asarray(to_numpy(distances), dtype=np.float64).ravel()
    check_finite(d, "distances")
    if d.size < 2 or d[0] <= 0:
        raise ValueError(f"distances needs at least 2 entries with a positive first one; got {d}")
    if (d < 0).any():
        raise ValueError(f"distances must be ≥ 0; got {d}")
    above = d > floor * d[0]
    keep = int(np.argmin(above)) if not above.all() else d.size
    if keep < 2:
        raise ValueError(f"fewer than 2 distances above floor·d₀ = {floor * d[0]:.3g}; got {d}")
    slope = np.polyfit(np.arange(keep), np.log(d[:keep]), 1)[0]
    return float(np.exp(slope))


def _symmetric(a, name: str) -> np.ndarray:
    A = as_float64_matrix(a, name)
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square n × n matrix; got shape {A.shape}")
    scale = max(float(np.abs(A).max()), 1.0)
    asym = np.abs(A - A.T)
    if asym.max() > 1e-10 * scale:
        i, j = np.unravel_index(int(np.argmax(asym)), A.shape)
        raise ValueError(f"{name} must be symmetric; {name}[{i}, {j}] = {A[i, j]!r} but "
                         f"{name}[{j}, {i}] = {A[j, i]!r}")
    return 0.5 * (A + A.T)


# ============================================================================ Theorem 5.5
def collapsed_kernel(y) -> np.ndarray:
    """k* = ½(yyᵀ + 11ᵀ): 1 within a class, 0 across (Theorem 5.5). ``y``: ±1 labels (N,)."""
    arr = np.asarray(to_numpy(y), dtype=np.float64)
    _check_pm1(arr, "y")
    return 0.5 * (np.outer(arr, arr) + 1.0)


def krr_objective(k, y, mu: float) -> float:
    """yᵀ(k + μI)⁻¹ k y, the value of Problem (4) at the optimal α for the kernel k (Thm 5.5).

    ``k``: symmetric positive semi-definite N × N; ``y``: real targets (N,); ``mu``: μ > 0
    (at μ = 0 the objective is ‖y‖² for every positive-definite k). One Cholesky solve of
    k + μI, no inverse.
    """
    K = _symmetric(k, "k")
    v = _as_float_array(y, "y")
    if v.ndim != 1 or v.shape[0] != K.shape[0]:
        raise ValueError(f"y must be a vector with one entry per row of k ({K.shape[0]}); "
                         f"got shape {v.shape}")
    check_positive(mu, "mu")
    try:
        factor = sla.cho_factor(K + float(mu) * np.eye(len(K)))
    except sla.LinAlgError:
        raise ValueError(f"k + μI is not positive definite for μ = {mu}: k must be positive "
                         "semi-definite") from None
    return float(sla.cho_solve(factor, v) @ (K @ v))


def krr_bound(n_total: int, mu: float) -> float:
    """Theorem 5.5's bound 2n·n/(n + μ) = N·(N/2)/(N/2 + μ) for N = 2n balanced ±1 labels."""
    N = check_int(n_total, "n_total", minimum=2)
    if N % 2:
        raise ValueError(f"n_total must be even (two classes of n points); got {N}")
    check_positive(mu, "mu")
    half = N / 2
    return N * half / (half + float(mu))


def krr_ratio(k, y, mu: float) -> float:
    """krr_objective / krr_bound after checking Theorem 5.5's hypotheses (≤ 1 by the theorem).

    ``k`` must have a unit diagonal (|k_ii − 1| ≤ 1e-8) and no negative entries, and ``y``
    balanced ±1 labels. The proof's Perron–Frobenius step needs the entries' sign, which the
    statement leaves implicit in k_M = φ(‖x − z‖²_M), φ > 0: the unit-diagonal positive-definite
    (yyᵀ + εI)/(1 + ε) exceeds the bound by a factor → (N + 2μ)/(N + μ) as ε → 0.
    """
    K = _symmetric(k, "k")
    bad = np.abs(np.diag(K) - 1.0) > 1e-8
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"Theorem 5.5 needs a unit-diagonal kernel; k[{i}, {i}] = {K[i, i]!r}")
    if K.min() < -1e-12:
        i, j = np.unravel_index(int(np.argmin(K)), K.shape)
        raise ValueError(f"Theorem 5.5 needs a kernel without negative entries (k_M = φ(·) > 0); "
                         f"k[{i}, {j}] = {K[i, j]!r}")
    v = np.asarray(to_numpy(y), dtype=np.float64)
    _check_pm1(v, "y", balanced=True)
    return krr_objective(K, v, mu) / krr_bound(len(v), mu)


def random_kernels(N: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random unit-diagonal positive-semi-definite N × N kernels with non-negative entries
    (the class of Theorem 5.5).

    - ``correlation-r``: normalized Gram of N vectors with |Gaussian| entries in R^r
      (r = 2, N/4, 2N; low r gives strongly correlated, near-singular kernels);
    - ``laplace-gauss`` / ``laplace-uniform`` / ``gaussian``: exp(−‖x − z‖/2) and
      exp(−‖x − z‖²/2) of random points;
    - ``near-collapsed``: 0.95·k* + 0.05·``correlation-2N`` for balanced labels (first half +1),
      a kernel close to the bound.
    """
    N = check_int(N, "N", minimum=2)
    rng = np.random.default_rng(seed)
    out = {}
    for r in (2, max(1, N // 4), 2 * N):
        B = np.abs(rng.standard_normal((N, r)))
        d = np.linalg.norm(B, axis=1)
        out[f"correlation-{r}"] = (B @ B.T) / np.outer(d, d)
        np.fill_diagonal(out[f"correlation-{r}"], 1.0)
    out["laplace-gauss"] = np.exp(-_pdist(rng.standard_normal((N, 5))) / 2.0)
    out["laplace-uniform"] = np.exp(-_pdist(rng.uniform(size=(N, 20))) / 2.0)
    out["gaussian"] = np.exp(-_pdist(rng.standard_normal((N, 3))) ** 2 / 2.0)
    y = np.where(np.arange(N) < N // 2, 1.0, -1.0)
    out["near-collapsed"] = 0.95 * collapsed_kernel(y) + 0.05 * out[f"correlation-{2 * N}"]
    return out


def _pdist(X: np.ndarray) -> np.ndarray:
    diff = X[:, None, :] - X[None, :, :]
    return np.sqrt((diff**2).sum(-1))


def rfm_kernels(X, y, bandwidth: float = 2.0) -> dict:
    """The plain Laplace kernel and k_M after one RFM step on the same data (Section 5.4).

    The step is Deep RFM's first layer, by its own primitives (:mod:`agop.models.deep_rfm`):
    rows of X normalized to unit norm (``normalize_rows``); K = exp(−‖x − z‖/L)
    (``kernel_matrix``); ridgeless kernel regression on y and M = the AGOP of that predictor,
    self terms dropped (``fit_layer``). Then k_M(x, z) = exp(−s‖x − z‖_M/L) with
    ‖x − z‖²_M = (x − z)ᵀM(x − z), read off the Gram X M Xᵀ (the Laplace kernel of the rows of
    X M^{1/2}; self-distances set to exactly 0). The scale of an AGOP is arbitrary (Algorithm 1
    even omits the 1/N), so s = median ‖x − z‖ / median ‖x − z‖_M over pairs: k_M has the same
    typical distance as the plain kernel and differs only in geometry.

    Parameters
    ----------
    X : array_like
        N × D inputs (float64); no row may be zero.
    y : array_like
        ±1 labels, (N,).
    bandwidth : float
        L, the Laplace kernel's bandwidth.

    Returns
    -------
    dict
        ``laplace`` and ``rfm`` (N × N float64), ``agop`` (M, D × D, unscaled), ``scale`` (s)
        and ``jitter`` (the solver's).
    """
    import torch

    from agop.kernels import LaplaceKernel, pairwise_distances
    from agop.models.deep_rfm import fit_layer, kernel_matrix, normalize_rows

    Xt = torch.from_numpy(as_float64_matrix(X, "X"))
    v = np.asarray(to_numpy(y), dtype=np.float64)
    _check_pm1(v, "y")
    if len(v) != len(Xt):
        raise ValueError(f"y has {len(v)} labels but X has {len(Xt)} rows")
    Xt = normalize_rows(Xt, "X")
    kernel = LaplaceKernel(bandwidth)
    layer = fit_layer(Xt, torch.from_numpy(v)[:, None], kernel)  # Deep RFM's layer 1, ridgeless
    M = layer.agop
    G = Xt @ M @ Xt.T
    sq = G.diagonal()
    dist_M = (sq[:, None] + sq[None, :] - 2 * G).clamp_(min=0.0).fill_diagonal_(0.0).sqrt_()
    iu = np.triu_indices(len(v), 1)
    scale = float(np.median(pairwise_distances(Xt).numpy()[iu]) / np.median(dist_M.numpy()[iu]))
    return {"laplace": kernel_matrix(kernel, Xt).numpy(),
            "rfm": kernel.from_distances(dist_M * scale).numpy(), "agop": M.numpy(),
            "scale": scale, "jitter": layer.jitter}
