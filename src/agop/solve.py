"""Kernel ridge regression by Cholesky: α = (K + μI)⁻¹ Y (Algorithm 1, step 2).

μ = 0 is the paper's ridgeless interpolation. A factorization that fails (the matrix is not
numerically positive definite, e.g. duplicate points or strong collapse in float32) is retried
— first in float64 if the input was float32, then with a growing diagonal jitter — and the
jitter and dtype actually used are returned, never applied silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agop._validate import check_positive


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
        coef: α, N × K (dtype of the input kernel matrix).
        ridge: μ as requested.
        jitter: extra diagonal added to make the factorization succeed (0.0 when none was).
        dtype: the dtype the factorization succeeded in (``"float32"`` or ``"float64"``).
        factor: the lower Cholesky factor of K + (μ + jitter)I, N × N (for fitted values).
    """

    coef: torch.Tensor
    ridge: float
    jitter: float
    dtype: str
    factor: torch.Tensor | None

    def fitted(self) -> torch.Tensor:
        """K α, the predictions at the training points, N × K (from the factor: no K needed)."""
        Lf = self.factor
        if Lf is None:
            raise ValueError("the Cholesky factor was discarded; fitted values are unavailable")
        a = self.coef.to(Lf.dtype)
        return (Lf @ (Lf.T @ a) - (self.ridge + self.jitter) * a).to(self.coef.dtype)


def kernel_ridge(Kmat: torch.Tensor, Y: torch.Tensor, ridge: float = 0.0, *,
                 max_tries: int = 8, fallback_float64: bool = True) -> KernelRidgeResult:
    """Solve (K + μI) α = Y by Cholesky, retrying with a jitter if the factorization fails.

    Parameters
    ----------
    Kmat
        symmetric positive (semi-)definite kernel matrix, N × N.
    Y
        targets, N × K (or N, treated as N × 1).
    ridge
        μ ≥ 0; 0 is ridgeless interpolation (the paper).
    max_tries
        number of jitter levels tried: ε·mean(diag K)·10^t for t = 0..max_tries−1,
        with ε the machine epsilon of the dtype in use.
    fallback_float64
        when a float32 factorization fails, retry in float64 before adding
        any jitter.

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
    if not bool(torch.isfinite(Kmat).all()):
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

    for dtype, jitter in attempts:
        shift = float(ridge) + jitter
        if dtype == Kmat.dtype and not shift:
            A = Kmat  # factored out of place: Kmat stays intact for the retries
        else:
            A = Kmat.to(dtype, copy=True)
            A.diagonal().add_(shift)
        Lf, info = torch.linalg.cholesky_ex(A)
        del A
        if int(info) == 0:
            coef = torch.cholesky_solve(Y2.to(dtype), Lf).to(Kmat.dtype)
            if not bool(torch.isfinite(coef).all()):
                continue
            return KernelRidgeResult(
                coef=coef[:, 0] if squeeze else coef,
                ridge=float(ridge),
                jitter=float(jitter),
                dtype=str(dtype).replace("torch.", ""),
                factor=Lf,
            )
    raise ValueError(
        f"Cholesky factorization of the {Kmat.shape[0]} × {Kmat.shape[0]} kernel matrix failed "
        f"with ridge {ridge} and jitter up to {attempts[-1][1]:.3g} (in float64); the matrix is "
        "far from positive definite (duplicate points? NaN upstream?) — use a positive ridge"
    )
