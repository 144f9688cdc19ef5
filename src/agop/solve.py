"""Kernel ridge regression by Cholesky: α = (K + μI)⁻¹ Y (Algorithm 1, step 2).

μ = 0 is the paper's ridgeless interpolation. Every solve is checked by its residual against
the matrix that was factored, accumulated in float64,

    r = ‖Y − (K + (μ + jitter)I) α‖_F / ‖Y‖_F,

not only by the factorization having returned: a float32 Cholesky of an ill-conditioned matrix
returns without complaint and solves it to κ·1e-7. While r > ``RESIDUAL_TOL`` the solution is
refined (mixed-precision iterative refinement: α ← α + (LLᵀ)⁻¹ r with r computed in float64 and
α kept in float64; each step shrinks r by about κ·ε of the factor's dtype). An attempt whose
residual does not fall to ``RESIDUAL_TOL`` is rejected like a failed factorization, and the
next is tried: float64 if the input was float32, then a growing diagonal jitter. The dtype,
jitter, residual and number of refinements actually used are returned, never applied silently.

The residual is taken against the whole matrix given, though Cholesky reads its lower triangle
only (a matrix symmetric only to rounding is solved as what it is). When no attempt reaches
``RESIDUAL_TOL`` — a matrix singular to working precision with targets outside its range, or
κ ≳ 1e10 — the float64 attempt with the smallest residual among those whose normwise backward
error ‖r‖/(‖K + shift·I‖_F‖α‖_F + ‖Y‖_F) is at most N·ε₆₄ (solutions as accurate as float64
allows for their matrix) is returned, its residual reported for the caller to judge; with none,
the solve is refused (ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agop._validate import check_positive

#: A solve is accepted when its relative residual against the matrix is at most this (the
#: targets are ±1: fitted values within 1e-4 of them; an unrefined float32 solve of a Deep RFM
#: layer leaves 3e-7 (digits, 500 points) to 3e-5 (CIFAR-10, 5,000)); above it, it is
#: refined, then retried.
RESIDUAL_TOL = 1e-4
#: At most this many refinement steps per attempt (each must shrink the residual by half).
MAX_REFINEMENTS = 6


def signed_one_hot(y: torch.Tensor, num_classes: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Regression targets of the paper (Appendix C): +1 in the own class, −1 elsewhere (N × K).

    ``y``: class indices 0..K−1 (a tensor; the result is on its device).
    """
    T = torch.full((y.shape[0], num_classes), -1.0, dtype=dtype, device=y.device)
    T[torch.arange(y.shape[0], device=y.device), y] = 1.0
    return T


@dataclass
class KernelRidgeResult:
    """Result of :func:`kernel_ridge`.

    Attributes:
        coef: α, N × K: float64 when the solve was refined or factored in float64, else in
            the dtype of the input kernel matrix.
        ridge: μ as requested.
        jitter: extra diagonal added to make the solve succeed (0.0 when none was).
        dtype: the dtype the accepted factorization ran in (``"float32"`` or ``"float64"``).
        factor: the lower Cholesky factor of K + (μ + jitter)I, N × N.
        residual: ‖Y − (K + (μ + jitter)I)α‖_F / ‖Y‖_F of the returned α, in float64.
        refinements: refinement steps applied to the accepted attempt (0: none needed).
        fitted_values: K α at the training points, N × K, float64 (from the residual;
            :meth:`fitted` gives them in the dtype of ``coef``).
    """

    coef: torch.Tensor
    ridge: float
    jitter: float
    dtype: str
    factor: torch.Tensor | None
    residual: float = 0.0
    refinements: int = 0
    fitted_values: torch.Tensor | None = None

    def fitted(self) -> torch.Tensor:
        """K α, the predictions at the training points, N × K in the dtype of ``coef`` (from
        the float64 residual: no K needed)."""
        if self.fitted_values is None:
            raise ValueError("the fitted values were discarded")
        return self.fitted_values.to(self.coef.dtype)


