"""Deep Recursive Feature Machine (Algorithm 1): layer primitives and the estimator.

One layer l (rows are samples, so M^{1/2} X in the paper's column convention is X M^{1/2} here):

1. normalize every sample to unit norm;
2. α_l = (k(X_l, X_l) + μI)⁻¹ Y  (Laplace kernel, μ = 0: ridgeless);
3. M_l = AGOP of f_l(x) = Σⱼ α_{l,j} k(x, x_j) over the training points (self terms dropped);
4. X_{l+1} = σ(X_l M_l^{1/2} W_lᵀ), W_l ∈ R^{width × D} random.

After L layers the features are normalized and solved once more (layer L + 1).

The primitives (:func:`normalize_rows`, :func:`random_weights`, :func:`distance_matrix`,
:func:`kernel_matrix`, :func:`kernel_predict`, :func:`solve_layer`, :func:`fit_layer`,
:func:`apply_layer`, :func:`layer_dtype`, :func:`layer_memory`) take and return tensors.
:class:`DeepRFM` is a scikit-learn classifier built from them; :meth:`DeepRFM.fit_iter` yields one
:class:`LayerStep` per layer (the stage tensors and how the layer was fitted) and measures
nothing: the collapse metrics of a run are taken by the experiment
(:mod:`agop.experiments.rfm`).

Scale of M: the authors' code divides M by its largest entry and the AGOP here carries the
1/N of Section 3.3. Neither can change a result: M → cM gives X M^{1/2} → √c X M^{1/2} and,
ReLU being positively homogeneous, σ(√c Z Wᵀ) = √c σ(Z Wᵀ), which the next normalization
removes; every collapse metric is a ratio or a cosine, so the "agop" and "features" stages
measure the same too. Only rounding differs, so there is no option for it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.exceptions import NotFittedError

from agop import choices as _choices
from agop._validate import (check_finite, check_int, check_matrix, check_positive, check_real,
                            check_row_norms, check_standardization, to_numpy)
from agop.agop import METHODS as AGOP_METHODS
from agop.agop import kernel_agop, resolve_method
from agop.backend import (dtype_name, format_bytes, memory_budget, parse_dtype, plan_rows,
                          resolve_device, strict_fp32, synchronize)
from agop.kernels import KERNELS, RadialKernel, class_groups, get_kernel, pairwise_distances
from agop.linalg import psd_power, psd_sqrt, symmetric_product
from agop.distributed import Comm, check_world_size, current, local, row_range
from agop.nystrom import fit_nystrom, nystrom_memory, nystrom_predict, select_centers
from agop.solve import RESIDUAL_TOL, kernel_ridge, signed_one_hot

__all__ = ["DeepRFM", "FEATURES", "FIT_INFO", "NYSTROM_INFO", "SOLVERS", "LayerFit", "LayerStep", "STEPS", "apply_layer",
           "distance_matrix", "fit_layer", "kernel_matrix", "kernel_predict", "layer_dtype",
           "layer_memory", "normalize_rows", "random_weights", "solve_layer"]

FEATURES = _choices.FEATURES
# the timed steps of one layer (Algorithm 1's own work; measurement is timed by the experiment)
STEPS = ("kernel", "solve", "agop", "sqrt", "features")
# the keys of one layer's fit information (DeepRFM.fit_info_, LayerStep.info), in this order
FIT_INFO = ("layer", "jitter", "solve_dtype", "kernel_dtype", "dtype", "agop_method",
            "agop_precision", "agop_fallback", "n", "dim", "seconds", "solve_residual",
            "refinements", "sqrt_precision")
# further keys of a Nyström layer's fit information (exact layers keep FIT_INFO only)
NYSTROM_INFO = ("solver", "centers", "nystrom_ridge", "condition", "residual", "trusted")
SOLVERS = _choices.SOLVERS
#: The residual tolerance of a solve whose α feeds an AGOP (:func:`fit_layer`); the final
#: solve uses :data:`agop.solve.RESIDUAL_TOL`. The AGOP is quadratic in α: refining a float32
#: α to 1e-5 keeps the float32 AGOP of CIFAR-10-5000's layer 1 within 2e-5 of float64, where
#: the unrefined α (residual 3e-5) leaves 7.5e-5.
AGOP_SOLVE_TOL = 1e-5
#: M when ``centers`` is None: min(N, this).
DEFAULT_CENTERS = 4000


# ----------------------------------------------------------------------------- layer primitives
def normalize_rows(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """Each row scaled to unit Euclidean norm (Algorithm 1, "normalize the data").

    Parameters
    ----------
    X : torch.Tensor
        N × D.
    name : str
        What ``X`` is, for the error message.

    Returns
    -------
    torch.Tensor
        N × D, same dtype and device.

    Raises
    ------
    ValueError
        A row of zeros has no direction; the message names the first such row.
    """
    norms = X.norm(dim=1, keepdim=True)
    zero = norms[:, 0] == 0
    if bool(zero.any()):
        i = int(torch.nonzero(zero)[0])
        raise ValueError(
            f"{name} row {i} is all zeros and cannot be normalized to unit norm "
            f"({int(zero.sum())} such row(s))"
        )
    return X / norms


def random_weights(width: int, d_in: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """W ∈ R^{width × d_in}, drawn on the CPU in float64 (identical on every device).

    Parameters
    ----------
    width, d_in : int
        The shape of W.
    kind : {"gaussian", "uniform"}
        ``"gaussian"``: i.i.d. N(0, 2/width), Proposition 5.1's scaling (E‖σ(Wx)‖² = ‖x‖²).
        ``"uniform"``: U(−1/√d_in, 1/√d_in), PyTorch's ``nn.Linear`` default, which the
        authors' scripts used.
    generator : torch.Generator
        A CPU generator; it advances.

    Returns
    -------
    torch.Tensor
        width × d_in, float64, on the CPU.
    """
    if kind == "gaussian":
        return torch.randn(width, d_in, generator=generator, dtype=torch.float64) * (2.0 / width) ** 0.5
    if kind == "uniform":
        bound = 1.0 / d_in**0.5
        return (torch.rand(width, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    raise ValueError(f"features must be one of {FEATURES}; got {kind!r}")


@dataclass
class LayerFit:
    """What one Deep RFM layer learned from normalized inputs X (N × D): what a solver returns.

    Attributes
    ----------
    coef : torch.Tensor
        α, N × K, in ``solve_dtype``.
    agop : torch.Tensor or None
        M, D × D (compute dtype); None for the final solve.
    sqrt_agop : torch.Tensor or None
        M^{1/2}, D × D, float64; None for the final solve.
    jitter : float
        The diagonal jitter the solve needed (0: none).
    solve_dtype, kernel_dtype : str
        The dtype the solve succeeded in, and the one the kernel matrix was built in (float64
        after a fallback).
    fitted : torch.Tensor
        f_l(X) at the training points, N × K.
    seconds : dict
        Seconds per step (``"kernel"``, ``"solve"``, ``"agop"``, ``"sqrt"``).
    agop_info : dict
        :func:`agop.kernel_agop`'s method, precision and fallback.
    distances : torch.Tensor or None
        N × N, kept for the AGOP's gram form only while it is computed.
    residual : float or None
        The exact solve's relative residual ‖Y − (K + (μ + jitter)I)α‖_F/‖Y‖_F against the
        matrix factored (:func:`agop.solve.kernel_ridge`); None for other solvers.
    refinements : int
        Iterative-refinement steps the exact solve needed (0: none).
    sqrt_precision : str or None
        The dtype M^{1/2} was decomposed in (:func:`agop.linalg.psd_sqrt`).
    """

    coef: torch.Tensor
    agop: torch.Tensor | None
    sqrt_agop: torch.Tensor | None
    jitter: float
    solve_dtype: str
    kernel_dtype: str
    fitted: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    agop_info: dict[str, Any] = field(default_factory=dict)
    distances: torch.Tensor | None = None
    residual: float | None = None
    refinements: int = 0
    sqrt_precision: str | None = None


def distance_matrix(X: torch.Tensor, groups: list[torch.Tensor] | None = None) -> torch.Tensor:
    """‖x_i − x_j‖ for all rows of X: exactly symmetric, self-distances exactly 0.

    d²_ij = ‖x̃_i‖² + ‖x̃_j‖² − 2x̃_iᵀx̃_j from one symmetric product of the rows shifted by
    their mean (:func:`agop.linalg.symmetric_product`: BLAS ``syrk`` on the CPU, half the
    FLOPs of the product the row-chunked :func:`agop.kernels.pairwise_distances` makes).
    With ``groups`` the pairs within each group are recomputed about that group's mean — the
    same formula as :func:`agop.kernels.pairwise_distances`, accurate once the groups have
    collapsed (its error is ε·‖x̃‖², now at the scale of the within-group spread) — wherever
    that spread is below a quarter of the common one (the shift then gains more than 4×;
    before the classes collapse it gains little and is skipped); pairs across groups keep the
    common shift, as accurate as the shift by either group's mean.
    Peak memory: N² plus the largest group's block twice.

    Parameters
    ----------
    X : torch.Tensor
        N × D.
    groups : list of torch.Tensor, optional
        Row indices per class (a partition of the rows).

    Returns
    -------
    torch.Tensor
        N × N in X's dtype.
    """
    Xc = X - X.mean(dim=0)
    d2 = _squared_about_mean(Xc, centered=True)
    spread = float((Xc * Xc).sum()) / max(len(X), 1)  # mean ‖x − μ‖²
    for idx in groups or ():
        Xg = X[idx] - X[idx].mean(dim=0)
        # recomputed where the group's own shift is > 4× more accurate (ε‖x̃‖² shrinks with
        # the spread about the shift): always once the classes have begun to collapse
        if len(idx) < len(X) and 4.0 * float((Xg * Xg).sum()) / len(idx) < spread:
            d2[idx[:, None], idx[None, :]] = _squared_about_mean(Xg, centered=True)
    d2.clamp_(min=0.0).diagonal().zero_()
    return d2.sqrt_()


def _squared_about_mean(X: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """‖x̃_i‖² + ‖x̃_j‖² − 2x̃_iᵀx̃_j with x̃ = x − mean (N × N, symmetric, not clamped);
    ``centered``: X is x̃ already."""
    Xc = X if centered else X - X.mean(dim=0)
    sq = (Xc * Xc).sum(dim=1)
    d2 = symmetric_product(Xc, alpha=-2.0)
    rows = max(1, (1 << 22) // (max(len(X), 1) * X.element_size()))
    for i0 in range(0, len(X), rows):  # ‖x̃_i‖² + ‖x̃_j‖² as one sum: d2 stays symmetric
        d2[i0:i0 + rows].add_(sq[i0:i0 + rows, None] + sq[None, :])
    return d2


def kernel_matrix(kernel: RadialKernel, X: torch.Tensor,
                  groups: list[torch.Tensor] | None = None) -> torch.Tensor:
    """k(X, X), N × N, from :func:`distance_matrix` in place (the diagonal is exactly k(0) = 1).

    Parameters
    ----------
    kernel : RadialKernel
        The kernel.
    X : torch.Tensor
        N × D.
    groups : list of torch.Tensor, optional
        As in :func:`distance_matrix`.

    Returns
    -------
    torch.Tensor
        N × N in X's dtype.
    """
    return _kernel_in_place(kernel, distance_matrix(X, groups))


def _kernel_in_place(kernel: RadialKernel, dist: torch.Tensor) -> torch.Tensor:
    rows = max(1, dist.shape[0] // 8)  # bounded temporaries
    for i0 in range(0, dist.shape[0], rows):
        dist[i0:i0 + rows] = kernel.from_distances(dist[i0:i0 + rows])
    return dist


def kernel_predict(kernel: RadialKernel, P: torch.Tensor, centers: torch.Tensor,
                   coef: torch.Tensor, groups: list[torch.Tensor] | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """f(P) = k(P, C) α for points P and centers C, in row chunks.

    Parameters
    ----------
    kernel : RadialKernel
        The kernel.
    P : torch.Tensor
        n × D points.
    centers : torch.Tensor
        N × D centers C.
    coef : torch.Tensor
        α, N × K.
    groups : list of torch.Tensor, optional
        Class rows of the centers (distances about each class's mean).
    dtype : torch.dtype, optional
        The dtype the kernel values are computed in: that of the kernel matrix α was solved
        against (``LayerFit.kernel_dtype``), so that a training point is predicted by the
        matrix of the fit; default: α's dtype. The product with α runs in α's dtype.

    Returns
    -------
    torch.Tensor
        n × K, in α's dtype.
    """
    dtype = coef.dtype if dtype is None else dtype
    P, centers = P.to(dtype), centers.to(dtype)
    n, N = P.shape[0], centers.shape[0]
    rows = plan_rows(4 * N * centers.element_size(), max(n, 1), P.device)
    out = torch.empty((n, coef.shape[1]), dtype=coef.dtype, device=P.device)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        out[i0:i1] = kernel(P[i0:i1], centers, groups=groups).to(coef.dtype) @ coef
    return out


def solve_layer(X: torch.Tensor, Y: torch.Tensor, kernel: RadialKernel, ridge: float = 0.0,
                groups: list[torch.Tensor] | None = None,
                keep_distances: bool = False, tol: float = RESIDUAL_TOL) -> LayerFit:
    """Step 2 of Algorithm 1: the exact kernel ridge solve on normalized inputs.

    The kernel matrix is built and factored in X's dtype (float32 by default); the solve is
    checked by its float64 residual against that matrix, refined, and retried in float64 by
    :func:`agop.solve.kernel_ridge` where refinement cannot bring the residual down. If the
    float32 matrix itself is not positive definite (its entries are off by more than λ_min),
    it is rebuilt from the features in float64 and solved there with kernel_ridge's jitter
    ladder. The kernel matrix and its factor are freed.

    Parameters
    ----------
    X : torch.Tensor
        N × D, rows of unit norm.
    Y : torch.Tensor
        N × K targets.
    kernel : RadialKernel
        The kernel.
    ridge : float
        μ ≥ 0.
    groups : list of torch.Tensor, optional
        Class rows (distances about each class's mean).
    keep_distances : bool
        Keep the N × N distance matrix in ``LayerFit.distances`` (for the AGOP's gram form;
        N² more memory).
    tol : float
        The solve's residual tolerance (:func:`agop.solve.kernel_ridge`).

    Returns
    -------
    LayerFit
        Without AGOP; what was used is recorded (``kernel_dtype``, ``solve_dtype``,
        ``jitter``, ``residual``, ``refinements``) with the seconds of ``"kernel"`` and
        ``"solve"``.
    """
    seconds = {}
    t = time.perf_counter()
    dist = distance_matrix(X, groups) if keep_distances else None
    Kmat = kernel.from_distances(dist) if keep_distances else kernel_matrix(kernel, X, groups)
    synchronize(X.device)
    seconds["kernel"] = time.perf_counter() - t

    t = time.perf_counter()
    kernel_dtype = X.dtype
    # K comes from finite features (a NaN would fail every factorization or residual anyway)
    if X.dtype == torch.float64:
        sol = kernel_ridge(Kmat, Y, ridge, check_finite=False, tol=tol)
    else:
        try:
            sol = kernel_ridge(Kmat, Y, ridge, max_tries=0, check_finite=False, tol=tol)
        except ValueError:  # inputs are finite, so the factorization failed (float32 and float64)
            del Kmat
            kernel_dtype = torch.float64
            Kmat = kernel_matrix(kernel, X.to(kernel_dtype), groups)
            sol = kernel_ridge(Kmat, Y.to(kernel_dtype), ridge, check_finite=False, tol=tol)
    del Kmat
    fitted = sol.fitted()
    sol.factor = None  # the N × N factor is not needed any more
    synchronize(X.device)
    seconds["solve"] = time.perf_counter() - t
    return LayerFit(coef=sol.coef, agop=None, sqrt_agop=None, jitter=sol.jitter,
                    solve_dtype=sol.dtype, kernel_dtype=dtype_name(kernel_dtype),
                    fitted=fitted, seconds=seconds, distances=dist, residual=sol.residual,
                    refinements=sol.refinements)


def fit_layer(X: torch.Tensor, Y: torch.Tensor, kernel: RadialKernel, ridge: float = 0.0,
              agop_method: str = "auto", groups: list[torch.Tensor] | None = None,
              try_float32: bool = True, sqrt_float32: bool = False) -> LayerFit:
    """Steps 2–3 of Algorithm 1 and M^{1/2} on normalized inputs.

    Solve as :func:`solve_layer`, to the residual ``AGOP_SOLVE_TOL``; the AGOP is computed in
    X's dtype (α cast to it) and M^{1/2} by :func:`agop.linalg.psd_sqrt` (assembled in
    float64). Seconds per step are recorded (with a device synchronization so GPU times are
    real).

    Parameters
    ----------
    X : torch.Tensor
        N × D, rows of unit norm.
    Y : torch.Tensor
        N × K targets.
    kernel : RadialKernel
        The kernel.
    ridge : float
        μ ≥ 0.
    agop_method : {"auto", "direct", "gram"}
        See :func:`agop.kernel_agop`.
    groups : list of torch.Tensor, optional
        Class rows (distances and gradients about each class's mean).
    try_float32 : bool
        Whether the gram form may try float32 first (see :func:`agop.kernel_agop`).
    sqrt_float32 : bool
        With float32 X, allow M^{1/2} from a float32 eigendecomposition where its error
        bound allows (:func:`agop.linalg.psd_sqrt`: about 1e-3 relative, twice as fast on a
        CPU). Meant for the last AGOP layer of a fit, whose error reaches only the final solve;
        an earlier layer's would be amplified by the layers after it.

    Returns
    -------
    LayerFit
        With ``agop`` and ``sqrt_agop``.
    """
    N, D = X.shape
    method = resolve_method(agop_method, N, N, Y.shape[1], D, True)
    # the gram form needs the distances the kernel matrix is made of: keep them if they fit
    keep = method == "gram" and 3 * N * N * X.element_size() <= memory_budget(X.device)
    fit = solve_layer(X, Y, kernel, ridge, groups, keep_distances=keep, tol=AGOP_SOLVE_TOL)
    t = time.perf_counter()
    fit.agop = kernel_agop(kernel, X, fit.coef.to(X.dtype), method=method, groups=groups,
                           info=fit.agop_info, distances=fit.distances, try_float32=try_float32)
    fit.distances = None
    synchronize(X.device)
    fit.seconds["agop"] = time.perf_counter() - t

    t = time.perf_counter()
    sqrt_info: dict[str, Any] = {}
    fit.sqrt_agop = psd_sqrt(fit.agop, allow_float32=sqrt_float32 and X.dtype == torch.float32,
                             info=sqrt_info)
    fit.sqrt_precision = sqrt_info["sqrt_precision"]
    synchronize(X.device)
    fit.seconds["sqrt"] = time.perf_counter() - t
    return fit


def apply_layer(X: torch.Tensor, sqrt_agop: torch.Tensor,
                W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 of Algorithm 1: the "agop" and "features" stages of normalized inputs.

    Parameters
    ----------
    X : torch.Tensor
        N × D, rows of unit norm.
    sqrt_agop : torch.Tensor
        M^{1/2}, D × D (cast to X's dtype).
    W : torch.Tensor
        width × D (cast to X's dtype).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        X M^{1/2} (N × D) and σ(X M^{1/2} Wᵀ) (N × width).
    """
    Z = X @ sqrt_agop.to(X.dtype)
    return Z, torch.relu(Z @ W.to(X.dtype).T)


def layer_dtype(dtype: torch.dtype, layer: int, depth: int, auto: bool = True) -> torch.dtype:
    """The dtype layer ``layer`` of a depth-``depth`` exact fit computes and keeps its features
    in, for the compute dtype ``dtype`` (the "precision plan" of ``dtype="auto"``).

    With ``auto`` (``DeepRFM(dtype="auto")``, the default) and float32: float64 for every AGOP
    layer of a fit with depth ≥ 2 (its inputs, kernel matrix, solve, AGOP, M^{1/2} and
    features), float32 for a depth-1 fit's layer and for every final solve (l = L + 1).
    Otherwise (an explicit dtype): ``dtype``.

    Why: Deep RFM amplifies an error made in one layer in every later layer. Measured on
    MNIST-2000 in float64 (docs/rfm.md, "float32 over 20 layers"): a relative perturbation of
    1e-12 of layer 1's output moves layer 21's NC1 by 6e-6, rounding it to float32 once moves
    layer 19's by 7e-3, and rounding every layer's output to float32 (float64 arithmetic)
    moves it by up to 4e-3. A float32 layer errs by far more, 1e-7 (kernel entries) to 1e-5
    (the solve, the AGOP): float32 layers end 10–20% off at layers 20–21, and a fit whose
    layers feed further AGOP layers holds 1% of float64 over 20 layers only in float64. A
    depth-1 fit's one layer feeds only the final solve, and a final solve feeds nothing: they
    keep float32's speed and memory.
    """
    if not auto or dtype == torch.float64 or depth < 2 or layer > depth:
        return dtype
    return torch.float64


# ----------------------------------------------------------------------------- memory
def layer_memory(n: int, d: int, k: int, width: int, *, n_test: int = 0,
                 dtype: torch.dtype = torch.float32, ridge: float = 0.0,
                 agop_method: str = "auto", device: str | torch.device = "cpu") -> int:
    """Estimated peak bytes of one Deep RFM layer: n points of dimension d, K classes, in
    ``dtype`` (the layer's, :func:`layer_dtype`).

    The peak is the resident features plus the largest of the layer's phases:

    - kernel + solve: k(X, X) and its Cholesky factor, 2n² (+ n² with a ridge, added to a
      copy, + n² for the distances kept for the gram form); building k(X, X) in row chunks of
      at most n/4 stays below 1.75n²;
    - AGOP: the ``"gram"`` form holds W and W² in float64 (:func:`agop.kernel_agop` plans with
      3n²) plus row chunks; the ``"direct"`` form is chunked to the free memory and needs
      2n·d + d² plus a chunk of rows (counted as min(n, 64));
    - features: X M^{1/2} and σ(X M^{1/2} Wᵀ) for train and ``n_test`` test points;
    - metrics: a float64 copy of a stage and its class-grouped residuals, on the device.

    Not reserved: a float32 Cholesky that fails is retried in float64, which needs up to
    20n² bytes (the float32 matrix, its float64 copy and factor).

    Returns
    -------
    int
        Bytes.
    """
    item = torch.tensor([], dtype=dtype).element_size()
    rows = n + n_test
    resident = item * (2 * rows * d + n * k)  # features in and normalized
    chunk = min(n, 64)
    method = resolve_method(agop_method, n, n, k, d, True)
    # kernel matrix and factor (+ the ridge's copy, + the distances kept for the gram form)
    solve = item * n * n * (2 + (ridge > 0) + (method == "gram"))
    if method == "gram":
        agop = 8 * (3 * n * n + 3 * chunk * n + n * d + d * d)
    else:
        agop = item * (2 * n * d + d * d + chunk * (3 * n + k * d + d + 10 * k))
    features = item * rows * (d + width) + 8 * (d * d + width * d)
    metrics = 8 * 2 * n * max(d, width)
    return int(resident + max(solve, agop, features, metrics))


# ----------------------------------------------------------------------------- the estimator
@dataclass
class LayerStep:
    """What :meth:`DeepRFM.fit_iter` yields after each layer l = 1..L+1 (nothing is measured).

    Attributes
    ----------
    layer : int
        l, from 1; layer L + 1 is the final solve.
    final : bool
        Whether this is the final solve (it has no AGOP, W or features).
    stages : dict of str to torch.Tensor
        ``"input"``: the normalized training features X_l entering the layer (N × D); for
        l ≤ L also ``"agop"``: X_l M_l^{1/2} (N × D) and ``"features"``: σ(X_l M_l^{1/2} W_lᵀ)
        (N × width). Compute dtype, on the model's device.
    y : torch.Tensor
        The training labels as indices into ``classes_`` (N, int64, on the device).
    fit : LayerFit
        What the solver returned: α (``coef``), f_l at the training points (``fitted``),
        M_l and M_l^{1/2}, dtypes, jitter, seconds.
    train_acc : float
        Accuracy of f_l on the training points: for the exact solver, that of
        :meth:`predict` on ``inputs``, the very computation :meth:`DeepRFM.score` makes
        (computed when first read, so a fit that does not read it pays nothing); a Nyström
        fit passes it in.
    info : dict
        The layer's fit information (keys :data:`FIT_INFO`; also in ``DeepRFM.fit_info_``).
    kernel : RadialKernel
        The kernel of f_l.
    centers : torch.Tensor
        The centers of f_l (the training inputs X_l for the exact solve).
    groups : list of torch.Tensor
        Class rows of the centers (distances about each class's mean).
    W : torch.Tensor or None
        W_l (width × D, on the device); None for the final solve.
    comm : Comm
        The process group of the fit (:func:`agop.distributed.local` in one process). In a
        distributed fit ``stages`` and ``y`` hold this rank's rows; ``train_acc`` is global.
    n_total : int
        N, the number of training points over all ranks.
    solver : str
        ``"exact"`` or ``"nystrom"``: f_l's centers are all N training points or M of them.
    """

    layer: int
    final: bool
    stages: dict[str, torch.Tensor]
    y: torch.Tensor
    fit: LayerFit
    train_acc: float | None = field(repr=False, compare=False)
    info: dict[str, Any]
    kernel: RadialKernel
    centers: torch.Tensor
    groups: list[torch.Tensor]
    W: torch.Tensor | None = None
    comm: Comm = field(default_factory=local)
    n_total: int = 0
    solver: str = "exact"

    @property
    def inputs(self) -> torch.Tensor:
        """The normalized training features entering the layer, ``stages["input"]``."""
        return self.stages["input"]

    def predict(self, H: torch.Tensor) -> torch.Tensor:
        """f_l(H), n × K, for inputs H of this layer (n × D, rows normalized as the fit did:
        :func:`normalize_rows` of :meth:`DeepRFM.preprocess` or of :meth:`forward`)."""
        H = H.to(self._dtype(H))  # as the fit (and DeepRFM.transform) has it
        if self.solver == "nystrom":
            return nystrom_predict(self.kernel, H, self.centers, self.fit.coef, groups=self.groups)
        return kernel_predict(self.kernel, H, self.centers, self.fit.coef, self.groups,
                              dtype=parse_dtype(self.fit.kernel_dtype))

    def _dtype(self, H: torch.Tensor) -> torch.dtype:
        """The dtype of this layer's inputs and features (``info["dtype"]``)."""
        name = self.info.get("dtype") if isinstance(self.info, dict) else None
        return parse_dtype(name) if name else H.dtype

    def forward(self, H: torch.Tensor) -> torch.Tensor:
        """σ(H M_l^{1/2} W_lᵀ), n × width: the features of inputs H (n × D, rows normalized)
        that enter layer l + 1 before its normalization. Not defined for the final solve."""
        if self.final:
            raise ValueError(f"layer {self.layer} is the final solve: it has no features")
        return apply_layer(H.to(self._dtype(H)), self.fit.sqrt_agop, self.W)[1]


def _train_acc(step: LayerStep) -> float:
    acc = step.__dict__.get("_train_acc")
    if acc is None:
        # predict() at the training inputs, as DeepRFM.score does at the raw training points
        # (transform gives exactly these inputs): at a training point the prediction's
        # distance to itself is a rounding error rather than the fit's exact 0, so a solve
        # with large coefficients can score below the targets it interpolates
        with strict_fp32():
            acc = _accuracy(step.predict(step.inputs), step.y)
        step.__dict__["_train_acc"] = acc
    return acc


def _set_train_acc(step: LayerStep, value: float | None) -> None:
    step.__dict__["_train_acc"] = None if value is None else float(value)


# a property over the dataclass field: LayerStep(train_acc=None) measures it when first read
LayerStep.train_acc = property(_train_acc, _set_train_acc,  # type: ignore[assignment]
                               doc="Accuracy of f_l on the training points (see the class).")


@dataclass(frozen=True)
class _Validated:
    device: torch.device
    dtype: torch.dtype
    kernel: RadialKernel


class DeepRFM(ClassifierMixin, TransformerMixin, BaseEstimator):
    """Deep Recursive Feature Machine (Algorithm 1) as a scikit-learn classifier and transformer.

    L layers each fit a kernel machine f_l to the ±1 one-hot targets, compute its AGOP M_l and
    map the features through M_l^{1/2} and random features σ(· W_lᵀ); a final kernel machine
    f_{L+1} on the last features predicts. Sections 5.1–5.2 of the paper measure neural
    collapse at every layer: :meth:`fit_iter` yields each layer's stage tensors for that
    (:mod:`agop.experiments.rfm` measures them), :meth:`fit` only fits.

    Preprocessing: with ``standardize=True`` (the authors' scripts) each input feature is
    standardized with training statistics, (x − ``mean_``)/``scale_`` (population std), a
    feature constant in training (``scale_`` 0) set to 0; with ``standardize=False``
    (Algorithm 1 as printed) the inputs are used as given. Either way each layer then
    normalizes the rows. Labels may be any sortable values (``classes_``); targets are ±1
    one-hot over ``classes_``.

    Inputs may be numpy arrays (or anything scikit-learn accepts) or torch tensors on any
    device. Outputs follow the input: :meth:`transform` and :meth:`decision_function` return a
    tensor on the model's device for a tensor, a numpy array otherwise, as scikit-learn expects
    (:meth:`predict` returns labels from ``classes_``, numpy).

    Parameters
    ----------
    depth : int, default 10
        L ≥ 1, the number of AGOP layers; a final kernel solve (layer L + 1) follows.
    bandwidth : float, default 2.0
        L of the kernel (Appendix C: 2.0).
    width : int, default 512
        Rows of each random matrix W_l (the paper: 512).
    ridge : float, default 0.0
        μ ≥ 0 (the paper: 0, ridgeless; the authors' code effectively used 1e-3).
    features : {"gaussian", "uniform"}, default "gaussian"
        W i.i.d. N(0, 2/width) (Proposition 5.1) or ``nn.Linear``'s default (the authors').
    standardize : bool, default True
        Standardize the input features first (the authors' preprocessing); False runs
        Algorithm 1 as printed (rows only normalized).
    seed : int, default 0
        Seeds the CPU generator all W_l are drawn from, so every device gets the same W.
    device : str, default "auto"
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    kernel : {"laplace", "gaussian"}, default "laplace"
        The kernel (the paper: Laplace).
    dtype : str, default "auto"
        Compute dtype for kernels, solves and AGOPs. ``"float32"`` / ``"float64"``: every
        layer in that dtype (M^{1/2} assembled in float64). ``"auto"``:
        :func:`agop.backend.default_dtype` (float32) with the precision plan of
        :func:`layer_dtype` for the exact solver: a depth-1 fit and every final solve in
        float32, the AGOP layers of a deeper fit in float64 — an error made in a layer is
        amplified by every later one, and float32 layers end 10–20% off float64 by layers
        20–21 on MNIST and CIFAR-10, the plan within rounding (docs/rfm.md, "float32 over 20
        layers").
    agop_method : {"auto", "direct", "gram"}, default "auto"
        See :func:`agop.kernel_agop` (exact solver).
    solver : {"auto", "exact", "nystrom"}, default "auto"
        ``"exact"``: Algorithm 1 as written, the N × N kernel system by Cholesky.
        ``"nystrom"``: f_l over M class-balanced training points (:mod:`agop.nystrom`): α from
        the Nyström ridge problem min ‖K_NCα − Y‖² + λαᵀK_CCα by a streamed QR, the AGOP at the
        training points; memory O(N·M/P) instead of N², data-parallel over a process group.
        ``"auto"``: exact where its memory plan fits in one process, else Nyström (always
        Nyström when ``torch.distributed`` runs several processes).
    centers : int, optional
        M, the number of Nyström centers (default min(N, 4000)); K ≤ M ≤ N. The same centers
        (seeded by ``seed``) serve every layer.
    nystrom_ridge : float, default 1e-6
        λ of the Nyström problem (Algorithm 1 is ridgeless; with M < N a small ridge keeps the
        solve well posed; docs/scaling.md measures the choice).
    agop_points : int, optional
        Nyström only: evaluate the AGOP at a seeded sample of this many training points
        (default: all N).

    Distributed fits: when ``torch.distributed`` is initialized with P > 1 processes (e.g.
    under ``torchrun``), every rank calls :meth:`fit` with its own rows, the contiguous block
    :func:`agop.distributed.row_range` (N, rank, P) of the training set; the labels are
    gathered, the features standardized with global statistics and the partial sums of the
    solve, the AGOP and the accuracies meet in all-reduces. Every rank ends with the same model.

    Attributes
    ----------
    classes_ : numpy.ndarray
        The K class labels, sorted.
    n_features_in_ : int
        d, the number of input features.
    mean_, scale_ : numpy.ndarray or None
        Per-feature training mean and population std (float64, d); None without
        standardization.
    sqrt_agops_ : list of torch.Tensor
        M_l^{1/2} (float64), l = 1..L.
    weights_ : list of torch.Tensor
        W_l (float64), l = 1..L.
    coef_ : torch.Tensor
        α_{L+1}, N × K (M × K for Nyström, float64): float64 when its solve was refined or
        factored in float64 (:func:`agop.solve.kernel_ridge`), else in the compute dtype.
    X_fit_ : torch.Tensor
        The centers of f_{L+1}: the normalized training features of layer L + 1 (N × D), or
        the M Nyström centers' (M × D).
    y_fit_ : torch.Tensor
        Their class indices into ``classes_``.
    solver_ : str
        The solver that ran, ``"exact"`` or ``"nystrom"``.
    centers_ : numpy.ndarray or None
        Nyström: the M global row indices of the centers (sorted); None for the exact solver.
    n_total_ : int
        N, the number of training points (over all ranks).
    fit_info_ : list of dict
        One dict per layer (keys :data:`FIT_INFO`): jitter, dtypes (``dtype``: the one the
        layer was planned in, :func:`layer_dtype`), AGOP form, n, dim, the seconds per step,
        the solve's relative residual and refinement steps, and the dtype M^{1/2} was
        decomposed in.
    layers_done_ : int
        Layers fitted so far (L + 1 once fitted).
    device_ : torch.device
        The device computed on.
    dtype_ : torch.dtype
        The compute dtype (``"auto"`` resolved); each layer's is in ``fit_info_``.
    kernel_ : RadialKernel
        The kernel object.
    """

    def __init__(self, *, depth: int = 10, bandwidth: float = 2.0, width: int = 512,
                 ridge: float = 0.0, features: str = "gaussian", standardize: bool = True,
                 seed: int = 0, device: str = "auto", kernel: str = "laplace",
                 dtype: str = "auto", agop_method: str = "auto", solver: str = "auto",
                 centers: int | None = None, nystrom_ridge: float = 1e-6,
                 agop_points: int | None = None):
        self.depth = depth
        self.bandwidth = bandwidth
        self.width = width
        self.ridge = ridge
        self.features = features
        self.standardize = standardize
        self.seed = seed
        self.device = device
        self.kernel = kernel
        self.dtype = dtype
        self.agop_method = agop_method
        self.solver = solver
        self.centers = centers
        self.nystrom_ridge = nystrom_ridge
        self.agop_points = agop_points

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # transform gives the features of the final layer, in the compute dtype
        tags.transformer_tags.preserves_dtype = []
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        tags.target_tags.single_output = True
        tags.target_tags.multi_output = False
        tags.classifier_tags.multi_label = False
        tags.non_deterministic = False  # a seed fixes every W_l
        return tags

    # -- checks ---------------------------------------------------------------------------
    def _validated(self) -> _Validated:
        """The parameters checked (ValueError naming the bad one); returns the resolved device,
        dtype and kernel without setting anything."""
        check_int(self.depth, "depth", minimum=1)
        check_positive(self.bandwidth, "bandwidth")
        check_int(self.width, "width", minimum=1)
        check_positive(self.ridge, "ridge", allow_zero=True)
        check_int(self.seed, "seed", minimum=0)
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}; got {self.features!r}")
        if not isinstance(self.standardize, (bool, np.bool_)):
            raise ValueError(f"standardize must be True or False; got {self.standardize!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {tuple(KERNELS)}; got {self.kernel!r}")
        if self.agop_method not in AGOP_METHODS:
            raise ValueError(f"agop_method must be one of {AGOP_METHODS}; got {self.agop_method!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {self.solver!r}")
        if self.centers is not None:
            check_int(self.centers, "centers", minimum=1)
        check_positive(self.nystrom_ridge, "nystrom_ridge", allow_zero=True)
        if self.agop_points is not None:
            check_int(self.agop_points, "agop_points", minimum=1)
        return _Validated(resolve_device(self.device), parse_dtype(self.dtype),
                          get_kernel(self.kernel, self.bandwidth))

    def _check_started(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(
                "this DeepRFM is not fitted yet (or its fit was interrupted); call fit first")

    def _check_fitted(self) -> None:
        if getattr(self, "coef_", None) is None:
            raise NotFittedError(
                "this DeepRFM is not fitted yet (or its fit was interrupted); call fit first"
            )

    def _check_X(self, X: Any, name: str, *, reset: bool) -> Any:
        """X validated as an n × d finite real matrix: a tensor stays as is (on its device);
        anything else goes through scikit-learn's ``validate_data`` (feature names, dtypes)."""
        # a distributed fit needs 2 rows in all (checked on the gathered labels), not per rank
        min_rows = 2 if reset and current().world == 1 else 1
        try:
            shape = tuple(X.shape) if hasattr(X, "shape") else np.shape(X)
        except TypeError:  # an array-like that refuses numpy's functions: convert it
            X = np.asarray(X)
            shape = X.shape
        if len(shape) == 2 and shape[0] < min_rows:
            raise ValueError(f"{name} must have at least {min_rows} row(s); got {shape[0]} "
                             f"sample(s), shape {shape}")
        if isinstance(X, torch.Tensor):
            if X.is_complex():
                raise ValueError(f"{name} must be real-valued; got dtype {X.dtype}")
            check_matrix(X, name, min_rows=min_rows)
            if reset:
                self.n_features_in_ = int(X.shape[1])
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            self._check_n_features(X, name)
            return X
        from sklearn.utils.validation import validate_data

        # complex, text, ragged, objects other than numbers: one line, before scikit-learn
        check_real(X, name, allow_object=True)
        arr = np.asarray(X) if not hasattr(X, "dtype") else X
        if getattr(arr, "dtype", None) is not None and arr.dtype.kind in "fc":
            check_finite(arr, name)  # the message names the first bad index
        X = validate_data(self, X, reset=reset, ensure_min_samples=min_rows,
                          ensure_all_finite=True)
        check_matrix(X, name, min_rows=min_rows)
        return X

    def _check_n_features(self, X: Any, name: str) -> None:
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"{name} has {X.shape[1]} features, but DeepRFM is expecting "
                f"{self.n_features_in_} features as input"
            )

    def preprocess(self, X: Any) -> torch.Tensor:
        """X as a fitted (or fitting) model sees it before layer 1's row normalization.

        Validated, standardized with the training statistics when ``standardize=True``
        (computed in float64), cast to the compute dtype on the device. Available as soon as
        :meth:`fit_iter` has been called, so that an experiment can carry test points through
        the layers as the fit goes (:meth:`LayerStep.predict`, :meth:`LayerStep.forward`).

        Parameters
        ----------
        X : array-like or torch.Tensor
            n × d.

        Returns
        -------
        torch.Tensor
            n × d, compute dtype, on the device. A row that would be all zeros raises here.
        """
        self._check_started()
        return self._preprocess(self._check_X(X, "X", reset=False), "X")

    def _preprocess(self, X: Any, name: str) -> torch.Tensor:
        # rows are normalized where each layer starts, exactly as during the fit, so that
        # transform reproduces the fit's features bit for bit
        X64 = _float64(X, self.device_)
        if self.mean_ is not None:
            mean = torch.as_tensor(self.mean_, device=self.device_)
            scale = torch.as_tensor(self.scale_, device=self.device_)
            inv = torch.where(scale > 0, 1.0 / scale.clamp(min=torch.finfo(torch.float64).tiny),
                              torch.zeros_like(scale))
            X64 = (X64 - mean) * inv
            where = f"{name} after standardization"
        else:
            where = name
        check_row_norms(X64, where, self.dtype_)  # overflow or underflow, named, up front
        Z = X64.to(self._compute_dtype(1))  # layer 1's dtype (the plan of dtype="auto")
        normalize_rows(Z, where)  # a zero row raises here, up front
        return Z

    def _labels(self, y: Any, n: int) -> np.ndarray:
        """Training labels validated; sets ``classes_`` and returns indices into it."""
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import column_or_1d

        y = column_or_1d(to_numpy(y), warn=True)
        if y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} label(s) but X has {n} row(s); they must "
                             "match one label per sample")
        check_classification_targets(y)
        self.classes_, idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y must hold at least 2 classes; got 1 class "
                             f"({self.classes_[0]!r})")
        return idx.astype(np.int64)

    # -- fitting --------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> "DeepRFM":
        """Run Algorithm 1 on X (N × d) with labels y (N).

        Parameters
        ----------
        X : array-like or torch.Tensor
            N × d training inputs (a tensor stays on its device until moved to ``device``).
        y : array-like
            N labels, at least 2 classes.

        Returns
        -------
        DeepRFM
            self, fitted. See :meth:`fit_iter` for a layer-by-layer version.
        """
        for _ in self.fit_iter(X, y):
            pass
        return self

    def fit_iter(self, X: Any, y: Any) -> Iterator[LayerStep]:
        """Check the input and return a generator that fits one layer per step.

        Input errors and a fit that cannot fit in memory raise here, before any layer runs.
        Between steps :meth:`state_dict` is a checkpoint from which :meth:`from_state_dict`
        and :meth:`resume_iter` continue with exactly the same numbers.

        Parameters
        ----------
        X, y
            As in :meth:`fit`.

        Returns
        -------
        iterator of LayerStep
            One per layer l = 1..L+1.
        """
        v = self._validated()
        comm = current()
        X = self._check_X(X, "X", reset=True)
        n_local = X.shape[0]
        if comm.world == 1:
            N, start = n_local, 0
            y_idx = self._labels(y, N)
        else:
            N, start, y_idx = self._gather_labels(comm, X, y)
        d, K = self.n_features_in_, len(self.classes_)
        solver = self._resolve_solver(N, d, K, comm.world)
        centers = None
        if solver == "nystrom":  # sizes first: a clearer error than the memory plan's
            M = min(N, DEFAULT_CENTERS) if self.centers is None else int(self.centers)
            if M > N:
                raise ValueError(f"centers = {M} but there are only N = {N} training points")
            if self.agop_points is not None and int(self.agop_points) > N:
                raise ValueError(f"agop_points = {self.agop_points} but there are only N = {N} "
                                 "training points")
            centers = select_centers(y_idx, M, int(self.seed))
        self.device_, self.dtype_, self.kernel_ = v.device, v.dtype, v.kernel
        self._check_memory_everywhere(comm, N, d, K, solver)
        self.solver_, self.n_total_ = solver, N
        self.centers_ = centers

        if self.standardize:
            X64 = _float64(X)
            if comm.world == 1:
                self.mean_ = X64.mean(dim=0).numpy()
                self.scale_ = X64.std(dim=0, correction=0).numpy()
            else:  # global statistics: Σx, then Σ(x − mean)², all-reduced in float64
                mean = comm.all_reduce_sum(X64.sum(dim=0)) / N
                var = comm.all_reduce_sum(((X64 - mean) ** 2).sum(dim=0)) / N
                self.mean_, self.scale_ = mean.numpy(), var.sqrt().numpy()
            # the same global statistics on every rank: one verdict (the spread check is local)
            check_standardization(self.mean_, self.scale_, "X", X64 if comm.world == 1 else None)
            del X64
        else:
            self.mean_ = self.scale_ = None
        self.sqrt_agops_, self.weights_ = [], []
        self.coef_ = self.X_fit_ = self.y_fit_ = None
        self.fit_info_ = []
        self.layers_done_ = 0
        self._rng_state = torch.Generator().manual_seed(int(self.seed)).get_state()
        self._comm = comm
        self._y_all = np.asarray(y_idx, dtype=np.int64)
        self._train = self._preprocess(X, "X")
        self._y = torch.as_tensor(self._y_all[start:start + n_local], device=self.device_)
        self._groups = class_groups(self._y, len(self.classes_))
        if solver == "exact" and float(self.ridge) == 0.0:  # no ridgeless interpolant exists
            hint = self._duplicates_hint(normalize_rows(self._train, "X"))
            if hint:
                one = (" (X has 1 feature(s): every row normalizes to +1 or −1)"
                       if self.n_features_in_ == 1 else "")
                raise ValueError(f"ridgeless Deep RFM cannot interpolate these training points:"
                                 f"{hint}{one}; use ridge > 0 (e.g. 1e-3, the authors' "
                                 "effective value)")
        return self._run()

    def _check_memory_everywhere(self, comm: Comm, N: int, d: int, K: int, solver: str) -> None:
        """:meth:`check_memory` on every rank, and one verdict: if any rank's plan does not
        fit, every rank raises (a rank alone leaving would strand the others in a collective)."""
        err = None
        try:
            self.check_memory(N, d, K, solver=solver, world=comm.world)
        except MemoryError as e:
            err = e
        if comm.world > 1:
            failed = comm.all_reduce_sum(torch.tensor([float(err is not None)], dtype=torch.float64))
            if err is None and float(failed[0]) > 0:
                raise MemoryError("another process's memory plan for this fit does not fit (its "
                                  "error names the size); use fewer centers or more processes")
        if err is not None:
            raise err

    def _gather_labels(self, comm: Comm, X: Any, y: Any) -> tuple[int, int, np.ndarray]:
        """Distributed fit: every rank's labels, checked against the row blocks of
        :func:`agop.distributed.row_range`; returns (N, this rank's first row, all N label
        indices) and sets ``classes_`` from all labels."""
        from sklearn.utils.validation import column_or_1d

        # first collective: every rank must fit the same model (else different W, or one rank
        # in a collective the others skip)
        comm.agree({k: str(v) if k in ("device", "dtype") else v
                    for k, v in sorted(self.get_params().items())}, "the DeepRFM parameters")
        y = column_or_1d(to_numpy(y), warn=True)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"y has {y.shape[0]} label(s) but X has {X.shape[0]} row(s); they "
                             "must match one label per sample")
        comm.agree(int(self.n_features_in_), "the number of input features")
        parts = comm.all_gather_object(y)
        N = sum(len(p) for p in parts)
        check_world_size(N, comm.world, "training points")
        for r, part in enumerate(parts):
            a, b = row_range(N, r, comm.world)
            if len(part) != b - a:
                raise ValueError(
                    f"rank {r} of {comm.world} holds {len(part)} training rows but must hold rows "
                    f"{a}..{b - 1} of N = {N} (agop.distributed.row_range: contiguous blocks, "
                    "sizes differing by at most one, lower ranks first)")
        y_idx = self._labels(np.concatenate(parts), N)
        return N, row_range(N, comm.rank, comm.world)[0], y_idx

    def _resolve_solver(self, N: int, d: int, K: int, world: int) -> str:
        """The solver that runs: ``solver`` itself, checked, or the choice of ``"auto"``."""
        if self.solver == "exact":
            if world > 1:
                raise ValueError(
                    f"solver='exact' runs in one process but this fit has {world}; use "
                    "solver='nystrom' (or 'auto') to fit data-parallel")
            return "exact"
        if self.solver == "nystrom" or world > 1:
            return "nystrom"
        v = self._validated()
        fits = self.memory_needed(N, d, K, solver="exact") <= memory_budget(v.device, fraction=1.0)
        return "exact" if fits else "nystrom"

    def resume_iter(self, X: Any = None) -> Iterator[LayerStep]:
        """Continue a fit restored by :meth:`from_state_dict` (a generator like :meth:`fit_iter`;
        empty if the fit had finished).

        Parameters
        ----------
        X : array-like or torch.Tensor, optional
            The raw training rows the fit started from (this rank's, in a distributed fit).
            Needed when the checkpoint holds no training features (a distributed fit's): they
            are rebuilt by replaying the fitted layers (:meth:`features_after`), with exactly
            the numbers the interrupted fit had on the same device and threads.
        """
        pending = getattr(self, "layers_done_", 0) <= self.depth
        if pending and getattr(self, "_train", None) is None:
            if X is None:
                raise ValueError("nothing to resume: this DeepRFM holds no fit in progress "
                                 "(a distributed checkpoint needs the training rows: "
                                 "resume_iter(X))")
            comm = self._comm = current()
            saved = getattr(self, "_world_saved", comm.world)
            if comm.world != saved:
                raise ValueError(f"this fit was checkpointed with {saved} process(es) and is "
                                 f"resumed with {comm.world}; resume it with {saved}")
            if not hasattr(X, "shape"):
                X = np.asarray(X)
            if comm.world > 1:
                a, b = row_range(self.n_total_, comm.rank, comm.world)
            else:
                a, b = 0, self.n_total_
            if X.shape[0] != b - a:
                raise ValueError(f"resume_iter: X has {X.shape[0]} rows but this rank holds rows "
                                 f"{a}..{b - 1} of N = {self.n_total_}")
            self._y = torch.as_tensor(self._y_all[a:b], device=self.device_)
            self._groups = class_groups(self._y, len(self.classes_))
            self._train = self.features_after(X, self.layers_done_)
        return self._run()

    def features_after(self, X: Any, layers: int) -> torch.Tensor:
        """The features of raw inputs X after ``layers`` fitted layers, before the next row
        normalization: exactly what the fit carries into layer ``layers + 1``.

        Parameters
        ----------
        X : array-like or torch.Tensor
            n × d raw inputs.
        layers : int
            0..``layers_done_`` (and at most L).

        Returns
        -------
        torch.Tensor
            n × D, compute dtype, on the device (0 layers: :meth:`preprocess`).
        """
        self._check_started()
        layers = check_int(layers, "layers", minimum=0)
        if layers > min(self.layers_done_, self.depth):
            raise ValueError(f"layers must be in 0..{min(self.layers_done_, self.depth)} (the "
                             f"fitted layers); got {layers}")
        with strict_fp32():
            H = self.preprocess(X)
            for j in range(layers):
                Hn = normalize_rows(H, f"layer {j + 1} training features")
                H = apply_layer(Hn.to(self._compute_dtype(j + 1)), self.sqrt_agops_[j],
                                self.weights_[j])[1]
        return H

    def _run(self) -> Iterator[LayerStep]:
        with strict_fp32():
            while self.layers_done_ <= self.depth:
                yield self._step()

    def _solve(self, Xn: torch.Tensor, Y: torch.Tensor, final: bool,
               try_float32: bool) -> LayerFit:
        """The layer's solver: the exact kernel solve (and, before the final layer, the AGOP and
        M^{1/2}). Another solver returns a :class:`LayerFit` the same way."""
        if final:
            return solve_layer(Xn, Y, self.kernel_, self.ridge, self._groups)
        # M^{1/2} may come from a float32 decomposition in the last AGOP layer only
        return fit_layer(Xn, Y, self.kernel_, self.ridge, self.agop_method, self._groups,
                         try_float32=try_float32,
                         sqrt_float32=self.layers_done_ + 1 == int(self.depth))

    def _solve_nystrom(self, Xn: torch.Tensor, final: bool) -> tuple[LayerFit, Any]:
        """The Nyström layer (:func:`agop.nystrom.fit_nystrom`) as a :class:`LayerFit`, and the
        :class:`agop.nystrom.NystromFit` with its checks. M^{1/2} is computed on rank 0 and
        broadcast, so every rank maps its rows with the same matrix."""
        comm = self._comm
        nf = fit_nystrom(Xn, self._y_all, self.centers_, self.kernel_, float(self.nystrom_ridge),
                         comm=comm, num_classes=len(self.classes_), per_class=True,
                         agop=not final, agop_points=self.agop_points, seed=int(self.seed))
        sec = nf.seconds
        seconds = {
            "kernel": sum(sec.get(k, 0.0) for k in ("centers", "ridge", "knc")),
            "solve": sum(sec.get(k, 0.0) for k in ("qr", "combine", "gram", "cg", "solve",
                                                   "fitted", "check")),
        }
        sqrt = None
        if not final:
            seconds["agop"] = sec.get("agop", 0.0)
            t = time.perf_counter()
            sqrt, err = torch.empty(nf.agop.shape, dtype=torch.float64,
                                    device=nf.agop.device), None
            if comm.is_root:
                try:
                    sqrt = psd_power(nf.agop, 0.5)
                except (ValueError, RuntimeError) as e:  # e.g. a non-finite AGOP
                    err = f"{type(e).__name__}: {e}"
            if comm.world > 1:  # a failure on rank 0 ends every rank, not only rank 0
                err = comm.broadcast_object(err)
            if err is not None:
                raise ValueError(f"M^(1/2) of layer {self.layers_done_ + 1}'s AGOP failed on "
                                 f"rank 0: {err}")
            sqrt = comm.broadcast(sqrt)
            synchronize(Xn.device)
            seconds["sqrt"] = time.perf_counter() - t
        if not nf.trusted:
            warnings.warn(
                f"Nyström solve not trusted (condition ≈ {nf.condition:.3g}, estimated relative "
                f"error {nf.error_estimate:.3g}, optimality {nf.optimality:.3g}); recorded as "
                "trusted=False. A larger nystrom_ridge or dtype='float64' helps", stacklevel=4)
        fit = LayerFit(coef=nf.coef, agop=nf.agop, sqrt_agop=sqrt, jitter=nf.jitter,
                       solve_dtype="float64", kernel_dtype=nf.dtype, fitted=nf.fitted,
                       seconds=seconds,
                       agop_info={} if final else {"method": "nystrom", "precision": nf.dtype,
                                                   "fallback": False})
        return fit, nf

    def _compute_dtype(self, layer: int, dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype layer ``layer`` computes and keeps its features in: :func:`layer_dtype`
        for the exact solver (its plan with ``dtype="auto"``); a Nyström layer works in the
        compute dtype (with its own float64 parts)."""
        dtype = self.dtype_ if dtype is None else dtype
        if getattr(self, "solver_", "exact") == "nystrom":
            return dtype
        auto = self.dtype is None or (isinstance(self.dtype, str) and self.dtype == "auto")
        return layer_dtype(dtype, layer, int(self.depth), auto=auto)

    def _duplicates_hint(self, Xn: torch.Tensor) -> str:
        """' (training rows i and j ...)' when two rows of Xn (normalized training features)
        are identical with different labels — no ridgeless interpolant exists then — else
        ''. Exact: rows whose projections on a fixed random direction are within 1e-5 of each
        other (after sorting) are compared bit for bit (about 0.02 s for 5,000 × 3,072)."""
        if len(Xn) < 2:
            return ""
        v = torch.randn(Xn.shape[1], generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64).to(device=Xn.device, dtype=Xn.dtype)
        p = Xn @ v  # identical rows: equal projections up to the product's rounding
        order = torch.argsort(p)
        ps = p[order]
        close = ((ps[1:] - ps[:-1]).abs() <= 1e-5 * float(ps.abs().max())).tolist()
        runs, run = [], [0]  # maximal runs of sorted positions, each within 1e-5 of the next
        for k, c in enumerate(close):
            if c:
                run.append(k + 1)
            else:
                runs.append(run)
                run = [k + 1]
        runs.append(run)
        for run in (r for r in runs if len(r) > 1):  # few: random rows are rarely this close
            rows = torch.as_tensor(sorted(int(order[k]) for k in run), device=Xn.device)
            labels = self._y[rows]
            if bool((labels == labels[0]).all()):
                continue
            _, same = torch.unique(Xn[rows], dim=0, return_inverse=True)  # exact equality
            for g in torch.unique(same).tolist():
                members = rows[same == g]
                first = self._y[members[0]]
                other = torch.nonzero(self._y[members] != first)
                if len(other):
                    i, j = sorted((int(members[0]), int(members[int(other[0])])))
                    names = self.classes_[[int(self._y[i]), int(self._y[j])]].tolist()
                    return (f" (training rows {i} and {j} have identical features but the "
                            f"labels {names[0]!r} and {names[1]!r})")
        return ""

    def _draw_weights(self, d_in: int) -> torch.Tensor:
        gen = torch.Generator()
        gen.set_state(self._rng_state)
        W = random_weights(self.width, d_in, self.features, gen)
        self._rng_state = gen.get_state()
        return W

    def _step(self) -> LayerStep:
        l = self.layers_done_ + 1
        final = l == self.depth + 1
        dev = self.device_
        # normalized in the dtype the features come in, then in this layer's (layer_dtype)
        compute = self._compute_dtype(l)
        Xn = normalize_rows(self._train, f"layer {l} training features").to(compute)
        nystrom = self.solver_ == "nystrom"
        nf = None
        if nystrom:
            fit, nf = self._solve_nystrom(Xn, final)
        else:
            Y = signed_one_hot(self._y, len(self.classes_), compute)
            # classes only collapse further: once the float32 gram form was refused, skip it
            refused = any(info["agop_fallback"] for info in self.fit_info_)
            try:
                fit = self._solve(Xn, Y, final, try_float32=not refused)
            except ValueError as e:  # the solve refused: say which layer, and why if we can
                raise ValueError(f"layer {l}: {e}{self._duplicates_hint(Xn)}") from None
            if fit.residual is not None and fit.residual > RESIDUAL_TOL:
                warnings.warn(
                    f"layer {l}: the kernel solve left a relative residual {fit.residual:.3g} "
                    f"(> {RESIDUAL_TOL:g}; jitter {fit.jitter:.3g}, {fit.solve_dtype}): the "
                    "kernel matrix is singular to working precision, so f_l does not "
                    "interpolate; recorded as solve_residual (a ridge > 0 avoids it)",
                    stacklevel=3)
        seconds = dict(fit.seconds)

        stages = {"input": Xn}
        W = None
        if not final:
            W = self._draw_weights(Xn.shape[1]).to(dev)
            t = time.perf_counter()
            stages["agop"], stages["features"] = apply_layer(Xn, fit.sqrt_agop, W)
            synchronize(dev)
            seconds["features"] = time.perf_counter() - t

        N, D = self.n_total_, Xn.shape[1]
        info = {
            "layer": l,
            "jitter": fit.jitter,
            "solve_dtype": fit.solve_dtype,
            "kernel_dtype": fit.kernel_dtype,
            # the dtype this layer was planned to compute in (layer_dtype); kernel_dtype,
            # solve_dtype and agop_precision say where it had to do otherwise
            "dtype": dtype_name(compute),
            "agop_method": fit.agop_info.get("method"),
            "agop_precision": fit.agop_info.get("precision"),
            "agop_fallback": bool(fit.agop_info.get("fallback")),
            "n": N,
            "dim": D,
            "seconds": {k: seconds[k] for k in STEPS if k in seconds},
            "solve_residual": fit.residual,
            "refinements": fit.refinements,
            "sqrt_precision": (fit.sqrt_precision or "float64") if not final else None,
        }
        comm = self._comm
        if nystrom:
            info.update(solver="nystrom", centers=len(self.centers_),
                        nystrom_ridge=float(self.nystrom_ridge), condition=nf.condition,
                        residual=nf.residual, trusted=bool(nf.trusted))
            correct = (fit.fitted.argmax(dim=1) == self._y).sum().to(torch.float64)
            train_acc = float(comm.all_reduce_sum(correct)) / self.n_total_
            centers, groups = nf.center_features, _on(nf.groups, dev)
        else:
            # measured when read, by the prediction score() makes (LayerStep.train_acc)
            train_acc = None
            centers, groups = Xn, self._groups
        step = LayerStep(layer=l, final=final, stages=stages, y=self._y, fit=fit,
                         train_acc=train_acc, info=info, kernel=self.kernel_, centers=centers,
                         groups=groups, W=W, comm=comm, n_total=self.n_total_,
                         solver=self.solver_)
        if final:
            self.coef_ = fit.coef
            self.X_fit_ = centers
            self.y_fit_ = (torch.as_tensor(self._y_all[self.centers_], device=dev) if nystrom
                           else self._y)
            self._fit_groups = groups
            self._train = None
        else:
            self.sqrt_agops_.append(fit.sqrt_agop)
            self.weights_.append(W)
            self._train = stages["features"]
        self.fit_info_.append(info)
        self.layers_done_ = l
        return step

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the fit (or use the fitted model), as CPU tensors.

        Valid between the steps of :meth:`fit_iter`; safe for ``torch.load(weights_only=True)``.

        Returns
        -------
        dict
            Format 2: the parameters, the fitted attributes, the generator state, the current
            training features and labels.
        """
        if not hasattr(self, "layers_done_"):
            raise ValueError("this DeepRFM has not started fitting; nothing to save")

        def cpu(t):
            return None if t is None else t.detach().cpu()

        def array(a):
            return None if a is None else torch.as_tensor(a)

        return {
            "format": 2,
            "params": {p: str(v) if p in ("device", "dtype") else
                       bool(v) if p == "standardize" else v
                       for p, v in self.get_params().items()},
            "dtype_": dtype_name(self.dtype_),
            "layers_done": self.layers_done_,
            "classes": self.classes_.tolist(),
            "n_features_in": self.n_features_in_,
            "mean": array(self.mean_),
            "scale": array(self.scale_),
            "sqrt_agops": [cpu(t) for t in self.sqrt_agops_],
            "weights": [cpu(t) for t in self.weights_],
            "fit_info": [dict(info, seconds=dict(info["seconds"])) for info in self.fit_info_],
            "generator": self._rng_state,
            # a distributed fit's features are per rank: resume_iter(X) replays them instead
            "train": cpu(getattr(self, "_train", None)) if self._comm.world == 1 else None,
            "y": cpu(self._y) if self._comm.world == 1 else None,
            "coef": cpu(self.coef_),
            "X_fit": cpu(self.X_fit_),
            "y_fit": cpu(self.y_fit_),
            "solver_": self.solver_,
            "centers_": array(self.centers_),
            "y_all": array(self._y_all),
            "n_total": int(self.n_total_),
            "world": int(self._comm.world),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | None = None) -> "DeepRFM":
        """Rebuild a model (fitted or mid-fit) from :meth:`state_dict`.

        Continuing on the device and dtype of the original run gives exactly its numbers.
        Checkpoints of format 1 (which also held measurement rows) are read too.

        Parameters
        ----------
        state : dict
            From :meth:`state_dict` (e.g. ``torch.load(f, weights_only=True)``).
        device : str, optional
            Override the stored device.

        Returns
        -------
        DeepRFM
        """
        fmt = state.get("format")
        if fmt not in (1, 2):
            raise ValueError(f"unknown DeepRFM checkpoint format {fmt!r}")
        params = dict(state["params"])
        if device is not None:
            params["device"] = device
        model = cls(**params)
        v = model._validated()
        model.device_, model.kernel_ = v.device, v.kernel
        model.dtype_ = parse_dtype(state["dtype_"])
        dev = model.device_

        def put(t):
            return None if t is None else t.to(dev)

        def array(t):
            return None if t is None else t.numpy()

        model.layers_done_ = int(state["layers_done"])
        classes = state["classes"]
        # format 1 stored integer classes as a tensor, format 2 as a list (labels of any kind)
        model.classes_ = (classes.numpy() if isinstance(classes, torch.Tensor)
                          else np.asarray(classes))
        model.n_features_in_ = int(state["n_features_in"])
        model.mean_ = array(state["mean"])
        model.scale_ = array(state["scale"])
        model.sqrt_agops_ = [put(t) for t in state["sqrt_agops"]]
        model.weights_ = [put(t) for t in state["weights"]]
        if fmt == 1:
            model.fit_info_ = _info_from_rows(state["history"])
        else:
            model.fit_info_ = [dict(info, seconds=dict(info["seconds"]))
                               for info in state["fit_info"]]
        model._rng_state = state["generator"]
        model._comm = current()
        model._train = put(state["train"])
        model._y = put(state["y"])
        model.solver_ = state.get("solver_", "exact")
        model.centers_ = array(state.get("centers_"))
        y_all = state.get("y_all")
        model._y_all = (y_all.numpy() if y_all is not None
                        else state["y"].numpy().astype(np.int64))
        model.n_total_ = int(state.get("n_total", len(model._y_all)))
        model._world_saved = int(state.get("world", 1))
        model.coef_ = put(state["coef"])
        model.X_fit_ = put(state["X_fit"])
        y_fit = state.get("y_fit")
        model.y_fit_ = put(y_fit) if y_fit is not None else (
            model._y if model.coef_ is not None else None)
        if model._y is not None:
            model._groups = class_groups(model._y, len(model.classes_))
        model._fit_groups = (None if model.y_fit_ is None
                             else class_groups(model.y_fit_, len(model.classes_)))
        return model

    # -- memory ---------------------------------------------------------------------------
    def memory_needed(self, n: int, d: int, k: int, n_test: int = 0, *,
                      solver: str | None = None, world: int = 1) -> int:
        """Estimated peak bytes, on one rank, of the largest layer of this model on n points of
        dimension d.

        Layer 1 works in d dimensions, layers 2..L+1 in ``width``. The exact solver:
        :func:`layer_memory`. Nyström: this rank's ⌈n/world⌉ rows (features in and normalized,
        train and test) plus :func:`agop.nystrom.nystrom_memory` with K_NC streamed. Needs no
        fit (the parameters are checked).

        Parameters
        ----------
        n, d, k : int
            Training points (all ranks), input dimension, classes.
        n_test : int
            Test points carried through the layers beside the fit.
        solver : {"exact", "nystrom"}, optional
            Default: the one ``solver`` resolves to for these sizes.
        world : int
            Processes the rows are split over (Nyström).

        Returns
        -------
        int
            Bytes.
        """
        v = self._validated()
        solver = solver or self._resolve_solver(n, d, k, world)
        if solver == "exact":
            kw = dict(n_test=n_test, dtype=v.dtype, ridge=float(self.ridge),
                      agop_method=self.agop_method, device=v.device)
            kw.pop("dtype")
            return max(layer_memory(n, d, k, self.width, dtype=self._compute_dtype(1, v.dtype),
                                    **kw),
                       layer_memory(n, self.width, k, self.width,
                                    dtype=self._compute_dtype(2, v.dtype), **kw))
        M = min(n, DEFAULT_CENTERS) if self.centers is None else int(self.centers)
        item = torch.tensor([], dtype=v.dtype).element_size()
        rows, rows_test = -(-n // world), -(-n_test // world)
        need = 0
        for D in (d, self.width):
            resident = item * (2 * (rows + rows_test) * D + rows * self.width) + 8 * rows * k
            metrics = 8 * 2 * rows * D  # a float64 copy of a stage and its residuals
            need = max(need, resident + max(metrics, nystrom_memory(
                rows, M, D, k, v.dtype, keep_knc=False, world=world)))
        return int(need)

    def check_memory(self, n: int, d: int, k: int, n_test: int = 0, *,
                     solver: str | None = None, world: int = 1) -> int:
        """Raise ``MemoryError`` (with the size needed) if a fit cannot fit on the device.

        Compares :meth:`memory_needed` with :func:`agop.backend.memory_budget` (all of the
        free memory, capped by ``$AGOP_MEMORY_GB``). Needs no fit.

        Returns
        -------
        int
            The bytes needed.
        """
        v = self._validated()
        solver = solver or self._resolve_solver(n, d, k, world)
        need = self.memory_needed(n, d, k, n_test, solver=solver, world=world)
        have = memory_budget(v.device, fraction=1.0)
        if need > have:
            if solver == "exact":
                hint = "use fewer points (--n) or solver='nystrom' (--solver nystrom)"
            else:
                hint = "use fewer centers (--centers) or more processes (torchrun)"
            raise MemoryError(
                f"Deep RFM ({solver}) on {n:,} points (dimension {d}, width {self.width}, "
                f"{k} classes, {dtype_name(v.dtype)}, {world} process(es)) needs about "
                f"{format_bytes(need)} on {v.device} per process but only "
                f"{format_bytes(have)} is free; {hint}"
            )
        return need

    # -- using the fitted model -----------------------------------------------------------
    def transform(self, X: Any, layer: int | None = None) -> Any:
        """Normalized features entering layer ``layer``.

        Parameters
        ----------
        X : array-like or torch.Tensor
            n × d raw inputs.
        layer : int, optional
            1..L+1 (None: L + 1, the final features).

        Returns
        -------
        torch.Tensor or numpy.ndarray
            n × D, compute dtype: a tensor on the device for a tensor ``X``, else numpy.
        """
        H = self._features(X, layer)
        return H if isinstance(X, torch.Tensor) else to_numpy(H)

    def _features(self, X: Any, layer: int | None = None) -> torch.Tensor:
        self._check_fitted()
        if layer is None:
            layer = self.depth + 1
        layer = check_int(layer, "layer", minimum=1)
        if layer > self.depth + 1:
            raise ValueError(f"layer must be in 1..{self.depth + 1}; got {layer}")
        with strict_fp32():
            H = normalize_rows(self.features_after(X, layer - 1), f"layer {layer} features")
            return H.to(self._compute_dtype(layer))

    def decision_function(self, X: Any) -> Any:
        """f_{L+1}(X): the outputs of the final kernel machine (±1 one-hot targets).

        Parameters
        ----------
        X : array-like or torch.Tensor
            n × d raw inputs.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            n × K, column k the output for ``classes_[k]``; for K = 2 scikit-learn's (n,)
            score of ``classes_[1]`` (the targets are ±1, so f_0 = −f_1 exactly and the score
            is positive where ``classes_[1]`` is predicted). A tensor on the model's device
            for a tensor ``X``, else numpy.
        """
        scores = self._scores(X)
        if len(self.classes_) == 2:
            scores = scores[:, 1]
        return scores if isinstance(X, torch.Tensor) else to_numpy(scores)

    def _scores(self, X: Any) -> torch.Tensor:
        H = self._features(X)
        with strict_fp32():
            if self.solver_ == "nystrom":
                return nystrom_predict(self.kernel_, H, self.X_fit_, self.coef_,
                                       groups=self._fit_groups)
            return kernel_predict(self.kernel_, H, self.X_fit_, self.coef_, self._fit_groups,
                                  dtype=parse_dtype(self.fit_info_[-1]["kernel_dtype"]))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (n,) from ``classes_``: the class with the largest output of f_{L+1}."""
        idx = to_numpy(self._scores(X).argmax(dim=1))
        return self.classes_[idx]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy of :meth:`predict` on (X, y); a label not seen in training counts as wrong."""
        from sklearn.metrics import accuracy_score
        from sklearn.utils.validation import column_or_1d

        return float(accuracy_score(column_or_1d(to_numpy(y)), self.predict(X),
                                    sample_weight=sample_weight))


def _float64(X: Any, device: torch.device | None = None) -> torch.Tensor:
    """X as a float64 tensor (a read-only array, e.g. a memory map, is copied first)."""
    a = to_numpy(X)
    if not a.flags.writeable:
        a = np.array(a, dtype=np.float64)  # torch wants writable memory; the same values
    return torch.as_tensor(a, dtype=torch.float64, device=device)


def _on(groups: list[torch.Tensor] | None, device: torch.device) -> list[torch.Tensor] | None:
    return None if groups is None else [g.to(device) for g in groups]


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(dim=1) == y).double().mean())


def _info_from_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer fit information from the measurement rows of a format-1 checkpoint."""
    out = []
    for r in rows:
        if r.get("stage") == "input":
            info = {k: r.get(k) for k in FIT_INFO if k != "seconds"}
            info["agop_fallback"] = bool(info["agop_fallback"])
            info["seconds"] = {k: r[f"seconds_{k}"] for k in STEPS
                               if r.get(f"seconds_{k}") is not None}
            out.append(info)
    return out
