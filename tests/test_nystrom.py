"""Nyström solver (agop.nystrom): against the exact solver, a direct float64 least-squares
solve, autograd, and a multi-rank split simulated with threads."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from agop import nystrom as ny
from agop.agop import kernel_agop
from agop.distributed import Comm, local, row_range
from agop.kernels import GaussianKernel, LaplaceKernel
from agop.solve import kernel_ridge, signed_one_hot


def _data(N=60, D=6, K=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True)
    y = np.arange(N) % K
    return X.to(dtype), y


def _kmat(kernel, A, B):
    """k(A, B) from explicit differences: an exact 0 distance for identical rows."""
    return kernel.from_distances(((A[:, None, :] - B[None, :, :]) ** 2).sum(-1).sqrt())


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- select_centers
def test_select_centers_class_balanced_and_reproducible():
    y = np.repeat(np.arange(4), [50, 30, 40, 20])
    c = ny.select_centers(y, 42, seed=3)
    assert c.dtype == np.int64 and len(c) == 42 and np.all(np.diff(c) > 0)
    counts = np.bincount(y[c], minlength=4)
    assert counts.sum() == 42 and set(counts) <= {10, 11}  # ⌊42/4⌋ each, remainder spread
    assert np.array_equal(c, ny.select_centers(y, 42, seed=3))
    assert not np.array_equal(c, ny.select_centers(y, 42, seed=4))
    assert np.array_equal(ny.select_centers(y, len(y), seed=0), np.arange(len(y)))


def test_select_centers_respreads_what_a_small_class_lacks():
    y = np.repeat(np.arange(3), [2, 100, 100])
    counts = np.bincount(y[ny.select_centers(y, 31, seed=0)], minlength=3)
    assert counts[0] == 2 and sorted(counts[1:]) == [14, 15]
    y = np.repeat(np.arange(3), [1, 3, 100])
    assert list(np.bincount(y[ny.select_centers(y, 60, seed=1)])) == [1, 3, 56]


@pytest.mark.parametrize("M, match", [(11, "exceed the N = 10"), (2, "fewer than the K = 3"),
                                      (0, "^M \\(the number of centers\\) must be an integer ≥ 1")])
def test_select_centers_bad_input(M, match):
    with pytest.raises(ValueError, match=match):
        ny.select_centers(np.arange(10) % 3, M)
    with pytest.raises(ValueError, match="^seed must be an integer ≥ 0"):
        ny.select_centers(np.arange(10) % 3, 4, seed=-1)


def test_select_centers_takes_the_classes_present_and_seed_0_by_default():
    y = np.repeat([0, 2, 5], [6, 9, 3])  # classes 1, 3, 4 have no points: K = 3 present
    c = ny.select_centers(y, 9)
    assert np.array_equal(c, ny.select_centers(y, 9, seed=0))
    assert list(np.bincount(y[c], minlength=6)) == [3, 0, 3, 0, 0, 3]
    one = ny.select_centers(np.full(8, 4), 1, seed=2)  # one class, one center
    assert len(one) == 1 and 0 <= one[0] < 8
    assert np.array_equal(ny.select_centers(np.full(8, 4), 8), np.arange(8))


def test_select_centers_water_filling_is_balanced_for_every_seed():
    # M = 8 over a class of one point and two of 50: ⌊8/3⌋ = 2 each and 2 extras; class 0
    # takes 1, the other 7 go 4 + 3 to the two open classes whichever the extras fall on
    # (only the open classes share what is left; a last round may place a single center)
    y = np.repeat([0, 1, 2], [1, 50, 50])
    for seed in range(40):
        c = ny.select_centers(y, 8, seed=seed)
        counts = np.bincount(y[c])
        assert len(np.unique(c)) == 8 and counts[0] == 1 and sorted(counts[1:]) == [3, 4]
        c = ny.select_centers(np.repeat([0, 1], [1, 9]), 3, seed=seed)
        assert list(c[:1]) == [0] and len(np.unique(c)) == 3


def test_agop_sample_is_seeded_sorted_and_distinct():
    s = ny.agop_sample(50, 20)
    assert np.array_equal(s, ny.agop_sample(50, 20, seed=0)) and s.dtype == np.int64
    assert np.array_equal(s, np.sort(np.random.default_rng([1, 0]).choice(50, 20, replace=False)))
    assert len(np.unique(s)) == 20 and np.all(np.diff(s) > 0)
    assert np.array_equal(ny.agop_sample(7, 7, seed=3), np.arange(7))
    assert np.array_equal(ny.agop_sample(1, 1), [0])
    for args, match in (((0, 1), "^N must be an integer ≥ 1"),
                        ((5, 0), "^agop_points must be an integer ≥ 1"),
                        ((5, 6), "^agop_points = 6 exceeds the N = 5"),
                        ((5, 2, -1), "^seed must be an integer ≥ 0")):
        with pytest.raises(ValueError, match=match):
            ny.agop_sample(*args)


# ----------------------------------------------------------------------------- the solve
SOLVE = ["cgls", "tsqr"]


@pytest.mark.parametrize("solver", SOLVE)
@pytest.mark.parametrize("kernel", [LaplaceKernel(2.0), GaussianKernel(1.0)], ids=repr)
def test_all_points_as_centers_with_tiny_ridge_is_the_exact_solver(kernel, solver):
    X, y = _data()
    N = len(y)
    Y = signed_one_hot(torch.as_tensor(y), 3, torch.float64)
    exact = kernel_ridge(kernel(X), Y, 0.0)
    fit = ny.fit_nystrom(X, y, np.arange(N), kernel, ridge=1e-14, solver=solver)
    assert fit.solver == solver
    assert _rel(fit.coef, exact.coef) < 1e-8
    assert _rel(fit.fitted, exact.fitted()) < 1e-9
    assert fit.residual < 1e-9 and fit.trusted
    # the AGOP at the training points, every self term dropped, as the exact path does
    assert _rel(fit.agop, kernel_agop(kernel, X, exact.coef)) < 1e-8


@pytest.mark.parametrize("solver", SOLVE)
@pytest.mark.parametrize("ridge", [1e-2, 1e-6, 0.0])
@pytest.mark.parametrize("per_class", [True, False])
def test_matches_float64_lstsq_of_the_stacked_problem(ridge, per_class, solver):
    X, y = _data(N=70, seed=1)
    kernel = LaplaceKernel(2.0)
    centers = ny.select_centers(y, 25, seed=2)
    fit = ny.fit_nystrom(X, y, centers, kernel, ridge, per_class=per_class, block_rows=9,
                         solver=solver)
    Y = signed_one_hot(torch.as_tensor(y), 3, torch.float64)
    A, b = _kmat(kernel, X, X[centers]), Y
    if ridge:
        Rcc = torch.linalg.cholesky(_kmat(kernel, X[centers], X[centers])).T
        A = torch.cat([A, ridge**0.5 * Rcc])
        b = torch.cat([Y, torch.zeros(25, 3, dtype=torch.float64)])
    alpha = torch.linalg.lstsq(A, b).solution
    assert _rel(fit.coef, alpha) < 1e-11
    F = _kmat(kernel, X, X[centers]) @ alpha
    assert _rel(fit.fitted, F) < 1e-12  # from the blocks, not the least-squares identity
    assert fit.residual == pytest.approx(_rel(F, Y), rel=1e-10)
    obj = float(((A @ alpha - b) ** 2).sum() / (Y**2).sum())
    assert fit.objective == pytest.approx(obj, rel=1e-10)
    assert fit.condition == pytest.approx(float(torch.linalg.cond(A)), rel=0.05)
    assert fit.optimality < 1e-13 and fit.trusted
    P = _data(N=9, seed=11)[0]
    assert _rel(fit.predict(kernel, P), _kmat(kernel, P, X[centers]) @ alpha) < 1e-12
    # at the training points a center's self-distance is sqrt(rounding) ≈ 1e-8, not 0 by index
    assert torch.allclose(fit.predict(kernel, X), fit.fitted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVE)
def test_block_size_and_keeping_knc_do_not_change_the_numbers(solver):
    X, y = _data(N=50, seed=3)
    centers = ny.select_centers(y, 20, seed=0)
    ref = ny.fit_nystrom(X, y, centers, ridge=1e-4, keep_knc=False, block_rows=50, chunk_rows=50,
                         solver=solver)
    for rows, keep in ((1, True), (7, False), (23, True)):
        fit = ny.fit_nystrom(X, y, centers, ridge=1e-4, keep_knc=keep, block_rows=rows,
                             chunk_rows=rows, solver=solver)
        assert fit.keep_knc is keep
        assert _rel(fit.coef, ref.coef) < 1e-12
        assert _rel(fit.agop, ref.agop) < 1e-12


@pytest.mark.parametrize("solver", SOLVE)
def test_ill_conditioned_float32_problem_is_flagged(solver):
    # near-duplicate points, all of them centers, ridgeless: κ(K) far beyond 1/ε(float32)
    X, y = _data(N=40, seed=4)
    X = torch.cat([X, X + 1e-6 * torch.randn(X.shape, dtype=torch.float64)])
    X = (X / X.norm(dim=1, keepdim=True)).float()
    y = np.concatenate([y, y])
    fit = ny.fit_nystrom(X, y, np.arange(80), ridge=0.0, solver=solver)
    assert not fit.trusted and fit.error_estimate > ny.TRUST_TOLERANCE
    good = ny.fit_nystrom(X[:40], y[:40], np.arange(40), ridge=0.0, solver=solver)
    assert good.trusted and good.error_estimate < 1e-4


@pytest.mark.parametrize("ridge", [1e-3, 1e-7])
def test_pcg_agrees_with_tsqr(ridge):
    X, y = _data(N=120, D=8, seed=8)
    centers = ny.select_centers(y, 30, seed=0)
    qr = ny.fit_nystrom(X, y, centers, ridge=ridge, solver="tsqr")
    cg = ny.fit_nystrom(X, y, centers, ridge=ridge, solver="pcg", block_rows=17)
    assert cg.solver == "pcg" and cg.converged and cg.trusted and 1 < cg.iterations < 60
    assert _rel(cg.coef, qr.coef) < 1e-8
    assert _rel(cg.fitted, qr.fitted) < 1e-9
    assert _rel(cg.agop, qr.agop) < 1e-9
    assert cg.objective == pytest.approx(qr.objective, rel=1e-10)
    assert cg.preconditioned_condition >= 1.0
    # all points as centers: the FALKON preconditioner is exact, one iteration
    full = ny.fit_nystrom(X, y, np.arange(120), ridge=ridge, solver="pcg")
    assert full.iterations == 1 and full.preconditioned_condition == pytest.approx(1.0)


def test_pcg_that_does_not_converge_is_flagged():
    X, y = _data(N=120, D=8, seed=8)
    fit = ny.fit_nystrom(X, y, ny.select_centers(y, 30, seed=0), ridge=1e-7, solver="pcg",
                         max_iter=2)
    assert not fit.converged and not fit.trusted and fit.iterations == 2


def _ill_conditioned(n=400, M=30, kappa=1e6, seed=0):
    """A (n × M) with singular values logspaced 1 … 1/κ, b with a component outside range(A)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, M, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(M, M, generator=g, dtype=torch.float64)).Q
    A = (U * torch.logspace(0, -math.log10(kappa), M, dtype=torch.float64)) @ V.T
    b = A @ torch.randn(M, 2, generator=g, dtype=torch.float64)
    b += 1e-3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return A, b


