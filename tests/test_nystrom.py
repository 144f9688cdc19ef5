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
                                      (0, "M \\(the number of centers\\)")])
def test_select_centers_bad_input(M, match):
    with pytest.raises(ValueError, match=match):
        ny.select_centers(np.arange(10) % 3, M)


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
