"""Radial kernels for Deep RFM: Laplace (the paper's) and Gaussian, with exact distances.

A kernel here is a function of the Euclidean distance d = ‖x − z‖₂, k(x, z) = φ(d). Calling a
kernel on ``(X, Z)`` (N × D and M × D torch tensors) gives the N × M kernel matrix. Everything
the AGOP needs is exposed as two element-wise maps of a distance matrix:

- :meth:`from_distances`: k = φ(d);
- :meth:`gradient_weights`: w such that ∇ₓ k(x, z) = −w · (x − z), i.e. w = −φ'(d)/d.

Distances use ‖x‖² + ‖z‖² − 2xᵀz (one GEMM), clamped at 0; when Z is X the self-distances are
set to exactly 0 by index, so k(x, x) = 1 exactly and no cancellation noise (about 1e-3 in
float32 for unit vectors) survives on the diagonal.
"""

from __future__ import annotations

import torch

from agop._validate import check_matrix, check_positive


def pairwise_distances(X: torch.Tensor, Z: torch.Tensor | None = None, *,
                       squared: bool = False, diagonal_offset: int | None = None,
                       groups: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Euclidean distances between the rows of ``X`` (N × D) and ``Z`` (M × D): N × M.

    ``Z=None`` means Z is X; then entries (i, i) are set to exactly 0. ``diagonal_offset=o``
    says that row r of ``X`` is row ``o + r`` of ``Z`` (a chunk of the same matrix), so entries
    (r, o + r) are the self-distances and are set to 0 by index.

    ``groups``: index tensors partitioning the rows of Z (e.g. :func:`class_groups`). The
    distances to each group's rows are then computed about that group's mean,
    ‖x − z‖ = ‖(x − μ_g) − (z − μ_g)‖. The identity is exact, but ‖x‖² + ‖z‖² − 2xᵀz loses
    the digits of ‖x‖²: for unit rows at distance d its float32 error is about 1e-7/d²
    relative. As Deep RFM collapses the classes, same-class distances fall to 1e-4 and below;
    shifting by the class mean keeps the vectors at the scale of the within-class spread.
    """
    same = Z is None
    if same:
        Z = X
        diagonal_offset = 0
    if X.shape[-1] != Z.shape[-1]:
        raise ValueError(
            f"X and Z must have the same number of columns (features); got {tuple(X.shape)} "
            f"and {tuple(Z.shape)}"
        )
    if groups is not None:
        d2 = torch.empty((X.shape[0], Z.shape[0]), dtype=Z.dtype, device=Z.device)
        for idx in groups:
            Zg = Z[idx]
            mu = Zg.mean(dim=0)
            d2[:, idx] = _squared_distances(X - mu, Zg - mu, False)
    else:
        d2 = _squared_distances(X, Z, same)
    if diagonal_offset is not None:
        _zero_self(d2, diagonal_offset)
    return d2 if squared else d2.sqrt_()


def _squared_distances(X: torch.Tensor, Z: torch.Tensor, same: bool) -> torch.Tensor:
    xx = (X * X).sum(dim=1, keepdim=True)  # (N, 1)
    zz = xx.T if same else (Z * Z).sum(dim=1)[None, :]  # (1, M)
    return torch.addmm(xx + zz, X, Z.T, beta=1.0, alpha=-2.0).clamp_(min=0.0)


def class_groups(y: torch.Tensor, num_classes: int | None = None) -> list[torch.Tensor]:
    """Indices of the rows of each class (classes without rows are left out), for ``groups``."""
    K = int(y.max()) + 1 if num_classes is None else num_classes
    groups = [torch.nonzero(y == c)[:, 0] for c in range(K)]
    return [g for g in groups if g.numel()]


def _zero_self(mat: torch.Tensor, offset: int) -> None:
    """Set entries (r, offset + r) of ``mat`` to 0 in place (the self terms of a row chunk)."""
    n_rows, n_cols = mat.shape
    n = max(0, min(n_rows, n_cols - offset))
    if n:
        r = torch.arange(n, device=mat.device)
        mat[r, offset + r] = 0.0


class RadialKernel:
    """Base class: k(x, z) = φ(‖x − z‖₂) with bandwidth L > 0."""

    name = "radial"

    def __init__(self, bandwidth: float = 2.0):
        check_positive(bandwidth, "bandwidth")
        self.bandwidth = float(bandwidth)

    def __call__(self, X: torch.Tensor, Z: torch.Tensor | None = None, *,
                 groups: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Kernel matrix k(X, Z), N × M (``Z=None``: k(X, X) with an exact unit diagonal).

        ``groups``: compute distances about each group's mean (see :func:`pairwise_distances`).
        """
        check_matrix(X, "X", finite=False)
        if Z is not None:
            check_matrix(Z, "Z", finite=False)
        return self.from_distances(pairwise_distances(X, Z, groups=groups))

    def from_distances(self, dist: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def gradient_weights(self, kmat: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """w with ∇ₓ k(x, z) = −w (x − z), from the kernel values and distances (same shape)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bandwidth={self.bandwidth:g})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.bandwidth == other.bandwidth  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.bandwidth))


class LaplaceKernel(RadialKernel):
    """Laplace kernel k(x, z) = exp(−‖x − z‖₂ / L), the paper's kernel (Appendix C, L = 2).

    Gradient: ∇ₓ k(x, z) = −k(x, z)/(L‖x − z‖) · (x − z), undefined at x = z (the kernel has a
    cusp). :meth:`gradient_weights` returns 0 where the distance is exactly 0; the AGOP code
    additionally drops the self term of each training point by index.
    """

    name = "laplace"

    def from_distances(self, dist: torch.Tensor) -> torch.Tensor:
        return torch.exp(dist * (-1.0 / self.bandwidth))

    def gradient_weights(self, kmat: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        w = kmat / (dist * self.bandwidth)
        return w.masked_fill_(dist == 0, 0.0)


class GaussianKernel(RadialKernel):
    """Gaussian kernel k(x, z) = exp(−‖x − z‖₂² / (2L²)).

    Gradient: ∇ₓ k(x, z) = −k(x, z)/L² · (x − z), smooth everywhere.
    """

    name = "gaussian"

    def from_distances(self, dist: torch.Tensor) -> torch.Tensor:
        return torch.exp(dist.square() * (-0.5 / self.bandwidth**2))

    def gradient_weights(self, kmat: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        return kmat * (1.0 / self.bandwidth**2)


KERNELS = {"laplace": LaplaceKernel, "gaussian": GaussianKernel}


def get_kernel(kernel: str | RadialKernel, bandwidth: float = 2.0) -> RadialKernel:
    """``"laplace"`` / ``"gaussian"`` (with ``bandwidth``) or a kernel instance as is."""
    if isinstance(kernel, RadialKernel):
        return kernel
    try:
        return KERNELS[str(kernel).lower()](bandwidth)
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {sorted(KERNELS)}") from None
