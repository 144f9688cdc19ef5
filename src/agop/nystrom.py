"""Nyström kernel ridge regression for Deep RFM: streamed in row blocks, data-parallel.

The predictor over M centers C (training points, :func:`select_centers`) is

    f(x) = Σ_{j∈C} α_j k(x, c_j),   α = argmin_α ‖K_NC α − Y‖² + λ αᵀ K_CC α,

with K_NC = k(X, C) (N × M), K_CC = k(C, C) (M × M), Y the ±1 targets (N × K) and λ ≥ 0 the
ridge. With R_CC the upper Cholesky factor of K_CC (K_CC = R_CCᵀR_CC) this is the ordinary
least-squares problem

    min_α ‖A α − b‖²,   A = [K_NC; √λ R_CC]  ((N + M) × M),   b = [Y; 0].

**Why not the normal equations.** Forming AᵀA = K_NCᵀK_NC + λK_CC squares the condition
number: the error of α is about ε·κ(A)² instead of ε·κ(A) (a prototype that did so lost Deep RFM's
collapse from layer 2 on). Here the upper triangular factor of the augmented matrix [A b] is
computed by Householder QR in float64, which is backward stable:

    [A b] = Q [R z; 0 ρ],   α = R⁻¹z,   ‖Aα − b‖² = ‖ρ‖_F²   (R: M × M, z: M × K, ρ: K × K).

Measured on MNIST (first 3,000 points, float64, layers 1–3, κ(A) 2e4–8e4): with M = N and
λ = 1e-13 the QR's α is within 4e-13–1e-12 of :func:`agop.solve.kernel_ridge`'s (fitted values
1e-13, AGOP 7e-13); the float64 normal equations' α within 1e-9–3e-8. With M = 1,000 the QR's
α is within 5e-12 of LAPACK's SVD least squares (``gelsd``) on the explicitly stacked problem.

**Streamed and data-parallel (TSQR).** Rank r owns the rows ``row_range(N, r, P)``
(:mod:`agop.distributed`) and streams them in row blocks: each block of K_NC is built on the
fly from its rows and the centers (compute dtype, cast to float64) and folded into a running
(M + K) × (M + K) factor, R ← qr([R; K_NC,block Y_block]) (:func:`local_factor`); rank 0 starts
from the ridge rows [√λ R_CC 0]. The ranks' factors are all-gathered and stacked in rank order
for one more QR (:func:`combine_factors`). One process is the world-size-1 case of the same
code (no combine step); P processes differ only in the order of floating-point sums.

**Self terms.** Where a training point *is* a center (global row ``centers[j]``), its distance
to c_j is set to exactly 0 by index (so k = 1 exactly, as in the exact path), and its AGOP term
j is dropped by index (the Laplace kernel is not differentiable there).

**Precision.** Distances, kernel blocks and the AGOP run in the compute dtype (X's dtype);
R_CC, the QR, α, the fitted values and every check run in float64. With ``groups`` (the centers
by class), distances and AGOP gradients are taken in per-class coordinates about the class means
*of the centers* (identical on every rank), which keeps float32 accurate after the classes
collapse, for points that are not centers too (:func:`nystrom_agop`).

**Three solvers, chosen by measurement.** ``"tsqr"`` is the above. ``"cgls"`` (the default
where it fits, ``"auto"``) keeps K_NC in float64 (n_local·M·8 bytes) and forms the gram
AᵀA = K_NCᵀK_NC + λK_CC in float64 (``dsyrk``: half the work of the QR, at the GEMM rate, and
across ranks one M × M all-reduce instead of a QR of stacked factors); its Cholesky factor S is
used only as a preconditioner: CGLS on A S⁻¹ from the semi-normal start S⁻¹S⁻ᵀAᵀb
(:func:`cgls_solve`). Since κ(A S⁻¹) = 1 + O(ε·κ(A)²), one or two iterations (each one pass of
K_NC and K_NCᵀ and one M × K all-reduce) reach the accuracy of the QR; the semi-normal solution
alone would carry the squared condition number. Measured on MNIST (N = 4,000–20,000,
M = 1,000–4,000, layer 1, κ ≈ 1e4–4e4): one CGLS iteration, α within 2e-13–2e-12 of the QR's,
fitted values within 4e-13, optimality residual 1e-18 (QR: 1e-16); the gram took 30–40% of the
QR's time (``docs/scaling.md``). ``"pcg"`` is conjugate gradients on the normal equations
H α = K_NCᵀY, H = K_NCᵀK_NC + λK_CC, never formed: each iteration applies K_NC and K_NCᵀ (kept
in float64) and meets the other ranks in one M × K all-reduce, preconditioned by FALKON's
B = (A_F R_CC)⁻¹ (:func:`falkon_preconditioner`), which needs only K_CC; it agrees with the QR
to 1e-9 at ``tol=1e-10``. On 2 CPU cores (MNIST, layer 1, λ = 1e-6) it needed 39–63 iterations
at tol 1e-10 and was no faster than the QR (N = 60,000, M = 4,000: CG 51 s, QR 48 s), so it is
an independent cross-check rather than a default.

**Trust.** :class:`NystromFit` carries κ(A) (a power-iteration estimate from R; for PCG from
its preconditioner's factor A_F R_CC, within √κ of the preconditioned operator), the relative
optimality residual ‖Aᵀ(b − Aα)‖ of the computed α (a backward-error check of the solve
itself), and ``error_estimate`` = u·κ(A)/√M with u the unit roundoff of the dtype K_NC was
formed in: the typical relative error of α caused by the rounding of the kernel entries (u·κ(A)
is the first-order worst case for a consistent system; independent roundings add like a random
walk, hence the √M). Measured with float32 kernel blocks against float64 ones (MNIST, first
3,000 points, M = 1,000, layers 1–14, κ 7e3–9e5): α's error was 0.4–2.5 times the estimate, the
AGOP's about a tenth of α's and the fitted values' 1e-6–1e-5. ``trusted`` is False when the
estimate exceeds ``TRUST_TOLERANCE``, when the optimality residual exceeds
``OPTIMALITY_TOLERANCE`` or when CG did not converge: an untrustworthy number is always
flagged, never silent.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agop._validate import as_labels, check_int, check_matrix, check_positive, to_numpy
from agop.agop import _group_ids
from agop.backend import dtype_name, format_bytes, memory_budget, synchronize
from agop.distributed import Comm, local, row_range
from agop.kernels import RadialKernel, get_kernel, pairwise_distances
from agop.solve import signed_one_hot

#: ``trusted`` is False when the estimated relative error of α (``error_estimate``) exceeds
#: this (the AGOP's error was about a tenth of α's on MNIST).
TRUST_TOLERANCE = 1e-2

#: ... or when the solve's relative optimality residual (a backward error) exceeds this.
OPTIMALITY_TOLERANCE = 1e-8

#: The solvers of :func:`fit_nystrom` (``"auto"``: ``"cgls"`` where K_NC fits in memory in
#: float64 on every rank, else ``"tsqr"``).
SOLVERS = ("auto", "cgls", "tsqr", "pcg")

#: CGLS stops when every column's preconditioned normal residual has fallen by this factor...
CGLS_TOLERANCE = 1e-12

#: Rows of points per chunk of the second pass (fitted values and AGOP), at most: a fixed
#: bound so that sums run in the same order whatever memory is free.
CHUNK_ROWS = 1024

#: The QR streams blocks of at most this many times (M + K) rows: re-factoring the running
#: R costs about (2/3)(M + K)/rows of the block's own QR, 17% at 4.
BLOCK_FACTOR = 4

__all__ = [
    "NystromFit",
    "NystromPlan",
    "OPTIMALITY_TOLERANCE",
    "SOLVERS",
    "TRUST_TOLERANCE",
    "agop_sample",
    "center_groups",
    "center_factor",
    "cgls_solve",
    "combine_factors",
    "condition_estimate",
    "falkon_preconditioner",
    "fit_nystrom",
    "gram_factor",
    "gather_rows",
    "kernel_block",
    "local_factor",
    "nystrom_agop",
    "nystrom_memory",
    "nystrom_predict",
    "pcg_solve",
    "plan",
    "ridge_factor",
    "second_pass",
    "select_centers",
    "solve_factor",
]


# ----------------------------------------------------------------------------- centers
def select_centers(y: Any, M: int, seed: int = 0) -> np.ndarray:
    """M class-balanced center indices drawn from the labels ``y`` of all N training points.

    Each of the K classes present gets ⌊M/K⌋ centers; the remainder goes one each to classes
    drawn at random; a class with fewer points than its share gives all of them and the rest
    is spread over the other classes the same way (water filling). Within a class the points
    are drawn uniformly without replacement. Everything comes from
    ``numpy.random.default_rng(seed)``, so a seed gives the same centers on every rank.

    Parameters
    ----------
    y : array-like, (N,)
        Integer class labels 0..K−1 of all training points (every rank holds all of them).
    M : int
        Number of centers, K ≤ M ≤ N (K = the number of classes present).
    seed : int
        Seed of the numpy Generator.

    Returns
    -------
    np.ndarray
        (M,) int64 global row indices, sorted ascending, distinct.
    """
    labels, _ = as_labels(y, min_classes=1, require_all=False)
    M = check_int(M, "M (the number of centers)", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    N = labels.shape[0]
    classes = np.unique(labels)
    K = len(classes)
    if M > N:
        raise ValueError(f"M = {M} centers exceed the N = {N} training points; use M ≤ N")
    if M < K:
        raise ValueError(f"M = {M} centers are fewer than the K = {K} classes; use M ≥ {K}")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in classes]
    counts = np.array([len(m) for m in members])
    quota = np.zeros(K, dtype=np.int64)
    left = M
    while left > 0:  # each round either places everything or fills at least one class
        open_ = np.flatnonzero(quota < counts)
        share, extra = divmod(left, len(open_))
        add = np.full(len(open_), share, dtype=np.int64)
        add[rng.permutation(len(open_))[:extra]] += 1
        add = np.minimum(add, counts[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    chosen = [rng.choice(m, size=int(q), replace=False) for m, q in zip(members, quota)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def agop_sample(N: int, n_points: int, seed: int = 0) -> np.ndarray:
    """``n_points`` distinct global row indices of N, sorted, from ``default_rng([1, seed])``.

    The same sample whatever the world size: each rank evaluates the AGOP at the sampled rows
    of its own range. (The stream differs from :func:`select_centers`'s for the same seed.)
    """
    N = check_int(N, "N", minimum=1)
    n_points = check_int(n_points, "agop_points", minimum=1)
    if n_points > N:
        raise ValueError(f"agop_points = {n_points} exceeds the N = {N} training points")
    rng = np.random.default_rng([1, check_int(seed, "seed", minimum=0)])
    return np.sort(rng.choice(N, size=n_points, replace=False)).astype(np.int64)


def center_groups(y: Any, centers: np.ndarray) -> list[torch.Tensor]:
    """Positions 0..M−1 of the centers of each class (classes without centers left out).

    For ``groups`` of :func:`agop.kernels.pairwise_distances` and :func:`nystrom_agop`: the
    class means of the centers, computed from the centers only, are the same on every rank.
    """
    labels = to_numpy(y)[np.asarray(centers)]
    return [torch.as_tensor(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def gather_rows(X_local: torch.Tensor, index: np.ndarray, row_start: int,
                comm: Comm | None = None) -> torch.Tensor:
    """Rows ``index`` (global) of the row-distributed X, on every rank: len(index) × D.

    Each rank writes the rows of its range into zeros and the ranks' matrices are summed
    (:meth:`Comm.all_reduce_sum`); every entry has one non-zero contribution, so the sum is exact.
    """
    comm = comm or local()
    index = np.asarray(index, dtype=np.int64)
    out = torch.zeros((len(index), X_local.shape[1]), dtype=X_local.dtype, device=X_local.device)
    mine = np.flatnonzero((index >= row_start) & (index < row_start + X_local.shape[0]))
    if len(mine):
        out[torch.as_tensor(mine, device=out.device)] = X_local[
            torch.as_tensor(index[mine] - row_start, device=out.device)]
    return comm.all_reduce_sum(out)


def _self_pairs(centers: np.ndarray, start: int, stop: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows relative to ``start``, center positions) of the global rows start..stop−1 that are
    centers (``centers`` sorted)."""
    j0, j1 = np.searchsorted(centers, [start, stop])
    cols = torch.arange(int(j0), int(j1), device=device)
    rows = torch.as_tensor(centers[j0:j1] - start, device=device)
    return rows, cols


def kernel_block(kernel: RadialKernel, P: torch.Tensor, C: torch.Tensor, *,
                 groups: list[torch.Tensor] | None = None, start: int | None = None,
                 centers: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k(P, C), ‖p_i − c_j‖) for a block of rows P (b × D) and the centers C (M × D): b × M each.

    In P's dtype. ``groups``: distances about each center class's mean
    (:func:`agop.kernels.pairwise_distances`). ``start``/``centers``: P is global rows
    ``start..start+b−1`` and ``centers`` the global indices of C; where a row is center j its
    distance is set to exactly 0 (k = 1) by index.
    """
    dist = pairwise_distances(P, C.to(P.dtype), groups=groups)
    if centers is not None:
        rows, cols = _self_pairs(centers, start, start + P.shape[0], P.device)
        dist[rows, cols] = 0.0
    return kernel.from_distances(dist), dist


# ----------------------------------------------------------------------------- the solve
def center_factor(kernel: RadialKernel, C: torch.Tensor, *,
                  groups: list[torch.Tensor] | None = None,
                  max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """(R_CC, jitter): the upper Cholesky factor of K_CC = k(C, C) (M × M) in float64.

    K_CC is built in float64 from the centers (unit diagonal by index; ``groups``: distances
    about the center classes' means). If its factorization fails, a diagonal jitter ε·10^t
    (ε the float64 machine epsilon, t = 0..``max_tries``−1; the diagonal is 1) is added, and
    returned: R_CCᵀR_CC = K_CC + jitter·I.
    """
    C64 = C.to(torch.float64)
    d = pairwise_distances(C64, C64, diagonal_offset=0, groups=groups)
    Kcc = kernel.from_distances(d)
    del d
    eps = torch.finfo(torch.float64).eps
    for jitter in [0.0] + [eps * 10.0**t for t in range(max_tries)]:
        A = Kcc if not jitter else Kcc + jitter * torch.eye(Kcc.shape[0], dtype=Kcc.dtype,
                                                             device=Kcc.device)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return L.T.contiguous(), float(jitter)
    raise ValueError(
        f"the {Kcc.shape[0]} × {Kcc.shape[0]} center kernel matrix K_CC is not positive "
        f"definite even with a jitter of {eps * 10.0 ** (max_tries - 1):.3g} (duplicate centers?)"
    )


def ridge_factor(kernel: RadialKernel, C: torch.Tensor, ridge: float, *,
                 groups: list[torch.Tensor] | None = None,
                 max_tries: int = 8) -> tuple[torch.Tensor | None, float]:
    """(√λ R_CC, jitter): the ridge rows of A (:func:`center_factor`); λ = 0 gives (None, 0.0).

    Returns
    -------
    (torch.Tensor or None, float)
        √λ R_CC, M × M upper triangular float64 on C's device, and the jitter used.
    """
    check_positive(ridge, "ridge", allow_zero=True)
    if ridge == 0:
        return None, 0.0
    R, jitter = center_factor(kernel, C, groups=groups, max_tries=max_tries)
    return math.sqrt(ridge) * R, jitter


def local_factor(kernel: RadialKernel, X_local: torch.Tensor, Y_local: torch.Tensor,
                 C: torch.Tensor, *, row_start: int = 0, centers: np.ndarray | None = None,
                 groups: list[torch.Tensor] | None = None, initial: torch.Tensor | None = None,
                 block_rows: int | None = None, keep: bool = False,
                 seconds: dict[str, float] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One rank's triangular factor of [K_NC Y] over its rows, streamed in row blocks (TSQR).

    R ← qr([R; k(X_b, C) Y_b]).R over the row blocks X_b of ``X_local`` (float64 Householder
    QR; the block of K_NC is built in X's dtype and cast), starting from ``initial`` (rank 0:
    the ridge rows [√λ R_CC 0]) or from nothing.

    Parameters
    ----------
    X_local : (n_local, D) tensor
        This rank's rows, global rows ``row_start..row_start+n_local−1``, compute dtype.
    Y_local : (n_local, K) tensor
        Their targets.
    C : (M, D) tensor
        The centers' features; ``centers`` their global indices (self distances set to 0).
    groups : list of tensors, optional
        Center classes (:func:`center_groups`), for per-class distances.
    initial : (r, M + K) float64 tensor, optional
        Rows the factor starts from.
    block_rows : int, optional
        Rows per block (default: :func:`plan`).
    keep : bool
        Also return the distances k was built from (n_local × M, compute dtype), for the
        second pass (:func:`second_pass`) to reuse instead of rebuilding.
    seconds : dict, optional
        Filled with ``"knc"`` (kernel blocks) and ``"qr"`` seconds.

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
        R, (M + K) × (M + K) upper triangular float64 (zero rows below the rank of a short
        input), and the kept distances or None.
    """
    n_local, D = X_local.shape
    M, K = C.shape[0], Y_local.shape[1]
    n = M + K
    dev = X_local.device
    if block_rows is None:
        block_rows = plan(n_local, M, D, K, X_local.dtype, dev, keep_knc=keep).block_rows
    block_rows = max(1, min(int(block_rows), n_local))
    seconds = {} if seconds is None else seconds
    seconds.setdefault("knc", 0.0)
    seconds.setdefault("qr", 0.0)
    kept = torch.empty((n_local, M), dtype=X_local.dtype, device=dev) if keep else None
    R = None if initial is None else initial.to(torch.float64)
    r0 = 0 if R is None else R.shape[0]
    buf = torch.empty((max(n, r0) + block_rows, n), dtype=torch.float64, device=dev)
    for i0 in range(0, n_local, block_rows):
        i1 = min(n_local, i0 + block_rows)
        t = time.perf_counter()
        kb, dist = kernel_block(kernel, X_local[i0:i1], C, groups=groups,
                                start=row_start + i0, centers=centers)
        if kept is not None:
            kept[i0:i1] = dist
        del dist
        r = 0 if R is None else R.shape[0]
        if R is not None:
            buf[:r] = R
        buf[r:r + i1 - i0, :M] = kb
        buf[r:r + i1 - i0, M:] = Y_local[i0:i1]
        del kb
        synchronize(dev)
        t2 = time.perf_counter()
        seconds["knc"] += t2 - t
        R = torch.linalg.qr(buf[:r + i1 - i0], mode="r").R
        synchronize(dev)
        seconds["qr"] += time.perf_counter() - t2
    del buf
    return _pad_square(R, n), kept


def _pad_square(R: torch.Tensor, n: int) -> torch.Tensor:
    if R.shape[0] == n:
        return R
    out = torch.zeros((n, n), dtype=R.dtype, device=R.device)
    out[:R.shape[0]] = R
    return out


def combine_factors(factors: list[torch.Tensor]) -> torch.Tensor:
    """The factor of the stacked ranks' rows: qr([R_0; R_1; …; R_{P−1}]).R (rank order).

    A single factor is returned as is (world size 1: no extra work). Every R_r is
    (M + K) × (M + K) float64; R_rᵀR_r is rank r's share of [A b]ᵀ[A b], so the stacked QR is
    the factor of the whole matrix.
    """
    if len(factors) == 1:
        return factors[0]
    return torch.linalg.qr(torch.cat(factors), mode="r").R


def solve_factor(R: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, ρ) from the factor [R z; 0 ρ] of [A b]: α = R⁻¹z (M × K), ρ (K × K), float64.

    ‖Aα − b‖_F = ‖ρ‖_F. Raises ``ValueError`` when R is singular (rank-deficient K_NC with
    λ = 0: use a positive ridge).
    """
    R11, z = R[:M, :M], R[:M, M:]
    diag = R11.diagonal().abs()
    if bool((diag == 0).any()) or not bool(torch.isfinite(R).all()):
        raise ValueError(
            f"the Nyström least-squares matrix is rank-deficient ({int((diag == 0).sum())} zero "
            "pivot(s) of R): duplicate centers or a rank-deficient K_NC; use a positive ridge"
        )
    coef = torch.linalg.solve_triangular(R11, z, upper=True)
    if not bool(torch.isfinite(coef).all()):
        raise ValueError("the Nyström coefficients overflowed (R is numerically singular); "
                         "use a larger ridge")
    return coef, R[M:, M:]


def condition_estimate(R: torch.Tensor | tuple[torch.Tensor, ...], iters: int = 30,
                       rtol: float = 1e-2, seed: int = 0) -> tuple[float, float]:
    """(κ₂(S), ‖S‖₂) for S = R (M × M upper triangular) or a product of such, S = R₁R₂⋯.

    Subspace iteration, O(M²) per step: ‖S‖₂ from powers of SᵀS, ‖S⁻¹‖₂ from powers of
    (SᵀS)⁻¹ = S⁻¹S⁻ᵀ by triangular solves, each on a block of 4 seeded random vectors, until
    both change by less than ``rtol`` (at most ``iters`` steps). Power iteration approaches from
    below: a lower estimate, in practice within a few percent of κ₂.
    """
    fs = [f.contiguous() for f in (R if isinstance(R, (tuple, list)) else (R,))]
    fts = [f.T.contiguous() for f in fs]

    def mul(v):  # S v
        for f in reversed(fs):
            v = f @ v
        return v

    def mul_t(v):  # Sᵀ v
        for ft in fts:
            v = ft @ v
        return v

    def solve(v):  # S⁻¹ v
        for f in fs:
            v = torch.linalg.solve_triangular(f, v, upper=True)
        return v

    def solve_t(v):  # S⁻ᵀ v
        for ft in reversed(fts):
            v = torch.linalg.solve_triangular(ft, v, upper=False)
        return v

    M = fs[0].shape[0]
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(M, min(4, M), generator=g, dtype=torch.float64).to(fs[0].device)
    U = V.clone()
    smax = sinv = 0.0
    for _ in range(iters):
        SV, W = mul(V), solve_t(U)
        s1 = float(torch.linalg.matrix_norm(SV, ord=2))
        s2 = float(torch.linalg.matrix_norm(W, ord=2))
        done = abs(s1 - smax) <= rtol * s1 and abs(s2 - sinv) <= rtol * s2
        smax, sinv = s1, s2
        if done:
            break
        V = torch.linalg.qr(mul_t(SV)).Q
        U = torch.linalg.qr(solve(W)).Q
    return smax * sinv, smax


def falkon_preconditioner(R_cc: torch.Tensor, n_total: int, ridge: float) -> torch.Tensor:
    """A_F, upper triangular: the Cholesky factor of (N/M)·R_CC R_CCᵀ + λI (float64, M × M).

    With S = A_F R_CC, SᵀS = (N/M)K_CC² + λK_CC ≈ K_NCᵀK_NC + λK_CC = H when the centers are a
    uniform-like sample of the N points (Rudi, Carratino & Rosasco 2017, "FALKON"):
    B = S⁻¹ preconditions H (BᵀHB ≈ I).
    """
    M = R_cc.shape[0]
    P = (n_total / M) * (R_cc @ R_cc.T)
    P.diagonal().add_(ridge)
    L, info = torch.linalg.cholesky_ex(P)
    if int(info):
        raise ValueError("the FALKON preconditioner could not be factored (K_CC numerically "
                         "singular); use solver='tsqr' or a larger ridge")
    return L.T.contiguous()


def pcg_solve(apply_h, rhs: torch.Tensor, R_cc: torch.Tensor, A_f: torch.Tensor, *,
              tol: float = 1e-10, max_iter: int = 300) -> tuple[torch.Tensor, dict[str, Any]]:
    """α solving Hα = rhs by conjugate gradients on BᵀHBβ = Bᵀrhs, α = Bβ, B = R_CC⁻¹A_F⁻¹.

    ``apply_h(V)`` returns H V for M × K blocks (there the ranks' partial sums meet: one M × K
    all-reduce per iteration). The K columns run as K independent CGs, each stopped when its
    residual falls below ``tol`` relative to its start. Also estimates κ(BᵀHB) from CG's Lanczos
    coefficients (the largest over the columns).

    Returns
    -------
    (torch.Tensor, dict)
        α (M × K float64) and ``iterations``, ``converged``, ``relative_residual`` (the
        largest column's), ``preconditioned_condition``.
    """
    def B(v):
        return torch.linalg.solve_triangular(
            R_cc, torch.linalg.solve_triangular(A_f, v, upper=True), upper=True)

    def Bt(v):
        return torch.linalg.solve_triangular(
            A_f.T, torch.linalg.solve_triangular(R_cc.T, v, upper=False), upper=False)

    r = Bt(rhs)
    beta = torch.zeros_like(r)
    p = r.clone()
    rs = (r * r).sum(dim=0)
    rs0 = rs.clamp(min=torch.finfo(torch.float64).tiny)
    steps, ratios = [], []
    it = 0
    rel = 1.0
    for it in range(1, max_iter + 1):
        q = Bt(apply_h(B(p)))
        pq = (p * q).sum(dim=0)
        a = torch.where(pq > 0, rs / pq.clamp(min=torch.finfo(torch.float64).tiny),
                        torch.zeros_like(rs))
        beta += a * p
        r -= a * q
        rs_new = (r * r).sum(dim=0)
        rel = float((rs_new / rs0).max().sqrt())
        b = torch.where(rs > 0, rs_new / rs.clamp(min=torch.finfo(torch.float64).tiny),
                        torch.zeros_like(rs))
        steps.append(a)
        ratios.append(b)
        if rel <= tol:
            break
        p = r + b * p
        rs = rs_new
    return B(beta), {"iterations": it, "converged": rel <= tol, "relative_residual": rel,
                     "preconditioned_condition": _lanczos_condition(steps, ratios)}


def _lanczos_condition(steps: list[torch.Tensor], ratios: list[torch.Tensor]) -> float:
    """max over columns of λ_max/λ_min of CG's Lanczos tridiagonal (diag 1/a_i + b_{i−1}/a_{i−1},
    off-diagonal √b_i/a_i), an estimate of the preconditioned operator's condition number."""
    if not steps:
        return float("nan")
    a = torch.stack(steps).cpu()  # (k, K)
    b = torch.stack(ratios).cpu()
    k = a.shape[0]
    kappa = 1.0
    for j in range(a.shape[1]):
        aj, bj = a[:, j], b[:, j]
        if bool((aj <= 0).any()):
            continue
        T = torch.diag(1.0 / aj)
        T[1:, 1:] += torch.diag(bj[:-1] / aj[:-1])
        off = bj[:-1].sqrt() / aj[:-1]
        T += torch.diag(off, 1) + torch.diag(off, -1)
        ev = torch.linalg.eigvalsh(T) if k > 1 else T.diagonal()
        if float(ev[0]) > 0:
            kappa = max(kappa, float(ev[-1] / ev[0]))
    return kappa


def gram_factor(Knc: torch.Tensor, ridge_rows: torch.Tensor | None, comm: Comm | None = None,
                *, max_tries: int = 12) -> tuple[torch.Tensor, float]:
    """(S, shift): the upper Cholesky factor of the float64 gram AᵀA = K_NCᵀK_NC + λK_CC.

    Each rank forms its rows' share K_rᵀK_r (float64: ``dsyrk`` on CPUs, half a GEMM's work;
    a GEMM on other devices), the shares are all-reduced (one M × M sum), and the ridge part
    (``ridge_rows`` = √λ R_CC) is added once. S is only a *preconditioner* for
    :func:`cgls_solve`: where the gram is numerically singular (κ(A)² beyond about 1/(8ε): it
    does not factor, or a pivot² falls to 8ε·max diag), a shift ε·max diag·10^t is added until
    it factors; that slows CGLS but does not change α.
    """
    comm = comm or local()
    M = Knc.shape[1]
    if Knc.device.type == "cpu" and Knc.shape[0] > 0:
        from scipy.linalg.blas import dsyrk
        # Knc (C order, n × M) is Knc.T in Fortran order: dsyrk(a) = a aᵀ = KᵀK, upper part
        G = torch.from_numpy(dsyrk(1.0, Knc.numpy().T, lower=0))
        G = G.triu() + G.triu(1).T
    else:
        G = Knc.T @ Knc
    G = comm.all_reduce_sum(G)
    if ridge_rows is not None:
        G = G + ridge_rows.T @ ridge_rows
    G = 0.5 * (G + G.T)
    scale = float(G.diagonal().abs().max()) if M else 1.0
    eps = torch.finfo(torch.float64).eps
    eye = None
    for shift in [0.0] + [eps * scale * 10.0**t for t in range(max_tries)]:
        if shift and eye is None:
            eye = torch.eye(M, dtype=G.dtype, device=G.device)
        L, info = torch.linalg.cholesky_ex(G + shift * eye if shift else G)
        # a pivot at rounding level (a numerically dependent column) is a failure too
        if int(info) == 0 and bool(torch.isfinite(L).all()) \
                and float(L.diagonal().min()) ** 2 > 8 * eps * scale:
            return L.T.contiguous(), float(shift)
    raise ValueError("the Nyström gram K_NCᵀK_NC + λK_CC could not be factored even shifted "
                     "(non-finite kernel values?); use solver='tsqr'")


def cgls_solve(Knc: torch.Tensor, Y_local: torch.Tensor, ridge_rows: torch.Tensor | None,
               S: torch.Tensor, comm: Comm | None = None, *, tol: float = CGLS_TOLERANCE,
               max_iter: int = 50, floor: float = 0.0
               ) -> tuple[torch.Tensor, dict[str, Any]]:
    """α = argmin ‖Aα − b‖, A = [K_NC; √λ R_CC], b = [Y; 0], by CGLS preconditioned by S.

    CGLS (conjugate gradients on the least-squares problem, Hestenes–Stiefel in Björck's form)
    on the variable y = Sα, i.e. on A S⁻¹, with S the Cholesky factor of the gram
    (:func:`gram_factor`), starting from the semi-normal solution α₀ = S⁻¹S⁻ᵀAᵀb. Since
    SᵀS = AᵀA up to rounding, κ(A S⁻¹) = 1 + O(ε·κ(A)²): each iteration cuts the error by about
    ε·κ(A)², so one or two suffice up to κ(A) ≈ 1e7. Unlike the semi-normal equations alone
    (error ε·κ(A)², what lost the collapse in the prototype), CGLS works with the residual
    r = b − Aα itself, computed from K_NC, so the result is as accurate as the QR's (ε·κ(A)).

    Each iteration applies K_NC and K_NCᵀ once (rows local to the rank) and meets the other
    ranks in one M × K and one K-vector all-reduce. The K columns run as K independent CGLSs.
    A column stops when its preconditioned normal residual ‖S⁻ᵀAᵀr‖ has fallen below ``tol``
    times its start ‖S⁻ᵀAᵀb‖, or when it stops falling (rounding level); ``converged`` is
    whether every column's final ratio is ≤ max(tol, floor) (``floor``: the rounding level
    the caller expects, e.g. 64·ε·κ(A)).

    Returns
    -------
    (torch.Tensor, dict)
        α (M × K float64) and ``iterations``, ``converged``, ``relative_residual`` (the largest
        column's ratio).
    """
    comm = comm or local()
    tiny = torch.finfo(torch.float64).tiny
    St = S.T.contiguous()

    def s_inv(v):
        return torch.linalg.solve_triangular(S, v, upper=True)

    def s_inv_t(v):
        return torch.linalg.solve_triangular(St, v, upper=False)

    def a_t(r1, r2):  # Aᵀr, identical on every rank; (rᵀK)ᵀ avoids torch's slow Kᵀr path
        g = comm.all_reduce_sum((r1.T @ Knc).T)
        return g if r2 is None else g + ridge_rows.T @ r2

    def a_mul(t):
        return Knc @ t, (None if ridge_rows is None else ridge_rows @ t)

    Y = Y_local.to(torch.float64)
    s = s_inv_t(a_t(Y, None))
    g0 = (s * s).sum(dim=0).clamp(min=tiny)
    x = s_inv(s)
    q1, q2 = a_mul(x)
    r1 = Y - q1
    r2 = None if q2 is None else -q2
    s = s_inv_t(a_t(r1, r2))
    gamma = (s * s).sum(dim=0)
    p = s.clone()
    rel = float((gamma / g0).max().sqrt())
    best = rel
    stalls = 0
    it = 0
    while rel > tol and it < max_iter and stalls < 2:
        it += 1
        t = s_inv(p)
        q1, q2 = a_mul(t)
        delta = comm.all_reduce_sum((q1 * q1).sum(dim=0))
        if q2 is not None:
            delta = delta + (q2 * q2).sum(dim=0)
        a = torch.where(delta > 0, gamma / delta.clamp(min=tiny), torch.zeros_like(gamma))
        x += a * t
        r1 -= a * q1
        if r2 is not None:
            r2 -= a * q2
        s = s_inv_t(a_t(r1, r2))
        gamma_new = (s * s).sum(dim=0)
        b = torch.where(gamma > 0, gamma_new / gamma.clamp(min=tiny), torch.zeros_like(gamma))
        p = s + b * p
        gamma = gamma_new
        rel = float((gamma / g0).max().sqrt())
        stalls = stalls + 1 if rel > 0.5 * best else 0
        best = min(best, rel)
    return x, {"iterations": it, "converged": rel <= max(tol, floor),
               "relative_residual": rel}


# ----------------------------------------------------------------------------- AGOP, predictions
class _Frame:
    """Centers and points in per-group coordinates: c_j = x̃_j + μ_{g(j)}, p_i = x̃_i + μ_{h(i)}.

    μ_g are the means of the centers of group g (from the centers only, as
    :func:`agop.kernels.pairwise_distances` computes them, so identical on every rank). A point
    is placed in the group with the nearest mean: its own class once the classes have
    collapsed, so x̃_i is at the scale of the within-class spread. Any placement is an exact
    identity; the nearest one keeps float32 accurate, and needs no labels.
    """

    def __init__(self, C: torch.Tensor, groups: list[torch.Tensor] | None):
        M = C.shape[0]
        self.groups = groups if groups is not None else [torch.arange(M, device=C.device)]
        self.gid = _group_ids(self.groups, M, C.device)
        self.means = torch.stack([C[idx].mean(dim=0) for idx in self.groups])  # (G, D)
        self.centers = C - self.means[self.gid]

    def point_groups(self, P: torch.Tensor) -> torch.Tensor:
        """The group of each point (n,): the nearest group mean."""
        if len(self.groups) == 1:
            return torch.zeros(P.shape[0], dtype=torch.long, device=P.device)
        return torch.cdist(P, self.means).argmin(dim=1)


def _agop_chunk(frame: _Frame, W: torch.Tensor, A: torch.Tensor, AX: torch.Tensor,
                P: torch.Tensor, pg: torch.Tensor) -> torch.Tensor:
    """Σ_i Σ_k ∇f_k(p_i)∇f_k(p_i)ᵀ over a chunk (D × D), from the weights W (b × M).

    ∇f_k(p_i) = Σ_j W_ij a_jk (c_j − p_i) = Σ_j W_ij a_jk x̃_j − B_ik x̃_i + Σ_g F_igk μ_g with
    B = WA, F_igk = Σ_{j∈g} W_ij a_jk for g ≠ h(i) and F_{i,h(i),k} = −Σ_{g≠h(i)} F_igk: the
    same-class sum, huge once the class has collapsed, is never formed.
    """
    b, D = P.shape
    K = A.shape[1]
    Xp = P - frame.means[pg]
    B = W @ A  # (b, K)
    G = (W @ AX).reshape(b, K, D)  # Σ_j W_ij a_jk x̃_j
    G.sub_(B[:, :, None] * Xp[:, None, :])
    if len(frame.groups) > 1:
        F = torch.stack([W[:, idx] @ A[idx] for idx in frame.groups], dim=1)  # (b, G, K)
        r = torch.arange(b, device=F.device)
        F[r, pg] = 0.0
        F[r, pg] = -F.sum(dim=1)
        G.add_(torch.einsum("bgk,gd->bkd", F, frame.means))
    Gf = G.reshape(b * K, D)
    return Gf.T @ Gf


def second_pass(kernel: RadialKernel, X_local: torch.Tensor, C: torch.Tensor,
                coef: torch.Tensor, Y_local: torch.Tensor | None = None, *,
                row_start: int = 0, centers: np.ndarray | None = None,
                groups: list[torch.Tensor] | None = None,
                agop_rows: np.ndarray | None | bool = None,
                distances: torch.Tensor | None = None, kvalues: torch.Tensor | None = None,
                chunk_rows: int | None = None,
                seconds: dict[str, float] | None = None) -> dict[str, torch.Tensor | None]:
    """Fitted values, the gradient Σ K_NCᵀ(Y − F) and the AGOP sum over one rank's rows.

    One pass over row chunks of ``X_local``: k(X_b, C) (from ``distances`` when kept by
    :func:`local_factor`, from ``kvalues`` — K_NC itself in float64, kept by the PCG solver —
    or else rebuilt exactly as there) gives F_b = k α in float64 from the compute-dtype kernel
    block; the AGOP of f at the rows ``agop_rows`` (local indices, sorted;
    True: all rows; None/False: no AGOP) is summed in the compute dtype in per-group
    coordinates (``groups``: each point in the group of the nearest center-class mean), the
    term j of a row that is center j dropped by index.

    Returns
    -------
    dict
        ``"fitted"`` (n_local × K float64), ``"gradient"`` (M × K float64, K_NCᵀ(Y − F) over the
        local rows; None without ``Y_local``), ``"agop"`` (D × D, compute dtype, the *sum* over
        the local AGOP rows, not divided; None without AGOP) and ``"agop_count"`` (rows summed).
    """
    n_local, D = X_local.shape
    M, K = coef.shape
    dtype, dev = X_local.dtype, X_local.device
    seconds = {} if seconds is None else seconds
    seconds.setdefault("fitted", 0.0)
    seconds.setdefault("agop", 0.0)
    if chunk_rows is None:
        chunk_rows = _chunk_rows(n_local, M, D, K, dtype, dev)
    coef64 = coef.to(torch.float64)
    fitted = torch.empty((n_local, K), dtype=torch.float64, device=dev)
    grad = None if Y_local is None else torch.zeros((M, K), dtype=torch.float64, device=dev)
    if agop_rows is True:
        agop_rows = np.arange(n_local)
    do_agop = agop_rows is not None and agop_rows is not False
    Ms = None
    if do_agop:
        agop_rows = np.asarray(agop_rows, dtype=np.int64)
        frame = _Frame(C.to(dtype), groups)
        A = coef.to(dtype)
        AX = (A[:, :, None] * frame.centers[:, None, :]).reshape(M, K * D)
        Ms = torch.zeros((D, D), dtype=dtype, device=dev)
    for i0 in range(0, n_local, chunk_rows):
        i1 = min(n_local, i0 + chunk_rows)
        t = time.perf_counter()
        if distances is not None:
            dist = distances[i0:i1]
            kb = kernel.from_distances(dist)
        elif kvalues is not None:
            kb = dist = None
        else:
            kb, dist = kernel_block(kernel, X_local[i0:i1], C, groups=groups,
                                    start=row_start + i0, centers=centers)
        k64 = kvalues[i0:i1] if kvalues is not None else kb.to(torch.float64)
        F = k64 @ coef64
        fitted[i0:i1] = F
        if grad is not None:  # ((Y − F)ᵀk)ᵀ: kᵀ as the first factor is a slow GEMM path
            grad += ((Y_local[i0:i1].to(torch.float64) - F).T @ k64).T
        del k64
        synchronize(dev)
        t2 = time.perf_counter()
        seconds["fitted"] += t2 - t
        if do_agop:
            a0, a1 = np.searchsorted(agop_rows, [i0, i1])
            if a1 > a0:
                sel = torch.as_tensor(agop_rows[a0:a1] - i0, device=dev)
                if dist is None:  # K_NC kept as kernel values: the distances of these rows
                    d_s = pairwise_distances(X_local[i0:i1][sel], C.to(dtype), groups=groups)
                    k_s = kernel.from_distances(d_s)
                else:
                    d_s, k_s = dist[sel], kb[sel]
                W = kernel.gradient_weights(k_s, d_s)
                if centers is not None:  # drop the self term j of a row that is center j
                    rows, cols = _self_pairs(centers, row_start + i0, row_start + i1, dev)
                    pos = torch.full((i1 - i0,), -1, dtype=torch.long, device=dev)
                    pos[rows] = cols
                    ps = pos[sel]
                    hit = torch.nonzero(ps >= 0)[:, 0]
                    W[hit, ps[hit]] = 0.0
                Ps = X_local[i0:i1][sel]
                Ms += _agop_chunk(frame, W, A, AX, Ps, frame.point_groups(Ps))
                del W, d_s, k_s
            synchronize(dev)
            seconds["agop"] += time.perf_counter() - t2
        del kb, dist
    count = 0 if not do_agop else len(agop_rows)
    return {"fitted": fitted, "gradient": grad, "agop": Ms, "agop_count": count}


def _chunk_rows(n_local: int, M: int, D: int, K: int, dtype: torch.dtype,
                device: torch.device) -> int:
    item = torch.tensor([], dtype=dtype).element_size()
    per_row = item * (4 * M + 2 * K * D + D) + 8 * (M + 2 * K)
    budget = memory_budget(device) - item * M * K * D
    return int(max(1, min(CHUNK_ROWS, n_local, budget // per_row)))


def nystrom_agop(kernel: RadialKernel, X_local: torch.Tensor, C: torch.Tensor,
                 coef: torch.Tensor, *, n_total: int | None = None, row_start: int = 0,
                 centers: np.ndarray | None = None, groups: list[torch.Tensor] | None = None,
                 points: np.ndarray | None = None,
                 comm: Comm | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """AGOP of the Nyström predictor f(x) = Σ_j α_j k(x, c_j) at the training points.

    M = (1/n) Σ_i Σ_k ∇f_k(x_i)∇f_k(x_i)ᵀ over the n evaluation points: all N training points,
    or the global rows ``points`` (e.g. :func:`agop_sample`). Each rank sums over its own rows
    (global rows ``row_start..``), the D × D sums are all-reduced and divided by the global n.
    Where a training point is center j (global row ``centers[j]``) its term j is dropped by
    index. Chunked over rows (never an n × M × D array).

    Parameters
    ----------
    X_local : (n_local, D) tensor
        This rank's (normalized) training rows, compute dtype.
    C : (M, D) tensor
        Centers; ``coef`` α (M × K) any float dtype (cast to X's).
    n_total : int, optional
        N, the global number of rows (default: n_local, one process).
    centers : (M,) int array, optional
        Global indices of the centers (None: no training point is a center).
    groups : list of tensors, optional
        Center classes (:func:`center_groups`): distances and gradients are then assembled in
        per-class coordinates about the centers' class means, each point in the frame of the
        nearest mean (accurate in float32 after collapse).
    points : (n,) int array, optional
        Global rows to evaluate at (sorted, distinct); None: all rows.

    Returns
    -------
    torch.Tensor
        D × D, symmetric, X's dtype, identical on every rank.
    """
    comm = comm or local()
    n_local = X_local.shape[0]
    N = n_local if n_total is None else int(n_total)
    rows, n_eval = _local_points(points, row_start, n_local, N)
    out = second_pass(kernel, X_local, C, coef, None, row_start=row_start, centers=centers,
                      groups=groups, agop_rows=rows, chunk_rows=chunk_rows)
    Ms = comm.all_reduce_sum(out["agop"]) / n_eval
    return 0.5 * (Ms + Ms.T)


def _local_points(points: np.ndarray | None, row_start: int, n_local: int,
                  N: int) -> tuple[np.ndarray, int]:
    """(this rank's AGOP rows as local indices, the global number of AGOP points)."""
    if points is None:
        return np.arange(n_local), N
    pts = np.asarray(points, dtype=np.int64)
    if pts.ndim != 1 or len(pts) == 0 or bool(np.any(np.diff(pts) <= 0)) or pts[0] < 0 \
            or pts[-1] >= N:
        raise ValueError(f"agop points must be distinct sorted global row indices in 0..{N - 1}")
    j0, j1 = np.searchsorted(pts, [row_start, row_start + n_local])
    return pts[j0:j1] - row_start, len(pts)


def nystrom_predict(kernel: RadialKernel, P: torch.Tensor, C: torch.Tensor, coef: torch.Tensor,
                    *, groups: list[torch.Tensor] | None = None,
                    chunk_rows: int | None = None) -> torch.Tensor:
    """f(P) = k(P, C) α for points P (n × D), centers C (M × D), α (M × K): n × K float64.

    The kernel blocks are built in P's dtype (``groups``: about the centers' class means) and
    multiplied by α in float64, in row chunks, as the fitted values are (:func:`second_pass`).
    """
    check_matrix(P, "P", finite=True)
    if P.shape[1] != C.shape[1]:
        raise ValueError(f"P has {P.shape[1]} columns but the centers have {C.shape[1]}")
    n, M, K = P.shape[0], C.shape[0], coef.shape[1]
    if chunk_rows is None:
        chunk_rows = _chunk_rows(max(n, 1), M, P.shape[1], K, P.dtype, P.device)
    coef64 = coef.to(torch.float64)
    out = torch.empty((n, K), dtype=torch.float64, device=P.device)
    for i0 in range(0, n, chunk_rows):
        kb, _ = kernel_block(kernel, P[i0:i0 + chunk_rows], C, groups=groups)
        out[i0:i0 + chunk_rows] = kb.to(torch.float64) @ coef64
    return out


# ----------------------------------------------------------------------------- memory
@dataclass
class NystromPlan:
    """How a rank runs the Nyström layer: rows per QR block, per second-pass chunk, whether the
    n_local × M distances are kept between the solve and the second pass, and the peak bytes."""

    block_rows: int
    chunk_rows: int
    keep_knc: bool
    bytes: int


def nystrom_memory(n_local: int, M: int, D: int, K: int, dtype: torch.dtype = torch.float32,
                   keep_knc: bool = False, *, world: int = 1, block_rows: int | None = None,
                   chunk_rows: int | None = None, solver: str = "tsqr") -> int:
    """Estimated peak bytes of one rank's Nyström layer (n_local rows, M centers, D, K).

    ``"tsqr"``. Fixed: the centers and their shifted copy (2MD), K_CC and its factor in
    float64 (2M²·8), the running and new factors (2(M+K)²·8), the gathered factors and their QR
    copy (2·world·(M+K)²·8 when world > 1), α·x̃ for the AGOP (MKD). Kept (``keep_knc``): the
    distances (n_local·M). Then the larger phase: a QR block (its distances, kernel and
    pairwise temporaries, 3M per row, and the float64 buffer and LAPACK's copy, 2·8(M+K) per
    row, plus (M+K)² for the factor on top) or a second-pass chunk (4M + 2KD + D per row).

    ``"pcg"``. Fixed: the centers (2MD), K_CC, R_CC, the preconditioner and its factor in float64
    (4M²·8), α·x̃ (MKD); kept: K_NC in float64 (8·n_local·M); then a block of its rows (3M per
    row) or a second-pass chunk.
    """
    if solver not in SOLVERS or solver == "auto":
        raise ValueError(f"solver must be one of {SOLVERS[1:]}; got {solver!r}")
    item = torch.tensor([], dtype=dtype).element_size()
    n = M + K
    if block_rows is None:
        block_rows = min(n_local, BLOCK_FACTOR * n)
    if chunk_rows is None:
        chunk_rows = min(n_local, CHUNK_ROWS)
    chunk = chunk_rows * (item * (4 * M + 2 * K * D + D) + 8 * (M + 2 * K))
    if solver in ("pcg", "cgls"):
        fixed = item * 2 * M * D + 8 * 4 * M * M + item * M * K * D + item * D * D
        kept = item * n_local * M if keep_knc and solver == "cgls" else 0
        return int(fixed + kept + 8 * n_local * M + max(block_rows * item * 3 * M, chunk))
    fixed = (item * 2 * M * D + 8 * 2 * M * M + 8 * 2 * n * n
             + (8 * 2 * world * n * n if world > 1 else 0) + item * M * K * D + item * D * D)
    kept = item * n_local * M if keep_knc else 0
    block = block_rows * (item * 3 * M + 16 * n) + 16 * n * n
    return int(fixed + kept + max(block, chunk))


def plan(n_local: int, M: int, D: int, K: int, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu", *, world: int = 1,
         keep_knc: bool | str = "auto", solver: str = "tsqr") -> NystromPlan:
    """Choose block sizes and whether to keep K_NC's distances, from the free memory.

    The QR block is BLOCK_FACTOR·(M + K) rows (fewer if memory is short, at least M + K or
    n_local); ``keep_knc="auto"`` keeps the n_local × M distances when they fit with that
    block (the second pass then skips rebuilding them: 2·n_local·M·D FLOPs saved). ``"pcg"``
    always keeps K_NC (float64). Raises ``MemoryError`` with the size needed, before any work,
    when even the smallest block does not fit (M too large) or ``keep_knc=True`` does not fit.
    """
    if keep_knc not in (True, False, "auto"):
        raise ValueError(f"keep_knc must be True, False or 'auto'; got {keep_knc!r}")
    dev = torch.device(device)
    budget = memory_budget(dev, fraction=1.0)
    n = M + K
    chunk = min(n_local, CHUNK_ROWS)
    smallest = min(n_local, n)
    options = [True, False] if keep_knc == "auto" else [bool(keep_knc)]
    if solver == "pcg":
        options = [False]
    for rows in (min(n_local, BLOCK_FACTOR * n), min(n_local, 2 * n), smallest):
        for keep in options:
            need = nystrom_memory(n_local, M, D, K, dtype, keep, world=world,
                                  block_rows=rows, chunk_rows=chunk, solver=solver)
            if need <= budget:
                return NystromPlan(block_rows=rows, chunk_rows=chunk, keep_knc=keep, bytes=need)
    need = nystrom_memory(n_local, M, D, K, dtype, keep_knc is True, world=world,
                          block_rows=smallest, chunk_rows=chunk, solver=solver)
    what = ", K_NC kept" if keep_knc is True or solver in ("pcg", "cgls") else ""
    raise MemoryError(
        f"the Nyström layer ({solver}) with M = {M} centers ({n_local} rows on this rank, "
        f"D = {D}, K = {K}, {dtype_name(dtype)}{what}) needs about {format_bytes(need)} on "
        f"{dev} but the budget is {format_bytes(budget)}; use fewer centers (or more processes"
        f"{', or solver=tsqr' if solver in ('pcg', 'cgls') else ''})"
    )


# ----------------------------------------------------------------------------- the whole fit
@dataclass
class NystromFit:
    """Result of :func:`fit_nystrom`: the predictor f(x) = Σ_j α_j k(x, c_j) and its checks.

    Attributes
    ----------
    centers : np.ndarray
        (M,) global row indices of the centers, sorted.
    center_features : torch.Tensor
        C, M × D (compute dtype), identical on every rank; for :func:`nystrom_predict`.
    groups : list of tensors or None
        Center classes (:func:`center_groups`) used for per-class distances.
    coef : torch.Tensor
        α, M × K float64, identical on every rank.
    ridge, jitter : float
        λ as requested; the diagonal jitter added to K_CC for its factorization.
    n : int
        N, the global number of training rows.
    objective : float
        (‖K_NCα − Y‖² + λαᵀK_CCα)/‖Y‖², from the factor (ρ).
    residual : float
        ‖F − Y‖_F/‖Y‖_F from the fitted values F (exact, not from ρ).
    optimality : float
        ‖Aᵀ(b − Aα)‖_F / (‖A‖₂(‖b − Aα‖_F + ‖A‖₂‖α‖_F)): a backward-error check of the solve
        (about 1e-15 when it went right).
    condition : float
        κ₂(R) = κ₂(A), estimated (:func:`condition_estimate`).
    error_estimate : float
        u·κ₂(A)/√M, u the unit roundoff of the dtype K_NC was formed in: the typical relative
        error of α due to the rounding of the kernel entries (module docstring).
    trusted : bool
        ``error_estimate ≤ TRUST_TOLERANCE``, ``optimality ≤ OPTIMALITY_TOLERANCE`` and
        ``converged``.
    fitted : torch.Tensor
        f at this rank's rows, n_local × K float64.
    agop : torch.Tensor or None
        The AGOP (D × D, compute dtype, identical on every rank); None if not asked for.
    agop_points : np.ndarray or None
        Global rows the AGOP was evaluated at (None: all N).
    keep_knc : bool
        Whether K_NC's distances were kept between the solve and the second pass (``"tsqr"``;
        ``"pcg"`` always keeps K_NC itself, in float64).
    dtype : str
        The compute dtype.
    solver : str
        The solver that ran: ``"cgls"``, ``"tsqr"`` or ``"pcg"`` (never ``"auto"``).
    iterations, converged, preconditioned_condition :
        CGLS's or PCG's iteration count, whether it met its tolerance, and (PCG) κ of the
        preconditioned operator from its Lanczos coefficients (0, True, NaN for ``"tsqr"``).
    seconds : dict
        Per phase: ``centers``, ``ridge`` (K_CC and its factor), ``knc`` (kernel blocks),
        ``qr`` and ``combine`` (TSQR), ``gram`` and ``cg`` (CGLS) or ``cg`` (PCG), ``solve``
        (α and κ), ``fitted``,
        ``agop``, ``check`` (this rank's).
    """

    centers: np.ndarray
    center_features: torch.Tensor
    groups: list[torch.Tensor] | None
    coef: torch.Tensor
    ridge: float
    jitter: float
    n: int
    objective: float
    residual: float
    optimality: float
    condition: float
    error_estimate: float
    trusted: bool
    fitted: torch.Tensor
    agop: torch.Tensor | None
    agop_points: np.ndarray | None
    keep_knc: bool
    dtype: str
    solver: str = "tsqr"
    iterations: int = 0
    converged: bool = True
    preconditioned_condition: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)

    def predict(self, kernel: RadialKernel, P: torch.Tensor) -> torch.Tensor:
        """f(P), n × K float64 (:func:`nystrom_predict` with this fit's centers and groups)."""
        return nystrom_predict(kernel, P.to(self.center_features.dtype), self.center_features,
                               self.coef, groups=self.groups)


def fit_nystrom(X_local: torch.Tensor, y: Any, centers: np.ndarray,
                kernel: RadialKernel | str = "laplace", ridge: float = 1e-6, *,
                bandwidth: float = 2.0, comm: Comm | None = None,
                num_classes: int | None = None, per_class: bool = True, agop: bool = True,
                agop_points: int | np.ndarray | None = None, seed: int = 0,
                keep_knc: bool | str = "auto", block_rows: int | None = None,
                chunk_rows: int | None = None, solver: str = "auto", tol: float | None = None,
                max_iter: int | None = None) -> NystromFit:
    """One Nyström Deep RFM layer on this rank's rows: α, fitted values, the AGOP, and checks.

    α = argmin ‖K_NCα − Y‖² + λαᵀK_CCα (module docstring), Y the ±1 one-hot targets of ``y``;
    then f at this rank's rows and the AGOP of f at all N training points (or ``agop_points``).

    Parameters
    ----------
    X_local : (n_local, D) tensor
        This rank's rows of the normalized features, rows ``comm.row_range``-wise (one process:
        all N rows), compute dtype, on the device.
    y : array-like, (N,)
        Labels of *all* N training points (every rank holds them).
    centers : (M,) int array
        Global row indices of the centers (:func:`select_centers`), sorted and distinct.
    kernel : RadialKernel or str
        ``"laplace"`` (with ``bandwidth``), ``"gaussian"`` or an instance.
    ridge : float
        λ ≥ 0. 0 needs K_NC of full column rank.
    comm : Comm, optional
        The process group (default :func:`agop.distributed.local`).
    num_classes : int, optional
        K (default max(y) + 1).
    per_class : bool
        Distances and AGOP gradients about the class means of the centers (float32 accuracy
        after collapse; an exact identity, so float64 numbers do not change beyond rounding).
    agop : bool
        Compute the AGOP.
    agop_points : int or array, optional
        Evaluate the AGOP at a sample: an int draws that many global rows by
        :func:`agop_sample` with ``seed`` (the same whatever the world size); an array gives the
        global rows. None: all N.
    keep_knc : bool or "auto"
        Keep K_NC's distances between the solve and the second pass (:func:`plan`).
    block_rows, chunk_rows : int, optional
        Override the planned QR block and second-pass chunk rows.
    solver : str
        ``"auto"`` (default): ``"cgls"`` where its memory plan fits on every rank, else
        ``"tsqr"`` (:func:`resolve_solver`). ``"cgls"``: K_NC kept in float64 (n_local·M·8
        bytes), the float64 gram's Cholesky factor preconditioning CGLS (:func:`cgls_solve`;
        ``tol`` default ``CGLS_TOLERANCE``, ``max_iter`` 50). ``"tsqr"``: the streamed
        Householder QR, backward stable, no tolerance, K_NC streamed (the least memory).
        ``"pcg"``: CG preconditioned by FALKON's preconditioner (:func:`falkon_preconditioner`),
        K_NC kept in float64, one M × K all-reduce per iteration, stopped at relative residual
        ``tol`` (default 1e-10, at most ``max_iter`` = 300 iterations). Not converged →
        ``trusted`` False.

    Returns
    -------
    NystromFit
    """
    comm = comm or local()
    seconds: dict[str, float] = {}
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    if tol is not None:
        check_positive(tol, "tol")
    if max_iter is not None:
        max_iter = check_int(max_iter, "max_iter", minimum=1)
    kernel = get_kernel(kernel, bandwidth)
    check_matrix(X_local, "X_local")
    check_positive(ridge, "ridge", allow_zero=True)
    labels, K = as_labels(y, num_classes=num_classes, min_classes=1, require_all=False)
    N = labels.shape[0]
    if comm.world > N:
        raise ValueError(f"the world size {comm.world} exceeds the N = {N} training points")
    row_start, row_stop = row_range(N, comm.rank, comm.world)
    n_local, D = X_local.shape
    if n_local != row_stop - row_start:
        raise ValueError(
            f"rank {comm.rank} of {comm.world} must hold rows {row_start}..{row_stop - 1} of the "
            f"N = {N} labels ({row_stop - row_start} rows); X_local has {n_local}"
        )
    centers = _check_centers(centers, N)
    M = len(centers)
    if M < len(np.unique(labels)):
        raise ValueError(f"M = {M} centers are fewer than the {len(np.unique(labels))} classes")
    points = None
    if agop_points is not None:
        points = (agop_sample(N, agop_points, seed) if isinstance(agop_points, (int, np.integer))
                  else np.asarray(agop_points, dtype=np.int64))
    local_rows, n_eval = _local_points(points, row_start, n_local, N)
    dtype, dev = X_local.dtype, X_local.device
    if comm.world > 1:  # ranks that disagree would meet in collectives of different shapes
        comm.agree((N, D, K, M, zlib.crc32(centers.tobytes()), float(ridge), repr(kernel),
                    per_class, agop, None if points is None else zlib.crc32(points.tobytes()),
                    solver, tol, max_iter, dtype_name(dtype)), "the Nyström settings")
    solver = resolve_solver(solver, n_local, M, D, K, dtype, dev, comm=comm)
    if tol is None:
        tol = CGLS_TOLERANCE if solver == "cgls" else 1e-10
    if max_iter is None:
        max_iter = 50 if solver == "cgls" else 300
    if solver == "cgls" and keep_knc == "auto" and (not agop or 2 * len(local_rows) < n_local):
        keep_knc = False  # the AGOP rebuilds the distances of its few rows; K_NC is kept anyway
    p = _collective_plan(comm, n_local, M, D, K, dtype, dev, keep_knc, solver)
    block_rows = block_rows or p.block_rows
    chunk_rows = chunk_rows or p.chunk_rows

    t = time.perf_counter()
    C = gather_rows(X_local, centers, row_start, comm)
    groups = center_groups(labels, centers) if per_class else None
    if groups is not None:
        groups = [g.to(dev) for g in groups]
    synchronize(dev)
    seconds["centers"] = time.perf_counter() - t

    Y_local = signed_one_hot(torch.as_tensor(labels[row_start:row_stop], device=dev), K,
                             torch.float64)
    if solver == "tsqr":
        coef, R_info, kept, kvalues = _solve_tsqr(kernel, X_local, Y_local, C, centers, groups,
                                                  ridge, row_start, block_rows, p.keep_knc,
                                                  comm, seconds)
    elif solver == "cgls":
        coef, R_info, kept, kvalues = _solve_cgls(kernel, X_local, Y_local, C, centers, groups,
                                                  ridge, row_start, block_rows, p.keep_knc, tol,
                                                  max_iter, comm, seconds)
    else:
        coef, R_info, kept, kvalues = _solve_pcg(kernel, X_local, Y_local, C, centers, groups,
                                                 ridge, row_start, N, block_rows, tol, max_iter,
                                                 comm, seconds)
    ridge_rows, jitter, condition, norm_a = (R_info[k] for k in ("ridge_rows", "jitter",
                                                                  "condition", "norm"))

    out = second_pass(kernel, X_local, C, coef, Y_local, row_start=row_start, centers=centers,
                      groups=groups, agop_rows=local_rows if agop else None, distances=kept,
                      kvalues=kvalues, chunk_rows=chunk_rows, seconds=seconds)
    del kept, kvalues

    t = time.perf_counter()
    # ‖F − Y‖², ‖Y‖² and the gradient K_NCᵀ(Y − F) summed over ranks; the ridge part once
    F, Y64 = out["fitted"], Y_local
    sums = comm.all_reduce_sum(torch.stack([((F - Y64) ** 2).sum(), (Y64 ** 2).sum()]))
    grad = comm.all_reduce_sum(out["gradient"])
    ridge_norm2 = 0.0
    if ridge_rows is not None:
        Ra = ridge_rows @ coef  # √λ R_CC α
        grad -= ridge_rows.T @ Ra
        ridge_norm2 = float((Ra ** 2).sum())
    fit_sq, y_sq = float(sums[0]), float(sums[1])
    r_norm = math.sqrt(fit_sq + ridge_norm2)
    optimality = float(grad.norm()) / max(norm_a * (r_norm + norm_a * float(coef.norm())),
                                          torch.finfo(torch.float64).tiny)
    objective = R_info.get("objective")
    if objective is None:  # CGLS, PCG: from the exact fitted values
        objective = (fit_sq + ridge_norm2) / y_sq
    u = torch.finfo(dtype).eps / 2
    error_estimate = u * condition / math.sqrt(M)
    agop_mat = None
    if agop:
        Ms = comm.all_reduce_sum(out["agop"]) / n_eval
        agop_mat = 0.5 * (Ms + Ms.T)
    synchronize(dev)
    seconds["check"] = time.perf_counter() - t
    converged = R_info.get("converged", True)
    return NystromFit(
        centers=centers, center_features=C, groups=groups, coef=coef, ridge=float(ridge),
        jitter=jitter, n=N, objective=objective, residual=math.sqrt(fit_sq / y_sq),
        optimality=optimality, condition=condition, error_estimate=error_estimate,
        trusted=bool(error_estimate <= TRUST_TOLERANCE and optimality <= OPTIMALITY_TOLERANCE
                     and converged),
        fitted=F, agop=agop_mat, agop_points=points, keep_knc=p.keep_knc,
        dtype=dtype_name(dtype), solver=solver, iterations=R_info.get("iterations", 0),
        converged=converged,
        preconditioned_condition=R_info.get("preconditioned_condition", float("nan")),
        seconds=seconds)


def _solve_tsqr(kernel, X_local, Y_local, C, centers, groups, ridge, row_start, block_rows,
                keep, comm, seconds):
    """α by the streamed QR (module docstring); the distances kept if ``keep``."""
    M, K = C.shape[0], Y_local.shape[1]
    dev = X_local.device
    t = time.perf_counter()
    ridge_rows, jitter = ridge_factor(kernel, C, ridge, groups=groups)
    initial = None
    if ridge_rows is not None and comm.rank == 0:
        initial = torch.cat([ridge_rows, torch.zeros((M, K), dtype=torch.float64, device=dev)], 1)
    synchronize(dev)
    seconds["ridge"] = time.perf_counter() - t

    R, kept = local_factor(kernel, X_local, Y_local, C, row_start=row_start, centers=centers,
                           groups=groups, initial=initial, block_rows=block_rows,
                           keep=keep, seconds=seconds)
    t = time.perf_counter()
    R = combine_factors(comm.all_gather(R))
    synchronize(dev)
    seconds["combine"] = time.perf_counter() - t

    t = time.perf_counter()
    coef, rho = solve_factor(R, M)
    coef = comm.broadcast(coef)  # bit-identical α on every rank
    condition, norm_a = condition_estimate(R[:M, :M])
    synchronize(dev)
    seconds["solve"] = time.perf_counter() - t
    y_sq = float(comm.all_reduce_sum((Y_local ** 2).sum()))
    info = {"ridge_rows": ridge_rows, "jitter": jitter, "condition": condition, "norm": norm_a,
            "objective": float((rho ** 2).sum()) / y_sq}
    return coef, info, kept, None


def _solve_pcg(kernel, X_local, Y_local, C, centers, groups, ridge, row_start, N, block_rows,
               tol, max_iter, comm, seconds):
    """α by FALKON-preconditioned CG on Hα = K_NCᵀY, H = K_NCᵀK_NC + λK_CC; K_NC kept in
    float64 (the products in float64, so that only the kernel entries carry the compute
    dtype's rounding, as in the QR path)."""
    dev = X_local.device
    Knc, _ = _knc64(kernel, X_local, C, centers, groups, row_start, block_rows, seconds)

    t = time.perf_counter()
    R_cc, jitter = center_factor(kernel, C, groups=groups)
    A_f = falkon_preconditioner(R_cc, N, ridge)
    synchronize(dev)
    seconds["ridge"] = time.perf_counter() - t

    t = time.perf_counter()

    def ktk(V):  # Σ_ranks K_rᵀ(K_r V) + λ R_CCᵀR_CC V; (Uᵀ K)ᵀ avoids torch's slow Kᵀ U path
        out = comm.all_reduce_sum(((Knc @ V).T @ Knc).T)
        return out + ridge * (R_cc.T @ (R_cc @ V)) if ridge else out

    rhs = comm.all_reduce_sum((Y_local.T @ Knc).T)
    coef, info = pcg_solve(ktk, rhs, R_cc, A_f, tol=tol, max_iter=max_iter)
    coef = comm.broadcast(coef)
    synchronize(dev)
    seconds["cg"] = time.perf_counter() - t

    t = time.perf_counter()
    condition, norm_a = condition_estimate((A_f, R_cc))
    synchronize(dev)
    seconds["solve"] = time.perf_counter() - t
    info.update(ridge_rows=math.sqrt(ridge) * R_cc if ridge else None, jitter=jitter,
                condition=condition, norm=norm_a)
    return coef, info, None, Knc


def _knc64(kernel, X_local, C, centers, groups, row_start, block_rows, seconds, keep=False):
    """This rank's K_NC, n_local × M in float64, built in row blocks in the compute dtype (so
    that only the kernel entries carry its rounding; the products run in float64), and with
    ``keep`` the distances too (compute dtype, for the AGOP's second pass)."""
    n_local, M = X_local.shape[0], C.shape[0]
    dev = X_local.device
    t = time.perf_counter()
    Knc = torch.empty((n_local, M), dtype=torch.float64, device=dev)
    kept = torch.empty((n_local, M), dtype=X_local.dtype, device=dev) if keep else None
    for i0 in range(0, n_local, block_rows):
        i1 = min(n_local, i0 + block_rows)
        kb, dist = kernel_block(kernel, X_local[i0:i1], C, groups=groups,
                                start=row_start + i0, centers=centers)
        Knc[i0:i1] = kb
        if kept is not None:
            kept[i0:i1] = dist
        del kb, dist
    synchronize(dev)
    seconds["knc"] = time.perf_counter() - t
    return Knc, kept


def _solve_cgls(kernel, X_local, Y_local, C, centers, groups, ridge, row_start, block_rows,
                keep, tol, max_iter, comm, seconds):
    """α by CGLS preconditioned by the Cholesky factor of the float64 gram (:func:`cgls_solve`);
    K_NC kept in float64 for the iterations and the fitted values, its distances too if
    ``keep`` (for the AGOP)."""
    dev = X_local.device
    Knc, kept = _knc64(kernel, X_local, C, centers, groups, row_start, block_rows, seconds,
                       keep)

    t = time.perf_counter()
    ridge_rows, jitter = ridge_factor(kernel, C, ridge, groups=groups)
    synchronize(dev)
    seconds["ridge"] = time.perf_counter() - t

    t = time.perf_counter()
    S, shift = gram_factor(Knc, ridge_rows, comm)
    synchronize(dev)
    seconds["gram"] = time.perf_counter() - t

    t = time.perf_counter()
    condition, norm_a = condition_estimate(S)
    synchronize(dev)
    seconds["solve"] = time.perf_counter() - t

    t = time.perf_counter()
    u = torch.finfo(torch.float64).eps / 2
    coef, info = cgls_solve(Knc, Y_local, ridge_rows, S, comm, tol=tol, max_iter=max_iter,
                            floor=64 * u * condition)
    coef = comm.broadcast(coef)  # bit-identical α on every rank
    synchronize(dev)
    seconds["cg"] = time.perf_counter() - t
    info.update(ridge_rows=ridge_rows, jitter=jitter, condition=condition, norm=norm_a,
                gram_shift=shift)
    return coef, info, kept, Knc


def _collective_plan(comm, n_local, M, D, K, dtype, dev, keep_knc, solver) -> NystromPlan:
    """:func:`plan` on every rank, with one verdict: if it fails on any rank, every rank raises
    the ``MemoryError`` (a rank-local failure would leave the others waiting in a collective)."""
    try:
        p, err = plan(n_local, M, D, K, dtype, dev, world=comm.world, keep_knc=keep_knc,
                      solver=solver), None
    except MemoryError as e:
        p, err = None, str(e)
    if comm.world > 1:
        errors = [e for e in comm.all_gather_object(err) if e is not None]
        if errors and err is None:
            err = f"on another rank: {errors[0]}"
    if err is not None:
        raise MemoryError(err)
    return p


def resolve_solver(solver: str, n_local: int, M: int, D: int, K: int,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                   comm: Comm | None = None) -> str:
    """The solver ``"auto"`` stands for: ``"cgls"`` where its plan (K_NC kept in float64) fits
    the memory budget on every rank, else ``"tsqr"`` (streamed; the least memory). Other names
    are returned as they are. With several processes the ranks decide together (one
    all-reduce), so that they all run the same solver."""
    if solver != "auto":
        return solver
    comm = comm or local()
    try:
        plan(n_local, M, D, K, dtype, device, world=comm.world, solver="cgls")
        fits = 1.0
    except MemoryError:
        fits = 0.0
    if comm.world > 1:
        fits = float(comm.all_reduce_sum(torch.tensor([fits], dtype=torch.float64))[0])
    return "cgls" if fits == comm.world else "tsqr"


def _check_centers(centers: Any, N: int) -> np.ndarray:
    c = to_numpy(centers)
    if c.ndim != 1 or c.size == 0 or c.dtype.kind not in "iu":
        raise ValueError(f"centers must be a non-empty 1-D array of integer row indices; got "
                         f"shape {c.shape}, dtype {c.dtype}")
    c = c.astype(np.int64)
    if c.size > N:
        raise ValueError(f"M = {c.size} centers exceed the N = {N} training points")
    if c[0] < 0 or c[-1] >= N or bool(np.any(np.diff(c) <= 0)):
        raise ValueError(f"centers must be sorted, distinct row indices in 0..{N - 1}")
    return c