def test_cgls_is_as_accurate_as_qr_where_the_semi_normal_equations_are_not():
    A, b = _ill_conditioned(kappa=1e6)
    ref = torch.linalg.lstsq(A, b, driver="gelsd").solution
    S, shift = ny.gram_factor(A, None)
    assert shift == 0.0
    semi = torch.linalg.solve_triangular(
        S, torch.linalg.solve_triangular(S.T, A.T @ b, upper=False), upper=True)
    x, info = ny.cgls_solve(A, b, None, S)
    qr = torch.linalg.lstsq(A, b, driver="gels").solution  # Householder QR
    # ε·κ² ≈ 1e-4 for the semi-normal solution; CGLS reaches the QR's ε·κ level
    assert _rel(semi, ref) > 1e-7
    assert _rel(x, ref) < 10 * max(_rel(qr, ref), 1e-10)
    assert info["converged"] and 1 <= info["iterations"] <= 6


def test_cgls_with_ridge_rows_solves_the_stacked_problem():
    A, b = _ill_conditioned(kappa=1e4, seed=1)
    R = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(2),
                                    dtype=torch.float64), mode="r").R * 1e-2
    S, _ = ny.gram_factor(A, R)
    x, info = ny.cgls_solve(A, b, R, S)
    ref = torch.linalg.lstsq(torch.cat([A, R]), torch.cat([b, torch.zeros(30, 2,
                                                                         dtype=torch.float64)]),
                             driver="gelsd").solution
    assert _rel(x, ref) < 1e-11 and info["converged"]


