"""The average gradient outer product (Section 3.3) of kernel machines and of torch models.

AGOP(f, X) = (1/n) Σᵢ Jᵢᵀ Jᵢ, with Jᵢ the K × D Jacobian of the K outputs of f at xᵢ (so the
AGOP is D × D). Algorithm 1 writes the sum without 1/n; the factor only rescales M, which the
next layer's normalization removes.

For a kernel machine f(x) = Σⱼ αⱼ k(x, cⱼ) with a radial kernel, ∇ₓk(x, c) = −w(x, c)(x − c)
(:meth:`agop.kernels.RadialKernel.gradient_weights`), so for output k and evaluation points P
(n × D) the n × D matrix of gradients is

    G_k = W diag(α_k) C − diag(W α_k) P,    W_ij = w(p_i, c_j),

and M = (1/n) Σ_k G_kᵀ G_k. Two exact ways to evaluate it (chosen by :func:`agop_cost`):

- ``"direct"``: G_k chunk by chunk of rows of P; about 2nNKD + 2nKD² FLOPs. With ``groups``
  (the classes) both the distances and the gradients are assembled in per-class coordinates,
  so float32 keeps its accuracy however far the classes have collapsed.
- ``"gram"`` (P = C only, W symmetric): M = (1/n) Cᵀ Q C with
  Q = (W²)∘(AAᵀ) − W∘(ABᵀ + BAᵀ) + diag(Σ_k B_k²), A = α, B = WA; about N³ (W² computed as a
  symmetric product) + 2N²D + 2ND² FLOPs — far cheaper when N < K·D. A quadratic form whose
  terms cancel: its float32 result is kept only when a rounding-error bound says it is
  accurate (:func:`_agop_gram`), else it is recomputed in float64 (or by the direct form).

Derivation of the gram form: G_k = P_k C with P_k = W diag(a_k) − diag(b_k), so
Σ_k G_kᵀG_k = Cᵀ (Σ_k P_kᵀP_k) C and, W being symmetric,
Σ_k P_kᵀP_k = Σ_k diag(a_k)W²diag(a_k) − diag(a_k)W diag(b_k) − diag(b_k)W diag(a_k) + diag(b_k²),
whose four sums are the four terms of Q (diag(u) S diag(v) = S ∘ uvᵀ).

At a training point the Laplace kernel's term j = i is not differentiable; it is dropped by
index (its weight set to 0), never by a distance threshold.
"""

from __future__ import annotations

from typing import Callable

import torch

from agop.backend import float64_slowdown, plan_rows
from agop.choices import AGOP_METHODS
from agop.kernels import RadialKernel, _zero_self, pairwise_distances
from agop.linalg import symmetric_product

METHODS = AGOP_METHODS


def agop_cost(n: int, N: int, K: int, D: int, method: str, *, float64_slowdown: float = 1.0) -> float:
    """Approximate cost of :func:`kernel_agop` in compute-dtype FLOPs (n points, N centers,
    K outputs, D features).

    direct: distances 2nND, Wα 2nNK, the K gradient blocks 2nNKD, their outer products 2nKD².
    gram:   W² as a symmetric product ≈ N³, distances 2N²D, QC 2N²D, Cᵀ(QC) 2ND², the
            rank-K products AAᵀ, ABᵀ, BAᵀ and WA ≈ 8N²K; multiplied by ``float64_slowdown``
            (:func:`agop.backend.float64_slowdown`) when it must run in float64.
    """
    if method == "direct":
        return 2.0 * n * N * (D + K + K * D) + 2.0 * n * K * D * D
    if method == "gram":
        flops = float(N) ** 3 + 4.0 * N * N * D + 8.0 * N * N * K + 2.0 * N * D * D
        return flops * float64_slowdown
    raise ValueError(f"method must be one of {METHODS[1:]}; got {method!r}")


def choose_method(n: int, N: int, K: int, D: int, same_points: bool, *,
                  float64_slowdown: float = 1.0) -> str:
    """The cheaper exact method by :func:`agop_cost` (``"gram"`` needs points = centers)."""
    if not same_points:
        return "direct"
    return min(("direct", "gram"),
               key=lambda m: agop_cost(n, N, K, D, m, float64_slowdown=float64_slowdown))