def _cholesky(A: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, int]:
    """(L, info): the lower Cholesky factor of A (its lower triangle is read), info ≠ 0 on
    failure. On the CPU LAPACK's ``potrf`` through SciPy (0.62 s against torch's 0.84 s at
    N = 5000, float32, one thread), in A's memory if ``overwrite``; elsewhere
    :func:`torch.linalg.cholesky_ex`."""
    if A.device.type != "cpu":
        L, info = torch.linalg.cholesky_ex(A)
        return L, int(info)
    from scipy.linalg import lapack

    potrf = lapack.spotrf if A.dtype == torch.float32 else lapack.dpotrf
    # A.T is a Fortran view of Aᵀ, whose upper triangle is A's lower one: Uᵀ U = A, L = Uᵀ
    U, info = potrf(A.numpy().T, lower=0, clean=1, overwrite_a=int(overwrite))
    return torch.from_numpy(U).T, int(info)


def _cho_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ)⁻¹ B for the factor of :func:`_cholesky` (LAPACK ``potrs`` on the CPU: 3× faster
    than :func:`torch.cholesky_solve` with 10 right-hand sides)."""
    if L.device.type != "cpu":
        return torch.cholesky_solve(B, L)
    from scipy.linalg import lapack

    potrs = lapack.spotrs if L.dtype == torch.float32 else lapack.dpotrs
    # L.T is the Fortran upper factor U (a view): solve Uᵀ U x = B
    x, info = potrs(L.numpy().T, B.to(L.dtype).numpy(), lower=0)
    if info != 0:  # pragma: no cover - only for invalid arguments
        raise ValueError(f"LAPACK potrs failed (info {info})")
    return torch.from_numpy(x)


def _residual(Kmat: torch.Tensor, shift: float, a: torch.Tensor,
              Y: torch.Tensor) -> torch.Tensor:
    """Y − (K + shift·I) a in float64, K converted to float64 a block of rows at a time."""
    N = Kmat.shape[0]
    # blocks of ~2 MiB stay in cache: 3× faster than 64 MiB ones at N = 5000
    rows = max(1, (1 << 18) // max(N, 1))
    R = Y.to(torch.float64, copy=True)
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        R[i0:i1] -= Kmat[i0:i1].to(torch.float64) @ a
    R.sub_(a, alpha=shift)
    return R


def _backward_error(Kmat: torch.Tensor, shift: float, a: torch.Tensor, R: torch.Tensor,
                    Y: torch.Tensor) -> float:
    """‖R‖_F / (‖K + shift·I‖_F ‖a‖_F + ‖Y‖_F), the normwise backward error of a."""
    norm_k = float(torch.linalg.matrix_norm(Kmat))
    norm_a = float(torch.linalg.matrix_norm(a))
    denom = (norm_k + abs(shift) * Kmat.shape[0] ** 0.5) * norm_a + float(Y.norm())
    return float(R.norm()) / denom if denom > 0 else float("inf")


def _result(attempt: tuple, kernel_dtype: torch.dtype, ridge: float, Y64: torch.Tensor,
            squeeze: bool) -> "KernelRidgeResult":
    dtype, jitter, shift, a, R, res, steps, Lf = attempt
    coef = a if steps > 0 or dtype == torch.float64 else a.to(kernel_dtype)
    fitted = (Y64 - R).sub_(a, alpha=shift)  # K α = Y − r − shift·α
    return KernelRidgeResult(
        coef=coef[:, 0] if squeeze else coef,
        ridge=ridge,
        jitter=float(jitter),
        dtype=str(dtype).replace("torch.", ""),
        factor=Lf,
        residual=res,
        refinements=steps,
        fitted_values=fitted[:, 0] if squeeze else fitted,
    )


def kernel_ridge(Kmat: torch.Tensor, Y: torch.Tensor, ridge: float = 0.0, *,
                 max_tries: int = 8, fallback_float64: bool = True,
                 tol: float = RESIDUAL_TOL, check_finite: bool = True) -> KernelRidgeResult:
    """Solve (K + μI) α = Y by Cholesky with a residual check, refinement and retries.

    Parameters
    ----------
    Kmat
        symmetric positive (semi-)definite kernel matrix, N × N.
    Y
        targets, N × K (or N, treated as N × 1).
    ridge
        μ ≥ 0; 0 is ridgeless interpolation (the paper).
    max_tries
        number of jitter levels tried after the unjittered attempts:
        ε·mean(diag K)·10^t for t = 0..max_tries−1, with ε the machine epsilon of the
        dtype in use.
    fallback_float64
        when a float32 attempt fails (no factor, or a residual that refinement cannot bring
        to ``tol``), retry in float64 before adding any jitter.
    tol
        the largest relative residual accepted (module docstring).
    check_finite
        check K for NaN and inf first (one pass over N²; a caller that built K from finite
        inputs may skip it: a non-finite K fails every attempt anyway).

    Raises
    ------
    ValueError
        on non-square / mismatched / non-finite input, or if every try failed.
    """
    if Kmat.ndim != 2 or Kmat.shape[0] != Kmat.shape[1]:
        raise ValueError(f"Kmat must be a square N × N matrix; got shape {tuple(Kmat.shape)}")
    squeeze = Y.ndim == 1
    Y2 = Y[:, None] if squeeze else Y
    if Y2.ndim != 2 or Y2.shape[0] != Kmat.shape[0]:
        raise ValueError(
            f"Y must have one row per row of Kmat ({Kmat.shape[0]}); got shape {tuple(Y.shape)}"
        )
    check_positive(ridge, "ridge", allow_zero=True)
    check_positive(tol, "tol")
    if check_finite and not bool(torch.isfinite(Kmat).all()):
        raise ValueError("Kmat contains NaN or inf")
    if not bool(torch.isfinite(Y2).all()):
        raise ValueError("Y contains NaN or inf")

    scale = float(Kmat.diagonal().abs().mean()) or 1.0
    attempts: list[tuple[torch.dtype, float]] = [(Kmat.dtype, 0.0)]
    if fallback_float64 and Kmat.dtype == torch.float32:
        attempts.append((torch.float64, 0.0))
    work = attempts[-1][0]
    eps = torch.finfo(work).eps
    attempts += [(work, eps * scale * 10.0**t) for t in range(max_tries)]
    Y64 = Y2.to(torch.float64)
    y_norm = float(Y64.norm()) or 1.0
    N, eps64 = Kmat.shape[0], torch.finfo(torch.float64).eps
    best = stable = None

    for dtype, jitter in attempts:
        Lf = None  # the previous attempt's factor is freed before the next is made
        shift = float(ridge) + jitter
        if dtype == Kmat.dtype and not shift:
            A = Kmat  # factored out of place: Kmat stays intact for the residual and retries
        else:
            A = Kmat.to(dtype, copy=True)
            A.diagonal().add_(shift)
        Lf, info = _cholesky(A, overwrite=A is not Kmat)
        del A
        if info != 0:
            continue
        a = _cho_solve(Lf, Y2.to(dtype)).to(torch.float64)
        if not bool(torch.isfinite(a).all()):
            continue
        R = _residual(Kmat, shift, a, Y64)
        res = float(R.norm()) / y_norm
        steps = 0
        while res > tol and steps < MAX_REFINEMENTS:
            a_new = a + _cho_solve(Lf, R.to(dtype)).to(torch.float64)
            R_new = _residual(Kmat, shift, a_new, Y64)
            res_new = float(R_new.norm()) / y_norm
            if not res_new <= 0.5 * res:  # not converging (κ·ε ≳ 1/2): the next attempt
                break
            a, R, res, steps = a_new, R_new, res_new, steps + 1
        if best is None or res < best[0]:
            best = (res, jitter)
        result = (dtype, jitter, shift, a, R, res, steps, Lf)
        if res <= tol:
            return _result(result, Kmat.dtype, float(ridge), Y64, squeeze)
        if dtype == torch.float64 and _backward_error(Kmat, shift, a, R, Y64) <= N * eps64:
            if stable is None or res < stable[5]:
                stable = result  # as good as float64 allows: kept unless a later try is better
    if stable is not None:
        return _result(stable, Kmat.dtype, float(ridge), Y64, squeeze)
    if best is None:
        raise ValueError(
            f"Cholesky factorization of the {N} × {N} kernel matrix failed with ridge {ridge} "
            f"and jitter up to {attempts[-1][1]:.3g} (in float64); the matrix is far from "
            "positive definite (duplicate points? NaN upstream?) — use a positive ridge")
    raise ValueError(
        f"the {N} × {N} kernel system cannot be solved to a relative residual of {tol:.3g} "
        f"with ridge {ridge}: the best attempt (jitter {best[1]:.3g}) left {best[0]:.3g}; the "
        "matrix is singular to working precision (identical points with different targets?) "
        "— use a positive ridge")