def test_singular_gram_is_shifted_and_the_shift_does_not_change_the_answer():
    A, b = _ill_conditioned(kappa=1e4, seed=3)
    A = torch.cat([A, A[:, :1]], dim=1)  # a repeated column: AᵀA exactly singular
    S, shift = ny.gram_factor(A, None)
    assert shift > 0
    x, info = ny.cgls_solve(A, b, None, S, max_iter=200)
    ref = torch.linalg.lstsq(A, b, driver="gelsd").solution  # the minimum-norm solution
    assert _rel(A @ x, A @ ref) < 1e-9  # the same fit; CGLS from a range start stays minimal
    x1, info1 = ny.cgls_solve(A, b, None, S * (1 + 1e-3 * torch.arange(31.0, dtype=S.dtype)),
                              max_iter=1, tol=1e-15)
    assert not info1["converged"] and info1["iterations"] == 1


def _cgls_problem(seed=0, pert=0.3):
    """A (60 × 8), ridge rows R, b with columns at scales 1e3 and 1, and a preconditioner S
    that is the gram's factor times I + pert·(random upper): CGLS then needs ~10 iterations."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(60, 8, generator=g, dtype=torch.float64)
    R = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64), mode="r").R * 0.3
    b = torch.randn(60, 2, generator=g, dtype=torch.float64)
    b *= torch.tensor([1e3, 1.0], dtype=torch.float64)
    S = ny.gram_factor(A, R)[0] @ (torch.eye(8, dtype=torch.float64) + pert * torch.triu(
        torch.randn(8, 8, generator=g, dtype=torch.float64)))
    return A, R, b, S


def _krylov_lstsq(A, R, b, S, k):
    """CGLS's k-th iterate by its definition, per column: α₀ = S⁻¹S⁻ᵀÂᵀb̂ (Â = [A; R],
    b̂ = [b; 0]) plus the best correction S⁻¹v, v in the Krylov space of B = S⁻ᵀÂᵀÂS⁻¹ at
    g = S⁻ᵀÂᵀ(b̂ − Âα₀), of dimension k (an orthonormal basis, then a small least squares).
    Also the largest column ratio ‖S⁻ᵀÂᵀ(b̂ − Âα)‖ / ‖S⁻ᵀÂᵀb̂‖."""
    Ah = torch.cat([A, R])
    bh = torch.cat([b, torch.zeros(R.shape[0], b.shape[1], dtype=b.dtype)])
    Si = torch.linalg.inv(S)
    B = Si.T @ Ah.T @ Ah @ Si
    x0 = Si @ Si.T @ Ah.T @ bh
    cols = []
    for c in range(b.shape[1]):
        r0 = bh[:, c] - Ah @ x0[:, c]
        V = [Si.T @ Ah.T @ r0]
        V[0] = V[0] / V[0].norm()
        for _ in range(k - 1):
            w = B @ V[-1]
            for _ in range(2):  # Gram-Schmidt twice
                for u in V:
                    w = w - (u @ w) * u
            V.append(w / w.norm())
        Vm = torch.stack(V, 1)[:, :k]
        step = torch.linalg.lstsq(Ah @ Si @ Vm, r0[:, None]).solution
        cols.append(x0[:, c] + (Si @ Vm @ step)[:, 0])
    x = torch.stack(cols, 1)
    ratio = (Si.T @ Ah.T @ (bh - Ah @ x)).norm(dim=0) / (Si.T @ Ah.T @ bh).norm(dim=0)
    return x, float(ratio.max())


def test_cgls_iterates_are_the_krylov_least_squares_solutions():
    # an inexact preconditioner, ridge rows and two columns at scales 1e3 and 1: after k
    # iterations each column is the least-squares solution over its own k-dim Krylov space
    A, R, b, S = _cgls_problem()
    for k in range(6):
        x, info = ny.cgls_solve(A, b, R, S, tol=0.0, max_iter=k)
        ref, ratio = _krylov_lstsq(A, R, b, S, k)
        assert info["iterations"] == k and not info["converged"]
        assert _rel(x, ref) < 1e-11
        assert info["relative_residual"] == pytest.approx(ratio, rel=1e-9, abs=0)
    # converged: the stacked least-squares solution; and float32 Y is taken as float64
    x, info = ny.cgls_solve(A, b.float(), R, S)
    ref = torch.linalg.lstsq(torch.cat([A, R]), torch.cat([b.float().double(), torch.zeros(
        8, 2, dtype=torch.float64)]), driver="gelsd").solution
    assert x.dtype == torch.float64 and _rel(x, ref) < 1e-12
    assert info["converged"] and info["relative_residual"] <= ny.CGLS_TOLERANCE


def test_cgls_of_a_zero_right_hand_side_is_zero_and_stops_only_at_max_iter():
    A, R, b, S = _cgls_problem()
    zero = torch.zeros(8, 2, dtype=torch.float64)
    x, info = ny.cgls_solve(A, torch.zeros_like(b), R, S)
    assert torch.equal(x, zero) and info["iterations"] == 0 and info["converged"]
    # tol < 0: the ratio (exactly 0) never stops it, nor does it stall: max_iter, 50 by default
    for kw, its in (({}, 50), ({"max_iter": 7}, 7)):
        x, info = ny.cgls_solve(A, torch.zeros_like(b), R, S, tol=-1.0, **kw)
        assert torch.equal(x, zero) and info["iterations"] == its
        assert info["relative_residual"] == 0.0 and info["converged"]


def _stall_stop(ratios):
    """The documented stopping rule on a sequence of ratios (tol = 0): stop at the second
    iteration in a row that does not halve the best ratio so far."""
    best, stalls = ratios[0], 0
    for it in range(1, len(ratios)):
        stalls = stalls + 1 if ratios[it] > 0.5 * best else 0
        best = min(best, ratios[it])
        if stalls == 2:
            return it
    return None


@pytest.mark.parametrize("seed, pert", [(1, 0.0), (0, 0.3)])
def test_cgls_stops_when_its_residual_stops_halving_or_reaches_tol(seed, pert):
    # the ratios after k iterations, from runs stopped at k (the same arithmetic)
    A, R, b, S = _cgls_problem(seed, pert)
    full = ny.cgls_solve(A, b, R, S, tol=0.0)[1]
    ratios = [ny.cgls_solve(A, b, R, S, tol=0.0, max_iter=k)[1]["relative_residual"]
              for k in range(full["iterations"] + 1)]
    assert full["iterations"] == _stall_stop(ratios) < 50
    assert full["relative_residual"] == ratios[-1] and not full["converged"]
    # tol equal to the smallest ratio, first reached after k iterations: stops there (≤ tol)
    k = int(np.argmin(ratios))
    x, info = ny.cgls_solve(A, b, R, S, tol=ratios[k])
    assert info["iterations"] == k and info["converged"]
    assert torch.equal(x, ny.cgls_solve(A, b, R, S, tol=0.0, max_iter=k)[0])
    # a floor at the final ratio counts as converged, just below it does not
    for floor, ok in ((ratios[-1], True), (0.99 * ratios[-1], False)):
        assert ny.cgls_solve(A, b, R, S, tol=0.0, floor=floor)[1]["converged"] is ok


class _AddComm(Comm):
    """One "rank" whose all-reduce adds E: the other ranks' share, or the rounding of a sum."""

    def __init__(self, E):
        self.E, self.rank, self.world, self.backend = E, 0, 2, "test"

    def all_reduce_sum(self, t):
        return t + self.E


