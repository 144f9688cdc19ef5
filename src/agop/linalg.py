"""Symmetric matrix functions: powers in float64, and M^{1/2} in float32 where that is accurate."""

from __future__ import annotations

import torch

from agop._validate import check_finite


def psd_power(M: torch.Tensor, p: float, *, rtol: float | None = None) -> torch.Tensor:
    """M^p for a symmetric positive semi-definite M (D × D), by eigendecomposition in float64.

    M is symmetrized ((M + Mᵀ)/2) and its negative eigenvalues — round-off of a PSD matrix such
    as an AGOP — are clamped to 0 before the power is taken (Algorithm 1 uses p = 1/2). For
    p < 0 the power is taken on the eigenvalues above ``rtol`` · λ_max only (a pseudo-inverse
    power); ``rtol`` defaults to D · eps(float64).

    Returns a float64 tensor on M's device.
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square D × D matrix; got shape {tuple(M.shape)}")
    check_finite(M, "M")
    A = M.to(torch.float64)
    A = 0.5 * (A + A.T)
    evals, evecs = _eigh(A)
    evals = evals.clamp(min=0.0)
    if p < 0:
        if rtol is None:
            rtol = M.shape[0] * torch.finfo(torch.float64).eps
        keep = evals > rtol * evals.max().clamp(min=torch.finfo(torch.float64).tiny)
        powered = torch.where(keep, evals.clamp(min=torch.finfo(torch.float64).tiny) ** p,
                              torch.zeros_like(evals))
        return (evecs * powered) @ evecs.T
    if p == 0:
        return evecs @ evecs.T
    # M^p = (V Λ^{p/2})(V Λ^{p/2})ᵀ: a symmetric product, half the FLOPs of (V Λ^p) Vᵀ
    return symmetric_product(evecs * evals ** (0.5 * p))


#: :func:`psd_sqrt` uses a float32 eigendecomposition when its a-priori error bound
#: (:func:`sqrt_float32_bound`) is at most this. The bound is 4–11× the actual error on Deep RFM
#: AGOPs (MNIST, CIFAR-10 layer 1 at 5,000 points and MNIST layers 5–19 at 2,000: actual
#: 3e-4–1.2e-3, bound 2.5e-3–7.7e-3; docs/rfm.md), so this keeps the float32 error near 1e-3 —
#: the size of the error M^{1/2} already inherits from a float32 AGOP (1e-3 on CIFAR-10).
SQRT_FLOAT32_BOUND = 1e-2
#: ... and only for D at least this: below it the float64 decomposition takes under 0.2 s on a
#: CPU (D = 784: 0.10 s against 0.08 s in float32, for 6× the error), above it seconds
#: (D = 3072: 3.3 s against 1.6 s).
SQRT_FLOAT32_MIN_DIM = 1024


def sqrt_float32_bound(M: torch.Tensor) -> float:
    """A-priori relative Frobenius error bound of M^{1/2} from a float32 eigendecomposition.

    A backward-stable float32 ``syevd`` returns the exact decomposition of M + E with
    ‖E‖₂ ≲ ε₃₂‖M‖₂, and the square root is operator-Hölder: ‖(M + E)^{1/2} − M^{1/2}‖₂ ≤
    ‖E‖₂^{1/2}. With ‖·‖_F ≤ √D‖·‖₂ and ‖M^{1/2}‖_F² = tr M (M PSD):

        ‖δM^{1/2}‖_F / ‖M^{1/2}‖_F ≤ √(D ε₃₂ ‖M‖₂ / tr M).

    ‖M‖₂ is taken as 1.1 × the Rayleigh quotient after 30 power iterations from the all-ones
    vector, at most ‖M‖_F (O(D²) each, in float64, before any decomposition). inf for a zero
    or non-positive trace.
    """
    A = M.to(torch.float64)
    trace = float(A.diagonal().sum())
    if not trace > 0.0:
        return float("inf")
    v = torch.ones(A.shape[0], dtype=torch.float64, device=A.device)
    for _ in range(30):
        w = A @ v
        norm = float(w.norm())
        if not norm > 0.0:
            break
        v = w / norm
    top = min(1.1 * abs(float(v @ (A @ v))), float(torch.linalg.matrix_norm(A)))
    eps = torch.finfo(torch.float32).eps
    return (M.shape[0] * eps * top / trace) ** 0.5


def psd_sqrt(M: torch.Tensor, *, allow_float32: bool = False,
             info: dict | None = None) -> torch.Tensor:
    """M^{1/2} for a symmetric PSD M (D × D): :func:`psd_power` (M, 1/2), or from a float32
    eigendecomposition when ``allow_float32``, D ≥ ``SQRT_FLOAT32_MIN_DIM`` and
    :func:`sqrt_float32_bound` ≤ ``SQRT_FLOAT32_BOUND``.

    The float32 route is about 2× faster on a CPU (D = 3072: 1.6 s against 3.3 s on 2 cores)
    and is meant for a layer that computes in float32 anyway; M^{1/2} is assembled in float64
    either way. ``info`` (a dict) receives ``sqrt_precision`` (the dtype of the
    decomposition) and ``sqrt_bound``.

    Returns a float64 tensor on M's device.
    """
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"M must be a square D × D matrix; got shape {tuple(M.shape)}")
    check_finite(M, "M")
    info = {} if info is None else info
    bound = (sqrt_float32_bound(M) if allow_float32 and M.shape[0] >= SQRT_FLOAT32_MIN_DIM
             else float("inf"))
    info["sqrt_bound"] = bound
    if bound > SQRT_FLOAT32_BOUND:
        info["sqrt_precision"] = "float64"
        return psd_power(M, 0.5)
    info["sqrt_precision"] = "float32"
    A = M.to(torch.float32)
    evals, evecs = _eigh(0.5 * (A + A.T))
    # (V Λ^{1/4})(V Λ^{1/4})ᵀ in float32 (its rounding, ~1e-7, is far below the bound)
    return symmetric_product(evecs * evals.clamp(min=0.0) ** 0.25).to(torch.float64)


def _eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition in A's dtype; on the CPU LAPACK's divide-and-conquer
    ``syevd`` through SciPy, about 1.5× faster than ``torch.linalg.eigh`` at D = 3072 on 2
    cores."""
    if A.device.type != "cpu":
        return torch.linalg.eigh(A)
    from scipy.linalg import eigh

    evals, evecs = eigh(A.numpy(), driver="evd", check_finite=False)
    return torch.from_numpy(evals), torch.from_numpy(evecs)