def resolve_method(method: str, n: int, N: int, K: int, D: int, same_points: bool) -> str:
    """The method :func:`kernel_agop` uses: ``method`` itself, or the cheaper one for ``"auto"``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method != "auto":
        return method
    # the gram form is costed at the input's precision: in float32 it usually keeps it
    # (:func:`_agop_gram`); a float64 redo is the exception, for collapsed data
    return choose_method(n, N, K, D, same_points)


def _weights(kernel: RadialKernel, P: torch.Tensor, C: torch.Tensor,
             self_offset: int | None, groups: list[torch.Tensor] | None) -> torch.Tensor:
    """W_ij = w(p_i, c_j) with the self terms (i, self_offset + i) set to 0 by index."""
    dist = pairwise_distances(P, C, diagonal_offset=self_offset, groups=groups)
    W = kernel.gradient_weights(kernel.from_distances(dist), dist)
    if self_offset is not None:
        _zero_self(W, self_offset)
    return W


def _check(centers: torch.Tensor, coef: torch.Tensor, points: torch.Tensor | None) -> torch.Tensor:
    if centers.ndim != 2:
        raise ValueError(f"centers must be N × D; got shape {tuple(centers.shape)}")
    if coef.ndim == 1:
        coef = coef[:, None]
    if coef.ndim != 2 or coef.shape[0] != centers.shape[0]:
        raise ValueError(
            f"coef must be N × K with one row per center ({centers.shape[0]}); got shape "
            f"{tuple(coef.shape)}"
        )
    if points is not None and (points.ndim != 2 or points.shape[1] != centers.shape[1]):
        raise ValueError(
            f"points must be n × D with D = {centers.shape[1]}; got shape {tuple(points.shape)}"
        )
    for name, t in (("centers", centers), ("coef", coef), ("points", points)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
    return coef


def kernel_agop(kernel: RadialKernel, centers: torch.Tensor, coef: torch.Tensor,
                points: torch.Tensor | None = None, *, method: str = "auto",
                chunk_rows: int | None = None,
                groups: list[torch.Tensor] | None = None,
                info: dict | None = None,
                distances: torch.Tensor | None = None,
                try_float32: bool = True) -> torch.Tensor:
    """AGOP of f(x) = Σⱼ coef_j k(x, c_j) over ``points`` (default: the centers, self terms dropped).

    Parameters
    ----------
    kernel
        a radial kernel (:class:`agop.kernels.LaplaceKernel` / ``GaussianKernel``).
    centers
        C, N × D.
    coef
        α, N × K (or N).
    points
        P, n × D; ``None`` means P = C, with the non-differentiable term j = i of each
        point excluded by index. Passing the centers tensor itself also counts as P = C.
    method
        ``"auto"`` (cheaper by :func:`agop_cost`), ``"direct"`` or ``"gram"``.
    chunk_rows
        rows of P per chunk (default: planned from free memory).
    groups
        index tensors partitioning the centers (e.g. by class): distances to each
        group are computed about its mean, which keeps float32 weights accurate once the
        groups have collapsed (:func:`agop.kernels.pairwise_distances`).
    info
        a dict to fill with what was done: ``method``, ``precision`` (the dtype the
        products ran in) and, for the gram form, ``error_estimate`` (:func:`_agop_gram`).
    distances
        the N × N distances between the centers (self-distances 0), e.g. kept from
        building the kernel matrix; the gram form then does not recompute them.
    try_float32
        with float32 inputs, try the gram form in float32 first (default). False
        goes straight to its float64 / direct fallback, which gives the same numbers as a
        rejected float32 try (a caller that saw a fallback can skip the wasted try).

    Returns
    -------
    M, D × D, (1/n) Σᵢ Σ_k ∇f_k(pᵢ) ∇f_k(pᵢ)ᵀ, in the dtype and on the device of ``centers``.
    """
    coef = _check(centers, coef, points)
    same = points is None or points is centers
    P = centers if same else points
    coef = coef.to(centers.dtype)
    n, (N, D), K = P.shape[0], centers.shape, coef.shape[1]
    method = resolve_method(method, n, N, K, D, same)
    if groups is not None:
        _group_ids(groups, N, centers.device)
    if method == "gram" and not same:
        raise ValueError("method='gram' needs points = centers (W must be symmetric)")
    info = {} if info is None else info
    info.update(method=method, precision=str(centers.dtype).replace("torch.", ""))
    if distances is not None and tuple(distances.shape) != (N, N):
        raise ValueError(f"distances must be N × N = {N} × {N}; got {tuple(distances.shape)}")
    if method == "gram":
        M = _agop_gram(kernel, centers, coef, chunk_rows, groups, info, distances, try_float32)
    else:
        M = _agop_direct(kernel, P, centers, coef, same, chunk_rows, groups)
    M /= n
    return 0.5 * (M + M.T)


def _group_ids(groups: list[torch.Tensor], N: int, device: torch.device) -> torch.Tensor:
    """The group of each of the N centers; raises unless ``groups`` partition 0..N−1."""
    gid = torch.full((N,), -1, dtype=torch.long, device=device)
    for h, idx in enumerate(groups):
        gid[idx] = h
    if sum(int(idx.numel()) for idx in groups) != N or bool((gid < 0).any()):
        raise ValueError(f"groups must partition the {N} centers (each in exactly one group)")
    return gid


class _Frame:
    """The centers in per-group coordinates, C = X̃ + S·Mu (S the group indicator, Mu the means).

    Once the groups (classes) have collapsed, X̃ = C − μ_{g(i)} is at the scale of the
    within-group spread, so gradients assembled from X̃ do not cancel; ``groups=None`` is one
    group (a global shift).
    """

    def __init__(self, C: torch.Tensor, groups: list[torch.Tensor] | None):
        N = C.shape[0]
        self.groups = groups if groups is not None else [torch.arange(N, device=C.device)]
        self.gid = _group_ids(self.groups, N, C.device)
        self.means = torch.stack([C[idx].mean(dim=0) for idx in self.groups])  # (G, D)
        self.shifted = C - self.means[self.gid]  # (N, D)

    def cross(self, W: torch.Tensor, A: torch.Tensor, rows: slice) -> torch.Tensor | None:
        """F (b × G × K) with G_k = P_k X̃ + F_k Mu for the rows ``rows`` of the centers.

        F[i, h] = Σ_{j∈h} W_ij a_j for h ≠ g(i), and F[i, g(i)] = −Σ_{h≠g(i)} F[i, h]: the
        same-group sum, huge once the group has collapsed (W_ij ~ 1/‖x_i − x_j‖), is never
        formed. None for a single group (F = 0).
        """
        if len(self.groups) == 1:
            return None
        F = torch.stack([W[:, idx] @ A[idx] for idx in self.groups], dim=1)  # (b, G, K)
        r = torch.arange(F.shape[0], device=F.device)
        own = self.gid[rows]
        F[r, own] = 0.0
        F[r, own] = -F.sum(dim=1)
        return F


#: Rows of points per chunk of the direct form (fewer only when memory is short).
DIRECT_CHUNK_ROWS = 1024


def _agop_direct(kernel: RadialKernel, P: torch.Tensor, C: torch.Tensor, A: torch.Tensor,
                 same: bool, chunk_rows: int | None,
                 groups: list[torch.Tensor] | None) -> torch.Tensor:
    n, D = P.shape
    N, K = A.shape
    item = C.element_size()
    G = 1 if groups is None else len(groups)
    if chunk_rows is None:
        # per row: distances/kernel/weights (≈3N), K gradient rows (K·D), F (G·K);
        # fixed: the shifted centers and one scaled copy of them, and M. At most
        # DIRECT_CHUNK_ROWS, so that M is summed in the same order (to the same bits) whatever
        # memory is free, e.g. when a run is resumed on a busier machine.
        chunk_rows = min(DIRECT_CHUNK_ROWS,
                         plan_rows((3 * N + K * D + D + G * K) * item, n, C.device,
                                   fixed_bytes=(2 * N * D + D * D) * item))
    frame = _Frame(C, groups) if same else None
    X = frame.shifted if same else C  # positions the gradients are assembled from
    M = torch.zeros((D, D), dtype=C.dtype, device=C.device)
    for i0 in range(0, n, chunk_rows):
        i1 = min(n, i0 + chunk_rows)
        W = _weights(kernel, P[i0:i1], C, i0 if same else None, groups)  # (b, N)
        B = W @ A  # (b, K)
        Xi = X[i0:i1] if same else P[i0:i1]
        F = frame.cross(W, A, slice(i0, i1)) if same else None
        Gk = torch.empty((K, i1 - i0, D), dtype=C.dtype, device=C.device)
        for k in range(K):
            # ∇f_k(p_i) = −Σ_j W_ij a_jk (p_i − c_j), with c_j = x̃_j + μ_{g(j)}
            torch.mm(W, A[:, k:k + 1] * X, out=Gk[k])
            Gk[k].addcmul_(B[:, k:k + 1], Xi, value=-1.0)
            if F is not None:
                Gk[k].addmm_(F[:, :, k], frame.means)
        Gf = Gk.reshape(-1, D)
        M.addmm_(Gf.T, Gf)
        del W, Gk, Gf
    return M


#: The gram form's float32 result is kept when its estimated rounding error is at most this
#: fraction of ‖M‖_F. The estimate (:func:`_gram_form`) is 0.5–0.7× the actual error on MNIST
#: and CIFAR-10 Deep RFM layers 1–12 (and far larger than this threshold wherever it is off by
#: more), so this keeps the AGOP's own rounding near 1e-5 relative.
GRAM_TOLERANCE = 5e-6


def _agop_gram(kernel: RadialKernel, C: torch.Tensor, A: torch.Tensor,
               chunk_rows: int | None, groups: list[torch.Tensor] | None,
               info: dict, distances: torch.Tensor | None = None,
               try_float32: bool = True) -> torch.Tensor:
    """M = CᵀQC (module docstring), in float32 when that is accurate, else in float64.

    The quadratic form cancels: its terms grow like (‖c‖/‖∇f‖)², and like 1/d² for same-class
    distances d once classes collapse, while M stays O(1). :func:`_gram_form` estimates its
    rounding error; above ``GRAM_TOLERANCE``·‖M‖_F the AGOP is recomputed — in float64, or by
    the direct form where that is cheaper on this device. ``info["error_estimate"]`` records
    the float32 estimate relative to ‖M‖_F.
    """
    if C.dtype == torch.float64:
        return _gram_form(_weight_matrix(kernel, C, groups, chunk_rows, distances), C, A,
                          chunk_rows)[0]
    if try_float32:
        W = _weight_matrix(kernel, C, groups, chunk_rows, distances)
        M, err = _gram_form(W, C, A, chunk_rows, estimate=True)
        del W
        info["error_estimate"] = err / max(float(M.norm()), torch.finfo(M.dtype).tiny)
        if info["error_estimate"] <= GRAM_TOLERANCE:
            return M
        del M
    info["fallback"] = True
    N, D = C.shape
    K = A.shape[1]
    if agop_cost(N, N, K, D, "direct") < agop_cost(N, N, K, D, "gram",
                                                     float64_slowdown=float64_slowdown(C.device)):
        info.update(method="direct")
        return _agop_direct(kernel, C, C, A, True, None, groups)
    info.update(precision="float64")
    C64, A64 = C.to(torch.float64), A.to(torch.float64)
    M = _gram_form(_weight_matrix(kernel, C64, groups, chunk_rows), C64, A64, chunk_rows)[0]
    return M.to(C.dtype)


def _weight_matrix(kernel: RadialKernel, C: torch.Tensor, groups: list[torch.Tensor] | None,
                   chunk_rows: int | None, distances: torch.Tensor | None = None) -> torch.Tensor:
    """W (N × N) of the centers, built in row chunks, self terms 0 (from ``distances`` if given)."""
    N = C.shape[0]
    item = C.element_size()
    if chunk_rows is None:
        chunk_rows = plan_rows(3 * N * item, N, C.device, fixed_bytes=3 * N * N * item)
    W = torch.empty((N, N), dtype=C.dtype, device=C.device)
    for i0 in range(0, N, chunk_rows):
        i1 = min(N, i0 + chunk_rows)
        if distances is None:
            W[i0:i1] = _weights(kernel, C[i0:i1], C, i0, groups)
        else:
            d = distances[i0:i1].to(C.dtype)
            W[i0:i1] = kernel.gradient_weights(kernel.from_distances(d), d)
            _zero_self(W[i0:i1], i0)
    return W


def _gram_form(W: torch.Tensor, C: torch.Tensor, A: torch.Tensor, chunk_rows: int | None, *,
               estimate: bool = False) -> tuple[torch.Tensor, float | None]:
    """(Cᵀ Q C, its estimated rounding error) in W's dtype; C is centered first.

    The estimate is ε·‖T ∘ ccᵀ‖_F with T = W²∘|A||A|ᵀ + W∘(|A|B̂ᵀ + B̂|A|ᵀ) + diag(Σ_k B̂_k²),
    B̂ = |B| + √((W∘W)(A∘A)) (B = WA cancels too; its rounding adds like a random walk), the
    entrywise magnitude of Q's terms, and c the norms of the centered rows: each entry of Q is
    rounded relative to T, and those errors add like a random walk in CᵀQC. None unless
    ``estimate``.
    """
    N = C.shape[0]
    C, A = C.to(W.dtype), A.to(W.dtype)
    rows = chunk_rows or plan_rows(4 * N * W.element_size(), N, W.device,
                                   fixed_bytes=2 * N * N * W.element_size())
    C = C - C.mean(dim=0)  # Q1 = 0, so centering changes nothing but shrinks the terms
    c = C.norm(dim=1)
    # W is symmetric up to rounding (row chunks round differently); W Wᵀ below stands for
    # WᵀW, which differs from it by rounding only.
    B = W @ A  # (N, K)
    Aa = A.abs()
    Ba = None
    if estimate:  # |B| plus the random-walk size of B = WA's own rounding, √((W∘W)(A∘A))
        Ba = B.abs()
        A2 = A * A
        for i0 in range(0, N, rows):
            Wi = W[i0:i0 + rows]
            Ba[i0:i0 + rows] += ((Wi * Wi) @ A2).sqrt_()
    Q = symmetric_product(W)  # W² = W Wᵀ
    AB, BA = torch.cat([A, B], dim=1), torch.cat([B, A], dim=1)  # [A B][B A]ᵀ = ABᵀ + BAᵀ
    if estimate:
        AaBa, BaAa = torch.cat([Aa, Ba], dim=1), torch.cat([Ba, Aa], dim=1)
    sumsq = 0.0
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        Qi, Wi = Q[i0:i1], W[i0:i1]
        if estimate:
            T = torch.mm(AaBa[i0:i1], BaAa.T).mul_(Wi).addcmul_(Qi, Aa[i0:i1] @ Aa.T)
            T.diagonal(offset=i0).add_((Ba[i0:i1] * Ba[i0:i1]).sum(dim=1))
            T.mul_(c[i0:i1, None]).mul_(c[None, :])
            sumsq += float(torch.linalg.vector_norm(T)) ** 2
            del T
        Qi.mul_(A[i0:i1] @ A.T)
        Qi.sub_(torch.mm(AB[i0:i1], BA.T).mul_(Wi))
    Q.diagonal().add_((B * B).sum(dim=1))
    M = C.T @ (Q @ C)
    return M, (torch.finfo(W.dtype).eps * sumsq**0.5 if estimate else None)


def model_agop(fn: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, *,
               batch_size: int | None = None) -> torch.Tensor:
    """AGOP of any differentiable torch callable: (1/N) Σᵢ Jᵢᵀ Jᵢ by autograd.

    The Jacobians are computed in X's dtype (pass float64 X for a float64 reference); their
    outer products are accumulated in float64.

    Parameters
    ----------
    fn
        maps a batch B × D (or B × d₁ × …) to outputs B × K (or B); each sample's outputs
        must depend on that sample only (no batch-coupling layers such as BatchNorm in
        training mode).
    X
        inputs, N × D (or N × d₁ × …); Jacobians are taken w.r.t. the flattened input.
    batch_size
        samples per vmap'd Jacobian batch (default: planned from free memory).

    Returns
    -------
    D × D float64 tensor on X's device, D = number of input features per sample.
    """
    if X.ndim < 2 or X.shape[0] < 1:
        raise ValueError(f"X must have a leading sample dimension N ≥ 1; got shape {tuple(X.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or inf")
    N = X.shape[0]
    D = X[0].numel()

    def single(x: torch.Tensor) -> torch.Tensor:
        return fn(x[None]).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(single))
    if batch_size is None:
        with torch.no_grad():
            K = single(X[0]).numel()
        batch_size = plan_rows(8 * K * D * X.element_size(), N, X.device, fraction=0.25)
    M = torch.zeros((D, D), dtype=torch.float64, device=X.device)
    for i0 in range(0, N, batch_size):
        J = jac(X[i0:i0 + batch_size]).detach().reshape(-1, D).to(torch.float64)  # (B·K, D)
        M.addmm_(J.T, J)
    return M / N