def test_gram_factor_of_a_rank_without_rows_is_the_factor_of_the_ridge_part():
    R = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(3),
                                    dtype=torch.float64), mode="r").R
    S, shift = ny.gram_factor(torch.zeros(0, 5, dtype=torch.float64), R)
    assert shift == 0.0 and _rel(S.T @ S, R.T @ R) < 1e-14
    assert torch.equal(S, torch.triu(S))


def test_gram_factor_shift_is_eps_times_the_largest_diagonal_times_a_power_of_ten():
    # G = diag(scale, g, 1) exactly; a pivot p counts only if p² > 8ε·scale, and
    # the shifts tried are 0, ε·scale·10^t, t = 0, 1, …, 11
    eps = torch.finfo(torch.float64).eps
    Knc = torch.diag(torch.tensor([1000.1, 1e-6, 1.0], dtype=torch.float64))
    scale = 1000.1**2  # ≈ 1e6, no float32 number (nor are the shifts ε·scale·10^t)
    for g, t in ((1e-12, 1), (-50 * eps * scale, 2), (-8e3 * eps * scale, 4)):
        E = torch.zeros(3, 3, dtype=torch.float64)
        E[1, 1] = g - 1e-12  # the other "rank" makes G₂₂ = g (up to rounding)
        S, shift = ny.gram_factor(Knc, None, _AddComm(E))
        assert shift == pytest.approx(eps * scale * 10.0**t, rel=1e-12, abs=0)
        assert float(S[1, 1]) ** 2 == pytest.approx(g + shift, rel=1e-10, abs=0)  # G + shift·I
    # a pivot² exactly 8ε·scale is not enough: G = diag(2²¹, 2⁻²⁸, 1) (all from the other
    # "rank"), 8ε·scale = 2⁻⁴⁹·2²¹ = 2⁻²⁸ = (2⁻¹⁴)²; the first shift ε·scale = 2⁻³¹ suffices
    E = torch.diag(torch.tensor([2.0**21, 2.0**-28, 1.0], dtype=torch.float64))
    S, shift = ny.gram_factor(torch.zeros(4, 3, dtype=torch.float64), None, _AddComm(E))
    assert shift == 2.0**-31
    assert float(S[1, 1]) ** 2 == pytest.approx(2.0**-28 + 2.0**-31, rel=1e-12, abs=0)
    # indefinite by 1e-4·scale: 12 shifts reach ε·scale·1e11 ≈ 2.2e-5·scale, not enough
    E = torch.zeros(3, 3, dtype=torch.float64)
    E[1, 1] = -1e-4 * scale
    with pytest.raises(ValueError, match="could not be factored even shifted"):
        ny.gram_factor(Knc, None, _AddComm(E))
    assert ny.gram_factor(Knc, None, _AddComm(E), max_tries=13)[1] == pytest.approx(
        eps * scale * 1e12, rel=1e-12, abs=0)


class _DentedLaplace(LaplaceKernel):
    """Laplace minus ``dent`` on the diagonal (the zero distances): K_CC − dent·I, indefinite
    once dent exceeds λ_min(K_CC) (as rounding can leave a semidefinite K_CC below 0)."""

    def __init__(self, dent):
        super().__init__(2.0)
        self.dent = dent

    def from_distances(self, dist):
        return super().from_distances(dist) - self.dent * (dist == 0).to(dist.dtype)