def symmetric_product(W: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """α W Wᵀ (N × N from N × k), exactly symmetric, at about half the FLOPs of a product.

    On the CPU (float32/float64) BLAS ``syrk`` through SciPy, mirrored: 1.6–1.9× faster than
    :func:`gram_lower_blocks` at N = 5000 on this project's CPU (1 thread: 1.45–1.7 s against
    2.4–2.7 s, a full product 3.5 s); on other devices :func:`gram_lower_blocks`.
    """
    if W.device.type != "cpu" or W.dtype not in (torch.float32, torch.float64) or W.ndim != 2:
        out = gram_lower_blocks(W, max(2, min(16, W.shape[0] // 512)))
        return out if alpha == 1.0 else out.mul_(alpha)
    from scipy.linalg import blas

    syrk = blas.ssyrk if W.dtype == torch.float32 else blas.dsyrk
    a = W.detach().contiguous().numpy()
    # a.T is a Fortran view of Wᵀ: syrk(trans=1) gives (Wᵀ)ᵀWᵀ = W Wᵀ, lower triangle, Fortran
    # order; its transpose is a C-order view with W Wᵀ in the upper triangle, mirrored into
    # the lower one a block at a time (no N × N temporary)
    out = torch.from_numpy(syrk(alpha, a.T, trans=1, lower=1)).T
    N = out.shape[0]
    rows = max(1, min(N, (1 << 20) // max(N, 1)))
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        out[i0:i1, :i0] = out[:i0, i0:i1].T
        block = out[i0:i1, i0:i1]  # its strictly lower part is zero
        block.add_(torch.triu(block, diagonal=1).T)
    return out


def gram_lower_blocks(W: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """W Wᵀ (N × N) computing only the lower block triangle, then mirroring it.

    A symmetric rank-k update (BLAS syrk) done with GEMMs on ``blocks`` row blocks: it needs
    blocks·(blocks+1)/2 of the blocks² block products, about (1 + 1/blocks)/2 of the FLOPs of
    a general product, on any device torch supports.
    """
    N = W.shape[0]
    blocks = max(1, min(int(blocks), N))
    edges = [round(i * N / blocks) for i in range(blocks + 1)]
    out = torch.empty((N, N), dtype=W.dtype, device=W.device)
    for bi in range(blocks):
        i0, i1 = edges[bi], edges[bi + 1]
        out[i0:i1, :i1] = W[i0:i1] @ W[:i1].T  # the block row's lower part in one GEMM
    # mirror the strictly-upper part from the lower part
    for bi in range(blocks):
        i0, i1 = edges[bi], edges[bi + 1]
        out[i0:i1, i1:] = out[i1:, i0:i1].T
    return out
