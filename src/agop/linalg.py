"""Symmetric matrix functions in float64."""

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
    elif p == 0:
        powered = torch.ones_like(evals)
    else:
        powered = evals**p
    return (evecs * powered) @ evecs.T


def _eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition; on the CPU LAPACK's divide-and-conquer ``syevd`` through
    SciPy, about 1.5× faster than ``torch.linalg.eigh`` at D = 3072 on 2 cores."""
    if A.device.type != "cpu":
        return torch.linalg.eigh(A)
    from scipy.linalg import eigh

    evals, evecs = eigh(A.numpy(), driver="evd", check_finite=False)
    return torch.from_numpy(evals), torch.from_numpy(evecs)


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