def test_center_factor_is_the_float64_factor_of_kcc_about_the_class_means():
    X, y = _collapsed(1e-6, K=3, per=6, D=5)  # 18 centers 1e-6 apart within a class
    groups = ny.center_groups(y, np.arange(18))
    kernel = LaplaceKernel(2.0)
    R, jitter = ny.center_factor(kernel, X, groups=groups)
    assert jitter == 0.0 and R.dtype == torch.float64 and torch.equal(R, torch.triu(R))
    # K_CC from explicit differences: distances 1e-6 keep ~10 digits (raw ‖x‖²+‖z‖²−2xᵀz, 4)
    assert float((R.T @ R - _kmat(kernel, X, X)).abs().max()) < 1e-13
    R32 = ny.center_factor(kernel, X.float(), groups=groups)[0]  # built in float64 anyway
    assert torch.equal(R32, ny.center_factor(kernel, X.float().double(), groups=groups)[0])
    # ridge_factor: √λ R_CC with the same jitter; λ = 0: no rows
    rows, j = ny.ridge_factor(kernel, X, 0.25, groups=groups)
    assert j == 0.0 and torch.equal(rows, 0.5 * R)
    assert torch.equal(ny.ridge_factor(kernel, X, 1.0, groups=groups)[0], R)
    assert ny.ridge_factor(kernel, X, 0.0, groups=groups) == (None, 0.0)


def test_center_factor_jitter_is_eps_times_the_first_power_of_ten_that_factors():
    eps = torch.finfo(torch.float64).eps
    C = _data(N=6, D=4, seed=14)[0]
    K = _kmat(LaplaceKernel(2.0), C, C)
    low = float(torch.linalg.eigvalsh(K)[0])
    # K_CC − (λ_min + 500ε)·I: ε·10² leaves it indefinite by 400ε, ε·10³ definite by 500ε
    kernel = _DentedLaplace(low + 500 * eps)
    R, jitter = ny.center_factor(kernel, C)
    assert jitter == pytest.approx(eps * 1e3, rel=1e-12, abs=0)
    Kj = _kmat(kernel, C, C) + jitter * torch.eye(6, dtype=torch.float64)
    assert float((R.T @ R - Kj).abs().max()) < 1e-14
    assert ny.ridge_factor(kernel, C, 4.0)[1] == jitter
    # indefinite by 1e-6: 8 tries reach ε·1e7 ≈ 2.2e-9; the refusal says so
    for factor in (ny.center_factor, lambda k, C, **kw: ny.ridge_factor(k, C, 1.0, **kw)):
        with pytest.raises(ValueError, match="not positive definite even with a jitter of "
                                             "2.22e-09"):
            factor(_DentedLaplace(low + 1e-6), C)
        assert factor(_DentedLaplace(low + 1e-6), C, max_tries=11)[1] == pytest.approx(
            eps * 1e10, rel=1e-12, abs=0)
    with pytest.raises(ValueError, match="^ridge must be"):
        ny.ridge_factor(kernel, C, -1.0)


def test_solve_factor_back_substitutes_and_refuses_zero_pivots():
    g = torch.Generator().manual_seed(15)
    R = torch.triu(torch.randn(6, 6, generator=g, dtype=torch.float64)) + 3 * torch.eye(6)
    R[1, 1] = 1.0  # a unit pivot is a pivot like any other
    coef, rho = ny.solve_factor(R, 4)
    assert _rel(R[:4, :4] @ coef, R[:4, 4:]) < 1e-14 and torch.equal(rho, R[4:, 4:])
    for i, j, v in ((2, 2, 0.0), (0, 5, float("nan")), (4, 5, float("inf"))):
        bad = R.clone()
        bad[i, j] = v
        with pytest.raises(ValueError, match="^the Nyström least-squares matrix is rank-def"):
            ny.solve_factor(bad, 4)


def test_condition_estimate_defaults_are_seed_0_at_most_30_steps_and_rtol_1e_2():
    g = torch.Generator().manual_seed(16)
    R = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64), mode="r").R
    est = ny.condition_estimate(R)
    assert est == ny.condition_estimate(R, iters=30, rtol=1e-2, seed=0)
    assert est != ny.condition_estimate(R, seed=1)
    assert ny.condition_estimate(R, rtol=0.0) == ny.condition_estimate(R, iters=30, rtol=0.0)
    assert ny.condition_estimate(R, rtol=0.0) != ny.condition_estimate(R, iters=31, rtol=0.0)


def test_condition_estimate_first_step_and_stopping_rule():
    g = torch.Generator().manual_seed(17)
    R = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64), mode="r").R
    R = 30 * R * torch.logspace(0, -3, 40, dtype=torch.float64)  # ‖R‖ ≫ 1, slow convergence
    # step 1 works on the seeded block of 4 random vectors, not yet orthonormalized
    V0 = torch.randn(40, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s1 = float(torch.linalg.matrix_norm(R @ V0, ord=2))
    s2 = float(torch.linalg.matrix_norm(torch.linalg.solve_triangular(R.T, V0, upper=False),
                                        ord=2))
    kappa, norm = ny.condition_estimate(R, iters=1)
    assert norm == pytest.approx(s1, rel=1e-12) and kappa == pytest.approx(s1 * s2, rel=1e-12)
    # the estimates after k steps (runs of k steps); the rule stops at the first step where
    # both ‖S‖ and ‖S⁻¹‖ changed by at most rtol of their new value (from 0 before step 1)
    seq = [ny.condition_estimate(R, iters=k, rtol=0.0) for k in range(1, 41)]
    norms = [n for _, n in seq]
    inv = [kap / n for kap, n in seq]
    for rtol in (1e-2, 1e-3, 1e-5):
        k = next(k for k in range(1, 40) if abs(norms[k] - norms[k - 1]) <= rtol * norms[k]
                 and abs(inv[k] - inv[k - 1]) <= rtol * inv[k])
        assert k < 39 and ny.condition_estimate(R, iters=60, rtol=rtol) == seq[k]
    # 1 × 1: after the first step both norms are exact; a loose rtol still takes two more
    assert ny.condition_estimate(torch.eye(1, dtype=torch.float64), rtol=0.5) == (1.0, 1.0)


def test_auto_is_cgls_where_knc_fits_in_float64_else_tsqr(monkeypatch):
    X, y = _data(N=60, seed=2)
    centers = ny.select_centers(y, 20, seed=0)
    assert ny.fit_nystrom(X, y, centers, ridge=1e-6).solver == "cgls"
    assert ny.resolve_solver("auto", 60_000, 4000, 784, 10) == "cgls"
    monkeypatch.setenv("AGOP_MEMORY_GB", "1")  # 60,000 × 4,000 float64 is 1.9 GB
    assert ny.resolve_solver("auto", 60_000, 4000, 784, 10) == "tsqr"
    assert ny.resolve_solver("pcg", 60_000, 4000, 784, 10) == "pcg"


def test_condition_estimate_of_a_product_of_triangular_factors():
    g = torch.Generator().manual_seed(9)
    A = torch.randn(90, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -5, 40)
    R1 = torch.linalg.qr(A, mode="r").R
    R2 = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64), mode="r").R
    for R in (R1, (R1, R2)):
        S = R if isinstance(R, torch.Tensor) else R1 @ R2
        kappa, norm = ny.condition_estimate(R, iters=60, rtol=1e-6)
        assert kappa == pytest.approx(float(torch.linalg.cond(S)), rel=1e-2)
        assert norm == pytest.approx(float(torch.linalg.matrix_norm(S, ord=2)), rel=1e-6)


# ----------------------------------------------------------------------------- the AGOP
def _reference_agop(kernel, X, centers, coef, points):
    """(1/n) Σ_i J_iᵀJ_i by autograd; at a point that is center j, term j is removed from f
    before differentiating."""
    C = X[centers]
    where = {int(c): j for j, c in enumerate(centers)}
    D = X.shape[1]
    total = torch.zeros(D, D, dtype=torch.float64)
    for i in points:
        keep = torch.ones(len(centers), dtype=torch.bool)
        if int(i) in where:
            keep[where[int(i)]] = False
        Ck, Ak = C[keep], coef[keep]

        def f(x):
            return kernel.from_distances(((x[None, :] - Ck) ** 2).sum(1).sqrt()) @ Ak

        J = torch.func.jacrev(f)(X[i])
        total += J.T @ J
    return total / len(points)


@pytest.mark.parametrize("kernel", [LaplaceKernel(2.0), LaplaceKernel(0.8), GaussianKernel(1.2)],
                         ids=repr)
@pytest.mark.parametrize("per_class", [True, False])
def test_agop_matches_autograd_with_the_self_term_rule(kernel, per_class):
    X, y = _data(N=45, D=5, seed=5)
    centers = ny.select_centers(y, 15, seed=1)
    fit = ny.fit_nystrom(X, y, centers, kernel, ridge=1e-3, per_class=per_class, chunk_rows=8)
    ref = _reference_agop(kernel, X, centers, fit.coef, range(45))
    assert _rel(fit.agop, ref) < 1e-10
    # a seeded sample of points, some of them centers
    fit_s = ny.fit_nystrom(X, y, centers, kernel, ridge=1e-3, per_class=per_class,
                           agop_points=12, seed=7, chunk_rows=5)
    pts = ny.agop_sample(45, 12, seed=7)
    assert np.array_equal(fit_s.agop_points, pts) and len(np.intersect1d(pts, centers))
    assert _rel(fit_s.agop, _reference_agop(kernel, X, centers, fit.coef, pts)) < 1e-10
    # the standalone function, with new coefficients
    A = torch.randn(15, 3, dtype=torch.float64)
    M = ny.nystrom_agop(kernel, X, X[centers], A, centers=centers,
                        groups=ny.center_groups(y, centers) if per_class else None)
    assert _rel(M, _reference_agop(kernel, X, centers, A, range(45))) < 1e-10


def test_agop_of_two_center_classes_matches_autograd():
    # two groups: the other group's share F is still moved into the point's own frame
    X, y = _data(N=24, D=4, K=2, seed=12)
    X[y == 1] += 3.0  # the point frames differ from the raw coordinates by a lot
    centers = ny.select_centers(y, 8, seed=0)
    A = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kernel = LaplaceKernel(1.5)
    M = ny.nystrom_agop(kernel, X, X[centers], A, centers=centers,
                        groups=ny.center_groups(y, centers), chunk_rows=7)
    assert _rel(M, _reference_agop(kernel, X, centers, A, range(24))) < 1e-10


def test_second_pass_fitted_values_gradient_and_agop_sum_of_one_rank(monkeypatch):
    X, y = _data(N=30, D=4, seed=13)
    kernel = LaplaceKernel(2.0)
    centers = ny.select_centers(y, 10, seed=0)
    A = torch.randn(10, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A32 = A.float()  # any float dtype, cast to float64 (fitted) and to X's (AGOP)
    A = A32.double()
    Y = signed_one_hot(torch.as_tensor(y), 3, torch.float64)
    Knc = _kmat(kernel, X, X[centers])
    planned = []
    monkeypatch.setattr(ny, "_chunk_rows", lambda *a: planned.append(a[4]) or 7)
    clock = iter(range(1000))  # each reading of the clock one "second" later
    monkeypatch.setattr(ny, "time", type("Clock", (), {"perf_counter": lambda: next(clock)}))
    seconds = {}
    for total in (5, 10):  # the times are added to what the dict holds
        out = ny.second_pass(kernel, X, X[centers], A32, Y, centers=centers, agop_rows=True,
                             seconds=seconds)  # rows 0.. (row_start 0), planned for float64
        # 5 chunks of ≤ 7 rows, one "second" each for the fitted values and for the AGOP
        assert seconds == {"fitted": total, "agop": total}
    monkeypatch.undo()
    assert planned == [torch.float64] * 2
    assert _rel(out["fitted"], Knc @ A) < 1e-12 and out["fitted"].dtype == torch.float64
    assert _rel(out["gradient"], Knc.T @ (Y - Knc @ A)) < 1e-12
    assert _rel(out["agop"], 30 * _reference_agop(kernel, X, centers, A, range(30))) < 1e-10
    assert out["agop_count"] == 30
    # rank 1 of 2 (global rows 12..29), the AGOP at 4 of its rows, no Y
    rows = np.array([0, 3, 9, 17])
    out = ny.second_pass(kernel, X[12:], X[centers], A, row_start=12, centers=centers,
                         agop_rows=rows, chunk_rows=5)
    assert _rel(out["fitted"], Knc[12:] @ A) < 1e-12 and out["gradient"] is None
    ref = 4 * _reference_agop(kernel, X, centers, A, rows + 12)
    assert _rel(out["agop"], ref) < 1e-10 and out["agop_count"] == 4
    for none in (None, False):
        out = ny.second_pass(kernel, X, X[centers], A, centers=centers, agop_rows=none)
        assert out["agop"] is None and out["agop_count"] == 0
        assert _rel(out["fitted"], Knc @ A) < 1e-12
    # float64 centers with float32 rows: the AGOP works in the rows' dtype throughout
    X32 = X.float()
    a = ny.second_pass(kernel, X32, X[centers], A, centers=centers, agop_rows=True)
    b = ny.second_pass(kernel, X32, X32[centers], A, centers=centers, agop_rows=True)
    assert a["agop"].dtype == torch.float32 and torch.equal(a["agop"], b["agop"])


def _collapsed(spread, K=4, per=40, D=16, seed=0):
    """Late Deep RFM layers: classes collapsed to ``spread`` around unit-norm means."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, D, generator=g, dtype=torch.float64)
    y = np.repeat(np.arange(K), per)
    X = mu[y] + spread * torch.randn(K * per, D, generator=g, dtype=torch.float64)
    return X / X.norm(dim=1, keepdim=True), y


@pytest.mark.parametrize("spread", [1e-2, 1e-4, 1e-5])
def test_float32_agop_after_collapse_stays_accurate_in_per_class_coordinates(spread):
    X, y = _collapsed(spread)
    X = X.float().double()  # the float32 data, so that only the arithmetic differs
    kernel = LaplaceKernel(2.0)
    centers = ny.select_centers(y, 40, seed=0)  # 120 of the 160 points are not centers
    groups = ny.center_groups(y, centers)
    coef = ny.fit_nystrom(X, y, centers, kernel, ridge=1e-6).coef  # float64 α
    ref = ny.nystrom_agop(kernel, X, X[centers], coef, centers=centers, groups=groups)
    M32 = ny.nystrom_agop(kernel, X.float(), X[centers].float(), coef, centers=centers,
                          groups=groups)
    raw = ny.nystrom_agop(kernel, X.float(), X[centers].float(), coef, centers=centers)
    assert _rel(M32.double(), ref) < 1e-5  # measured 1.3e-7 at every spread
    assert _rel(raw.double(), ref) > 1e-4  # without them: 1.4e-4, 1e-2, 0.56 as spread falls


def test_second_pass_from_kept_kernel_values_drops_every_self_term_by_index():
    # recomputed distances of a row to itself need not be 0 (here row 2 to center 0 is ~1e-7
    # on some BLAS): the term is dropped by index, center 0 included
    X, y = _data(N=30, D=12, seed=18)
    X = 3 * X + 1
    kernel = LaplaceKernel(2.0)
    centers = np.arange(2, 30, 3)
    A = torch.randn(10, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = ny.second_pass(kernel, X, X[centers], A, centers=centers, agop_rows=True,
                         kvalues=_kmat(kernel, X, X[centers]), chunk_rows=7)
    assert _rel(out["agop"], 30 * _reference_agop(kernel, X, centers, A, range(30))) < 1e-10


def test_second_pass_from_kept_kernel_values_stays_in_per_class_coordinates():
    # the PCG path keeps K_NC (float64 values, no distances): the AGOP rows' distances are
    # recomputed, in per-class coordinates about the float32 centers like everywhere else
    X, y = _collapsed(1e-4)
    X = X.float().double()
    kernel = LaplaceKernel(2.0)
    centers = ny.select_centers(y, 40, seed=0)
    groups = ny.center_groups(y, centers)
    coef = ny.fit_nystrom(X, y, centers, kernel, ridge=1e-6).coef
    ref = ny.nystrom_agop(kernel, X, X[centers], coef, centers=centers, groups=groups) * 160
    Knc = ny.kernel_block(kernel, X, X[centers], groups=groups, start=0, centers=centers)[0]
    out = ny.second_pass(kernel, X.float(), X[centers], coef, centers=centers, groups=groups,
                         agop_rows=True, kvalues=Knc, chunk_rows=50)
    assert _rel(out["fitted"], Knc @ coef) < 1e-14
    assert out["agop"].dtype == torch.float32 and _rel(out["agop"].double(), ref) < 1e-5


# ----------------------------------------------------------------------------- ranks
class _ThreadComm(Comm):
    """P "ranks" as threads of one process: the collectives of agop.distributed.Comm."""

    def __init__(self, box, rank, world):
        self.box, self.rank, self.world, self.backend = box, rank, world, "threads"

    def all_gather_object(self, obj):
        self.box["barrier"].wait()
        self.box["slots"][self.rank] = obj
        self.box["barrier"].wait()
        return list(self.box["slots"])

    def all_gather(self, t):
        return self.all_gather_object(t.clone())

    def all_reduce_sum(self, t):
        parts = self.all_gather(t)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def broadcast(self, t, src=0):
        return self.all_gather(t)[src]


def _run_ranks(world, X, y, per_rank=None, **kw):
    box = {"barrier": threading.Barrier(world), "slots": [None] * world}
    out, errors = [None] * world, []

    def work(r):
        try:
            a, b = row_range(len(y), r, world)
            extra = {} if per_rank is None else per_rank[r]
            out[r] = ny.fit_nystrom(X[a:b], y, comm=_ThreadComm(box, r, world), **kw, **extra)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            box["barrier"].abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("world, solver", [(2, "tsqr"), (3, "tsqr"), (3, "pcg"), (2, "cgls"),
                                           (3, "cgls"), (2, "auto")])
def test_ranks_give_the_single_process_numbers(world, solver):
    X, y = _data(N=64, seed=6)
    centers = ny.select_centers(y, 22, seed=0)
    kw = dict(centers=centers, kernel=LaplaceKernel(2.0), ridge=1e-5, agop_points=30, seed=1,
              block_rows=10, solver=solver)
    one = ny.fit_nystrom(X, y, comm=local(), **kw)
    fits = _run_ranks(world, X, y, **kw)
    for f in fits:
        assert torch.equal(f.coef, fits[0].coef) and torch.equal(f.agop, fits[0].agop)
        assert torch.equal(f.center_features, one.center_features)  # gathered exactly
    assert _rel(fits[0].coef, one.coef) < 1e-10
    assert _rel(fits[0].agop, one.agop) < 1e-10
    assert _rel(torch.cat([f.fitted for f in fits]), one.fitted) < 1e-10
    for name in ("objective", "residual", "condition"):
        assert getattr(fits[0], name) == pytest.approx(getattr(one, name), rel=1e-8)


def test_ranks_that_disagree_on_the_settings_are_refused():
    X, y = _data(N=30, seed=6)
    with pytest.raises(ValueError, match="ranks disagree on the Nyström settings"):
        _run_ranks(2, X, y, centers=np.arange(0, 30, 3),
                   per_rank=[dict(ridge=1e-4), dict(ridge=1e-5)])


def test_local_factors_combine_like_one_factor():
    # the pieces by hand: rank 0 starts from the ridge rows, rank 1 from nothing
    X, y = _data(N=40, seed=7)
    kernel = LaplaceKernel(2.0)
    centers = ny.select_centers(y, 12, seed=0)
    C, groups = X[centers], ny.center_groups(y, centers)
    Y = signed_one_hot(torch.as_tensor(y), 3, torch.float64)
    ridge_rows, _ = ny.ridge_factor(kernel, C, 1e-4, groups=groups)
    init = torch.cat([ridge_rows, torch.zeros(12, 3, dtype=torch.float64)], dim=1)
    R1, _ = ny.local_factor(kernel, X, Y, C, centers=centers, groups=groups, initial=init,
                            block_rows=40)
    parts = []
    for r in range(2):
        a, b = row_range(40, r, 2)
        parts.append(ny.local_factor(kernel, X[a:b], Y[a:b], C, row_start=a, centers=centers,
                                     groups=groups, initial=init if r == 0 else None,
                                     block_rows=6)[0])
    R2 = ny.combine_factors(parts)
    # equal up to the signs of the rows (Householder's choice): compare RᵀR and the solutions
    assert _rel(R2.T @ R2, R1.T @ R1) < 1e-12
    assert _rel(ny.solve_factor(R2, 12)[0], ny.solve_factor(R1, 12)[0]) < 1e-10


# ----------------------------------------------------------------------------- memory, input
def test_memory_plan_keeps_knc_when_it_fits_and_refuses_too_many_centers(monkeypatch):
    small = ny.nystrom_memory(10_000, 500, 784, 10)
    assert ny.nystrom_memory(10_000, 500, 784, 10, keep_knc=True) == small + 10_000 * 500 * 4
    assert ny.nystrom_memory(10_000, 1000, 784, 10) > small
    assert ny.nystrom_memory(10_000, 500, 784, 10, world=4) > small
    monkeypatch.setenv("AGOP_MEMORY_GB", "0.1")
    p = ny.plan(50_000, 200, 784, 10)
    assert not p.keep_knc and p.bytes <= 0.1 * 1024**3  # 40 MB of distances do not fit
    assert ny.plan(1000, 200, 784, 10).keep_knc
    with pytest.raises(MemoryError, match="M = 5000 centers.*use fewer centers"):
        ny.plan(50_000, 5000, 784, 10)
    X, y = _data(N=20)
    monkeypatch.setenv("AGOP_MEMORY_GB", "1e-6")
    with pytest.raises(MemoryError, match="needs about"):
        ny.fit_nystrom(X, y, np.arange(10))


@pytest.mark.parametrize("kwargs, match", [
    (dict(centers=np.arange(25)), "exceed the N = 20"),
    (dict(centers=np.array([3, 1, 2])), "sorted, distinct"),
    (dict(centers=np.array([1, 1, 2])), "sorted, distinct"),
    (dict(centers=np.array([0, 5, 20])), "in 0..19"),
    (dict(centers=np.array([0, 1])), "fewer than the 3 classes"),
    (dict(centers=np.array([0.0, 1.0, 2.0])), "integer row indices"),
    (dict(ridge=-1.0), "ridge must be"),
    (dict(agop_points=21), "agop_points = 21 exceeds"),
    (dict(agop_points=np.array([4, 2])), "distinct sorted global row"),
    (dict(X_local=torch.ones(19, 6, dtype=torch.float64)), "must hold rows 0..19"),
    (dict(keep_knc="yes"), "keep_knc must be"),
    (dict(kernel="cosine"), "unknown kernel"),
    (dict(solver="cg"), "solver must be one of"),
    (dict(solver="pcg", tol=0.0), "tol must be"),
])
def test_bad_input_raises_one_line_value_errors(kwargs, match):
    X, y = _data(N=20)
    args = dict(X_local=X, y=y, centers=np.arange(0, 20, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as info:
        ny.fit_nystrom(**args)
    assert "\n" not in str(info.value)
