"""Deep Recursive Feature Machine (Algorithm 1): layer primitives and the estimator.

One layer l (rows are samples, so M^{1/2} X in the paper's column convention is X M^{1/2} here):

1. normalize every sample to unit norm;
2. α_l = (k(X_l, X_l) + μI)⁻¹ Y  (Laplace kernel, μ = 0: ridgeless);
3. M_l = AGOP of f_l(x) = Σⱼ α_{l,j} k(x, x_j) over the training points (self terms dropped);
4. X_{l+1} = σ(X_l M_l^{1/2} W_lᵀ), W_l ∈ R^{width × D} random.

After L layers the features are normalized and solved once more (layer L + 1).

Scale of M: the authors' code divides M by its largest entry and the AGOP here carries the
1/N of Section 3.3. Neither can change a result: M → cM gives X M^{1/2} → √c X M^{1/2} and,
ReLU being positively homogeneous, σ(√c Z Wᵀ) = √c σ(Z Wᵀ), which the next normalization
removes; every collapse metric is a ratio or a cosine, so the "agop" and "features" stages
measure the same too. Only rounding differs, so there is no option for it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from agop._validate import as_labels, check_int, check_matrix, check_positive, to_numpy
from agop.agop import METHODS as AGOP_METHODS
from agop.agop import kernel_agop, resolve_method
from agop.backend import (dtype_name, format_bytes, memory_budget, parse_dtype, plan_rows,
                          resolve_device, strict_fp32, synchronize)
from agop.kernels import KERNELS, RadialKernel, class_groups, get_kernel, pairwise_distances
from agop.linalg import psd_power
from agop.solve import kernel_ridge, signed_one_hot

FEATURES = ("gaussian", "uniform")
STEPS = ("kernel", "solve", "agop", "sqrt", "features", "predict", "metrics")


# ----------------------------------------------------------------------------- layer primitives
def normalize_rows(X: torch.Tensor, name: str = "X") -> torch.Tensor:
    """Each row scaled to unit Euclidean norm (Algorithm 1, "normalize the data").

    A row of zeros has no direction: it raises ``ValueError`` naming the first such row.
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

    ``"gaussian"``: i.i.d. N(0, 2/width), Proposition 5.1's scaling (E‖σ(Wx)‖² = ‖x‖²).
    ``"uniform"``: U(−1/√d_in, 1/√d_in), PyTorch's ``nn.Linear`` default, which the authors'
    scripts used.
    """
    if kind == "gaussian":
        return torch.randn(width, d_in, generator=generator, dtype=torch.float64) * (2.0 / width) ** 0.5
    if kind == "uniform":
        bound = 1.0 / d_in**0.5
        return (torch.rand(width, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    raise ValueError(f"features must be one of {FEATURES}; got {kind!r}")


@dataclass
class LayerFit:
    """What one Deep RFM layer learned from normalized inputs X (N × D)."""

    coef: torch.Tensor  # α, N × K (in solve_dtype)
    agop: torch.Tensor | None  # M, D × D (compute dtype); None for the final solve
    sqrt_agop: torch.Tensor | None  # M^{1/2}, D × D, float64; None for the final solve
    jitter: float
    solve_dtype: str
    kernel_dtype: str  # dtype the kernel matrix was built in (float64 after a fallback)
    fitted: torch.Tensor  # f_l(X) at the training points, N × K
    seconds: dict[str, float] = field(default_factory=dict)
    agop_info: dict[str, Any] = field(default_factory=dict)  # kernel_agop's method and precision
    distances: torch.Tensor | None = None  # N × N, kept for the AGOP's gram form


def distance_matrix(X: torch.Tensor, groups: list[torch.Tensor] | None = None) -> torch.Tensor:
    """‖x_i − x_j‖ for all rows of X, N × N, built in row chunks (peak N² plus one chunk).

    Self-distances are exactly 0 (by index). ``groups``: distances about each class's mean
    (:func:`agop.kernels.pairwise_distances`).
    """
    N = X.shape[0]
    item = X.element_size()
    # a chunk's temporaries (~3 rows·N) stay under 3/4 of the matrix, so the build peaks
    # below 1.75 N² however much memory is free
    rows = min(plan_rows(3 * N * item, N, X.device, fixed_bytes=N * N * item), max(1, N // 4))
    dist = torch.empty((N, N), dtype=X.dtype, device=X.device)
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        dist[i0:i1] = pairwise_distances(X[i0:i1], X, diagonal_offset=i0, groups=groups)
    return dist


def kernel_matrix(kernel: RadialKernel, X: torch.Tensor,
                  groups: list[torch.Tensor] | None = None) -> torch.Tensor:
    """k(X, X), N × N, from :func:`distance_matrix` in place (the diagonal is exactly k(0) = 1)."""
    return _kernel_in_place(kernel, distance_matrix(X, groups))


def _kernel_in_place(kernel: RadialKernel, dist: torch.Tensor) -> torch.Tensor:
    rows = max(1, dist.shape[0] // 8)  # bounded temporaries
    for i0 in range(0, dist.shape[0], rows):
        dist[i0:i0 + rows] = kernel.from_distances(dist[i0:i0 + rows])
    return dist


def kernel_predict(kernel: RadialKernel, P: torch.Tensor, centers: torch.Tensor,
                   coef: torch.Tensor, groups: list[torch.Tensor] | None = None) -> torch.Tensor:
    """f(P) = k(P, C) α (n × K) for points P (n × D), centers C (N × D), α (N × K), in row chunks.

    Computed in the dtype of ``coef`` (the dtype the solve succeeded in).
    """
    dtype = coef.dtype
    P, centers = P.to(dtype), centers.to(dtype)
    n, N = P.shape[0], centers.shape[0]
    rows = plan_rows(4 * N * centers.element_size(), max(n, 1), P.device)
    out = torch.empty((n, coef.shape[1]), dtype=dtype, device=P.device)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        out[i0:i1] = kernel(P[i0:i1], centers, groups=groups) @ coef
    return out


def solve_layer(X: torch.Tensor, Y: torch.Tensor, kernel: RadialKernel, ridge: float = 0.0,
                groups: list[torch.Tensor] | None = None,
                keep_distances: bool = False) -> LayerFit:
    """Step 2 of Algorithm 1 on normalized inputs ``X`` (N × D), targets ``Y`` (N × K).

    The kernel matrix is built and factored in X's dtype (float32 by default), retried in
    float64 by :func:`agop.solve.kernel_ridge` if that fails. If the float32 matrix itself is
    not positive definite (its entries are off by more than λ_min), it is rebuilt from the
    features in float64 and solved there with kernel_ridge's jitter ladder. What was used is
    returned (``kernel_dtype``, ``solve_dtype``, ``jitter``). Returns a :class:`LayerFit`
    without AGOP; the kernel matrix and its factor are freed. ``keep_distances``: keep the
    N × N distance matrix in ``LayerFit.distances`` (for the AGOP's gram form; N² more memory).
    """
    seconds = {}
    t = time.perf_counter()
    dist = distance_matrix(X, groups) if keep_distances else None
    Kmat = kernel.from_distances(dist) if keep_distances else kernel_matrix(kernel, X, groups)
    synchronize(X.device)
    seconds["kernel"] = time.perf_counter() - t

    t = time.perf_counter()
    kernel_dtype = X.dtype
    if X.dtype == torch.float64:
        sol = kernel_ridge(Kmat, Y, ridge)
    else:
        try:
            sol = kernel_ridge(Kmat, Y, ridge, max_tries=0)
        except ValueError:  # inputs are finite, so the factorization failed (float32 and float64)
            del Kmat
            kernel_dtype = torch.float64
            Kmat = kernel_matrix(kernel, X.to(kernel_dtype), groups)
            sol = kernel_ridge(Kmat, Y.to(kernel_dtype), ridge)
    del Kmat
    fitted = sol.fitted()
    sol.factor = None  # the N × N factor is not needed any more
    synchronize(X.device)
    seconds["solve"] = time.perf_counter() - t
    return LayerFit(coef=sol.coef, agop=None, sqrt_agop=None, jitter=sol.jitter,
                    solve_dtype=sol.dtype, kernel_dtype=dtype_name(kernel_dtype),
                    fitted=fitted, seconds=seconds, distances=dist)


def fit_layer(X: torch.Tensor, Y: torch.Tensor, kernel: RadialKernel, ridge: float = 0.0,
              agop_method: str = "auto", groups: list[torch.Tensor] | None = None,
              try_float32: bool = True) -> LayerFit:
    """Steps 2–3 of Algorithm 1 and M^{1/2} on normalized ``X`` (N × D), targets ``Y`` (N × K).

    Solve as :func:`solve_layer`; the AGOP is computed in X's dtype (α cast to it) and M^{1/2}
    in float64. Seconds per step are recorded (with a device synchronization so GPU times are
    real).
    """
    N, D = X.shape
    method = resolve_method(agop_method, N, N, Y.shape[1], D, True)
    # the gram form needs the distances the kernel matrix is made of: keep them if they fit
    keep = method == "gram" and 3 * N * N * X.element_size() <= memory_budget(X.device)
    fit = solve_layer(X, Y, kernel, ridge, groups, keep_distances=keep)
    t = time.perf_counter()
    fit.agop = kernel_agop(kernel, X, fit.coef.to(X.dtype), method=method, groups=groups,
                           info=fit.agop_info, distances=fit.distances, try_float32=try_float32)
    fit.distances = None
    synchronize(X.device)
    fit.seconds["agop"] = time.perf_counter() - t

    t = time.perf_counter()
    fit.sqrt_agop = psd_power(fit.agop, 0.5)
    synchronize(X.device)
    fit.seconds["sqrt"] = time.perf_counter() - t
    return fit


def apply_layer(X: torch.Tensor, sqrt_agop: torch.Tensor,
                W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X M^{1/2}, σ(X M^{1/2} Wᵀ)) for normalized X (N × D): the "agop" and "features" stages."""
    Z = X @ sqrt_agop.to(X.dtype)
    return Z, torch.relu(Z @ W.to(X.dtype).T)


# ----------------------------------------------------------------------------- memory
def layer_memory(n: int, d: int, k: int, width: int, *, n_test: int = 0,
                 dtype: torch.dtype = torch.float32, ridge: float = 0.0,
                 agop_method: str = "auto", device: str | torch.device = "cpu") -> int:
    """Estimated peak bytes of one Deep RFM layer: n points of dimension d, K classes.

    The peak is the resident features plus the largest of the layer's phases:

    - kernel + solve: k(X, X) and its Cholesky factor, 2n² (+ n² with a ridge, added to a
      copy, + n² for the distances kept for the gram form); building k(X, X) in row chunks of
      at most n/4 stays below 1.75n²;
    - AGOP: the ``"gram"`` form holds W and W² in float64 (:func:`agop.kernel_agop` plans with
      3n²) plus row chunks; the ``"direct"`` form is chunked to the free memory and needs
      2n·d + d² plus a chunk of rows (counted as min(n, 64));
    - features: X M^{1/2} and σ(X M^{1/2} Wᵀ) for train and test points;
    - metrics: a float64 copy of a stage and its class-grouped residuals, on the device.

    Not reserved: a float32 Cholesky that fails is retried in float64, which needs up to
    20n² bytes (the float32 matrix, its float64 copy and factor).
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
    """What :meth:`DeepRFM.fit_iter` yields after each layer l = 1..L+1.

    ``rows``: the history entries this layer added; ``inputs``: the normalized training
    features entering layer l (N × D, compute dtype, on the device).
    """

    layer: int
    rows: list[dict[str, Any]]
    inputs: torch.Tensor


_PARAMS = ("depth", "bandwidth", "width", "ridge", "features", "seed", "device", "kernel",
           "dtype", "agop_method")


class DeepRFM:
    """Deep Recursive Feature Machine (Algorithm 1), measured stage by stage (Section 5.1).

    Parameters (stored as given; checked by :meth:`fit`):
        depth: L ≥ 1, the number of AGOP layers; a final kernel solve (layer L + 1) follows.
        bandwidth: L of the kernel (Appendix C: 2.0).
        width: rows of each random matrix W_l (the paper: 512).
        ridge: μ ≥ 0 (the paper: 0, ridgeless; the authors' code effectively used 1e-3).
        features: ``"gaussian"`` (W i.i.d. N(0, 2/width), Proposition 5.1) or ``"uniform"``
            (``nn.Linear``'s default, as the authors' scripts did).
        seed: seeds the CPU generator all W_l are drawn from, so every device gets the same W.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        kernel: ``"laplace"`` (the paper) or ``"gaussian"``.
        dtype: compute dtype for kernels, solves and AGOPs; ``"auto"`` is
            :func:`agop.backend.default_dtype` of the device. M^{1/2} and metrics are float64.
        agop_method: ``"auto"``, ``"direct"`` or ``"gram"`` (see :func:`agop.kernel_agop`).

    Preprocessing (as the authors did): each input feature is standardized with training
    statistics, (x − ``mean_``)/``scale_`` (population std); a feature constant in training
    (``scale_`` 0) is set to 0. Targets are ±1 one-hot over ``classes_``.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``mean_``, ``scale_`` (float64 numpy),
    ``sqrt_agops_`` (L tensors M_l^{1/2}, float64), ``weights_`` (L tensors W_l, float64),
    ``coef_`` (α_{L+1}, N × K, in the dtype its solve succeeded in), ``X_fit_`` (normalized
    training features of layer L + 1) and ``y_fit_`` (their class indices),
    ``history_`` (one dict per layer and stage), ``layers_done_``, ``device_``, ``dtype_``.
    """

    def __init__(self, depth: int, bandwidth: float = 2.0, width: int = 512, ridge: float = 0.0,
                 features: str = "gaussian", seed: int = 0, device: str = "auto",
                 kernel: str = "laplace", dtype: str = "auto", agop_method: str = "auto"):
        self.depth = depth
        self.bandwidth = bandwidth
        self.width = width
        self.ridge = ridge
        self.features = features
        self.seed = seed
        self.device = device
        self.kernel = kernel
        self.dtype = dtype
        self.agop_method = agop_method

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters (scikit-learn convention)."""
        return {p: getattr(self, p) for p in _PARAMS}

    def set_params(self, **params: Any) -> "DeepRFM":
        """Set constructor parameters (scikit-learn convention); unknown names raise ValueError."""
        for name, value in params.items():
            if name not in _PARAMS:
                raise ValueError(f"DeepRFM has no parameter {name!r}; parameters: {_PARAMS}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in _PARAMS)
        return f"DeepRFM({args})"

    # -- checks ---------------------------------------------------------------------------
    def _check_params(self) -> None:
        check_int(self.depth, "depth", minimum=1)
        check_positive(self.bandwidth, "bandwidth")
        check_int(self.width, "width", minimum=1)
        check_positive(self.ridge, "ridge", allow_zero=True)
        check_int(self.seed, "seed", minimum=0)
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}; got {self.features!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {tuple(KERNELS)}; got {self.kernel!r}")
        if self.agop_method not in AGOP_METHODS:
            raise ValueError(f"agop_method must be one of {AGOP_METHODS}; got {self.agop_method!r}")
        self.device_ = resolve_device(self.device)
        self.dtype_ = parse_dtype(self.dtype, self.device_)
        self.kernel_ = get_kernel(self.kernel, self.bandwidth)

    def _check_fitted(self) -> None:
        if getattr(self, "coef_", None) is None:
            raise ValueError(
                "this DeepRFM is not fitted yet (or its fit was interrupted); call fit first"
            )

    def _labels(self, y: Any, n: int, name: str) -> np.ndarray:
        """Validate labels and map them to indices into ``classes_`` (−1: not a training class,
        which no prediction can match)."""
        arr, _ = as_labels(y, n, name=name, min_classes=1, require_all=False)
        idx = np.searchsorted(self.classes_, arr)
        K = len(self.classes_)
        seen = (idx < K) & (self.classes_[np.minimum(idx, K - 1)] == arr)
        return np.where(seen, idx, -1)

    def _standardize(self, X: Any, name: str) -> torch.Tensor:
        """(X − mean_)/scale_ in float64, then cast to the compute dtype on the device.

        Rows are normalized where each layer starts, exactly as during the fit, so that
        :meth:`transform` reproduces the fit's features bit for bit.
        """
        X = _as_array(X)
        check_matrix(X, name)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"{name} has {X.shape[1]} feature(s) per sample but the model was fitted on "
                f"{self.n_features_in_}"
            )
        X64 = torch.as_tensor(to_numpy(X), dtype=torch.float64, device=self.device_)
        mean = torch.as_tensor(self.mean_, device=self.device_)
        scale = torch.as_tensor(self.scale_, device=self.device_)
        inv = torch.where(scale > 0, 1.0 / scale.clamp(min=torch.finfo(torch.float64).tiny),
                          torch.zeros_like(scale))
        Z = ((X64 - mean) * inv).to(self.dtype_)
        normalize_rows(Z, f"{name} after standardization")  # a zero row raises here, up front
        return Z

    # -- fitting --------------------------------------------------------------------------
    def fit(self, X: Any, y: Any, X_test: Any = None, y_test: Any = None) -> "DeepRFM":
        """Run Algorithm 1 on X (N × d) with labels y (N); with test data, record f_l's accuracy.

        Returns self. See :meth:`fit_iter` for a layer-by-layer version.
        """
        for _ in self.fit_iter(X, y, X_test, y_test):
            pass
        return self

    def fit_iter(self, X: Any, y: Any, X_test: Any = None, y_test: Any = None) -> Iterator[LayerStep]:
        """Check the input and return a generator that fits one layer per step.

        It yields a :class:`LayerStep` after each layer l = 1..L+1; between steps
        :meth:`state_dict` is a checkpoint from which :meth:`from_state_dict` and
        :meth:`resume_iter` continue with exactly the same numbers. Input errors and a run
        that cannot fit in memory raise here, before any layer runs.
        """
        self._check_params()
        X, X_test = _as_array(X), None if X_test is None else _as_array(X_test)
        check_matrix(X, "X", min_rows=2)
        N = X.shape[0]
        labels, _ = as_labels(y, N, name="y", min_classes=2, require_all=False)
        if (X_test is None) != (y_test is None):
            raise ValueError("X_test and y_test must be given together (test accuracy needs both)")
        self.classes_ = np.unique(labels)
        self.n_features_in_ = int(X.shape[1])
        y_idx = self._labels(labels, N, "y")
        yte_idx = None
        if X_test is not None:
            check_matrix(X_test, "X_test")
            yte_idx = self._labels(y_test, X_test.shape[0], "y_test")
        n_test = 0 if X_test is None else int(X_test.shape[0])
        self.check_memory(N, self.n_features_in_, len(self.classes_), n_test)

        X64 = torch.as_tensor(to_numpy(X), dtype=torch.float64)
        self.mean_ = X64.mean(dim=0).numpy()
        self.scale_ = X64.std(dim=0, correction=0).numpy()
        del X64
        self.sqrt_agops_, self.weights_ = [], []
        self.coef_ = self.X_fit_ = self.y_fit_ = None
        self.history_ = []
        self.layers_done_ = 0
        self._generator = torch.Generator().manual_seed(int(self.seed))
        self._train = self._standardize(X, "X")
        self._test = None if X_test is None else self._standardize(X_test, "X_test")
        self._y = torch.as_tensor(y_idx, device=self.device_)
        self._groups = class_groups(self._y, len(self.classes_))
        self._y_test = None if yte_idx is None else torch.as_tensor(yte_idx, device=self.device_)
        return self._run()

    def resume_iter(self) -> Iterator[LayerStep]:
        """Continue a fit restored by :meth:`from_state_dict` (a generator like :meth:`fit_iter`)."""
        if getattr(self, "_train", None) is None and self.layers_done_ <= self.depth:
            raise ValueError("nothing to resume: this DeepRFM holds no fit in progress")
        return self._run()

    def _run(self) -> Iterator[LayerStep]:
        with strict_fp32():
            while self.layers_done_ <= self.depth:
                yield self._step()

    def _step(self) -> LayerStep:
        l = self.layers_done_ + 1
        final = l == self.depth + 1
        kernel, dev = self.kernel_, self.device_
        Xn = normalize_rows(self._train, f"layer {l} training features")
        Xte = None if self._test is None else normalize_rows(self._test, f"layer {l} test features")
        Y = signed_one_hot(self._y, len(self.classes_), self.dtype_)

        groups = self._groups
        if final:
            fit = solve_layer(Xn, Y, kernel, self.ridge, groups)
        else:
            # classes only collapse further: once the float32 gram form was refused, skip it
            refused = any(r.get("agop_fallback") for r in self.history_)
            fit = fit_layer(Xn, Y, kernel, self.ridge, self.agop_method, groups,
                            try_float32=not refused)
        seconds = dict(fit.seconds)
        train_acc = _accuracy(fit.fitted, self._y)
        test_acc = None
        if Xte is not None:
            t = time.perf_counter()
            test_acc = _accuracy(kernel_predict(kernel, Xte, Xn, fit.coef, groups), self._y_test)
            synchronize(dev)
            seconds["predict"] = time.perf_counter() - t

        stages = {"input": Xn}
        if not final:
            W = random_weights(self.width, Xn.shape[1], self.features, self._generator).to(dev)
            t = time.perf_counter()
            stages["agop"], stages["features"] = apply_layer(Xn, fit.sqrt_agop, W)
            next_test = None if Xte is None else apply_layer(Xte, fit.sqrt_agop, W)[1]
            synchronize(dev)
            seconds["features"] = time.perf_counter() - t

        t = time.perf_counter()
        metrics = {s: _measure(H, self._y, len(self.classes_)) for s, H in stages.items()}
        seconds["metrics"] = time.perf_counter() - t

        N, D = Xn.shape
        common = {
            "train_acc": train_acc,
            "test_acc": test_acc,
            "jitter": fit.jitter,
            "solve_dtype": fit.solve_dtype,
            "kernel_dtype": fit.kernel_dtype,
            "dtype": dtype_name(self.dtype_),
            "agop_method": fit.agop_info.get("method"),
            "agop_precision": fit.agop_info.get("precision"),
            "agop_fallback": bool(fit.agop_info.get("fallback")),
            "n": N,
            "dim": D,
            # Algorithm 1's own work; test predictions and metrics are measurement
            "seconds": sum(v for k, v in seconds.items() if k not in ("predict", "metrics")),
            **{f"seconds_{k}": seconds.get(k) for k in STEPS},
        }
        rows = [{"layer": l, "stage": s, **metrics[s], **common} for s in stages]

        if final:
            self.coef_ = fit.coef
            self.X_fit_ = Xn
            self.y_fit_ = self._y
            self._train = self._test = None
        else:
            self.sqrt_agops_.append(fit.sqrt_agop)
            self.weights_.append(W)
            self._train, self._test = stages["features"], next_test
        self.history_.extend(rows)
        self.layers_done_ = l
        return LayerStep(layer=l, rows=rows, inputs=Xn)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the fit (or use the fitted model), as CPU tensors.

        Valid between the steps of :meth:`fit_iter`; safe for ``torch.load(weights_only=True)``.
        """
        if not hasattr(self, "layers_done_"):
            raise ValueError("this DeepRFM has not started fitting; nothing to save")

        def cpu(t):
            return None if t is None else t.detach().cpu()

        return {
            "format": 1,
            "params": {p: str(v) if p in ("device", "dtype") else v
                       for p, v in self.get_params().items()},
            "dtype_": dtype_name(self.dtype_),
            "layers_done": self.layers_done_,
            "classes": torch.as_tensor(self.classes_),
            "n_features_in": self.n_features_in_,
            "mean": torch.as_tensor(self.mean_),
            "scale": torch.as_tensor(self.scale_),
            "sqrt_agops": [cpu(t) for t in self.sqrt_agops_],
            "weights": [cpu(t) for t in self.weights_],
            "history": [dict(r) for r in self.history_],
            "generator": self._generator.get_state(),
            "train": cpu(getattr(self, "_train", None)),
            "test": cpu(getattr(self, "_test", None)),
            "y": cpu(getattr(self, "_y", None)),
            "y_test": cpu(getattr(self, "_y_test", None)),
            "coef": cpu(self.coef_),
            "X_fit": cpu(self.X_fit_),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: str | None = None) -> "DeepRFM":
        """Rebuild a model (fitted or mid-fit) from :meth:`state_dict` (``device``: override).

        Continuing on the device and dtype of the original run gives exactly its numbers.
        """
        if state.get("format") != 1:
            raise ValueError(f"unknown DeepRFM checkpoint format {state.get('format')!r}")
        params = dict(state["params"])
        if device is not None:
            params["device"] = device
        model = cls(**params)
        model._check_params()
        model.dtype_ = parse_dtype(state["dtype_"], model.device_)
        dev = model.device_

        def put(t):
            return None if t is None else t.to(dev)

        model.layers_done_ = int(state["layers_done"])
        model.classes_ = state["classes"].numpy()
        model.n_features_in_ = int(state["n_features_in"])
        model.mean_ = state["mean"].numpy()
        model.scale_ = state["scale"].numpy()
        model.sqrt_agops_ = [put(t) for t in state["sqrt_agops"]]
        model.weights_ = [put(t) for t in state["weights"]]
        model.history_ = [dict(r) for r in state["history"]]
        model._generator = torch.Generator()
        model._generator.set_state(state["generator"])
        for name in ("train", "test", "y", "y_test"):
            setattr(model, f"_{name}", put(state[name]))
        model.coef_ = put(state["coef"])
        model.X_fit_ = put(state["X_fit"])
        model.y_fit_ = model._y if model.coef_ is not None else None
        model._groups = class_groups(model._y, len(model.classes_))
        return model

    # -- memory ---------------------------------------------------------------------------
    def memory_needed(self, n: int, d: int, k: int, n_test: int = 0) -> int:
        """Estimated peak bytes of the largest layer of this model on n points of dimension d.

        Layer 1 works in d dimensions, layers 2..L+1 in ``width``; see :func:`layer_memory`.
        """
        if not hasattr(self, "dtype_"):
            self._check_params()
        kw = dict(n_test=n_test, dtype=self.dtype_, ridge=float(self.ridge),
                  agop_method=self.agop_method, device=self.device_)
        return max(layer_memory(n, d, k, self.width, **kw),
                   layer_memory(n, self.width, k, self.width, **kw))

    def check_memory(self, n: int, d: int, k: int, n_test: int = 0) -> int:
        """Raise ``MemoryError`` (with the size needed) if a fit cannot fit on the device.

        Compares :meth:`memory_needed` with :func:`agop.backend.memory_budget` (all of the
        free memory, capped by ``$AGOP_MEMORY_GB``). Returns the bytes needed.
        """
        need = self.memory_needed(n, d, k, n_test)
        have = memory_budget(self.device_, fraction=1.0)
        if need > have:
            raise MemoryError(
                f"Deep RFM on {n:,} points (dimension {d}, width {self.width}, {k} classes, "
                f"{dtype_name(self.dtype_)}) needs about {format_bytes(need)} on {self.device_} "
                f"but only {format_bytes(have)} is free; use fewer points (--n)"
            )
        return need

    # -- using the fitted model -----------------------------------------------------------
    def transform(self, X: Any, layer: int | None = None) -> torch.Tensor:
        """Normalized features entering layer ``layer`` (1..L+1; None: L+1, the final ones).

        X: n × d raw inputs. Returns an n × D tensor (compute dtype, on the device).
        """
        self._check_fitted()
        if layer is None:
            layer = self.depth + 1
        layer = check_int(layer, "layer", minimum=1)
        if layer > self.depth + 1:
            raise ValueError(f"layer must be in 1..{self.depth + 1}; got {layer}")
        with strict_fp32():
            H = self._standardize(X, "X")
            for j in range(layer - 1):
                H = apply_layer(normalize_rows(H, f"layer {j + 1} features"),
                                self.sqrt_agops_[j], self.weights_[j])[1]
            return normalize_rows(H, f"layer {layer} features")

    def decision_function(self, X: Any) -> torch.Tensor:
        """f_{L+1}(X): the n × K outputs of the final kernel machine (±1 targets)."""
        H = self.transform(X)
        with strict_fp32():
            return kernel_predict(self.kernel_, H, self.X_fit_, self.coef_, self._groups)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (n,), the class with the largest output of f_{L+1}."""
        scores = self.decision_function(X)
        return self.classes_[to_numpy(scores.argmax(dim=1))]

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of :meth:`predict` on (X, y) (a label not seen in training counts as wrong)."""
        X = _as_array(X)
        yy = self._labels(y, X.shape[0], "y")
        return float(np.mean(to_numpy(self.decision_function(X).argmax(dim=1)) == yy))


def _as_array(X: Any) -> Any:
    """A tensor stays as is (on its device); anything else becomes a numpy array."""
    return X if isinstance(X, torch.Tensor) else np.asarray(X)


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(dim=1) == y).double().mean())


def _measure(H: torch.Tensor, y: torch.Tensor, K: int) -> dict[str, float]:
    from agop.collapse import measure

    return measure(H, y, num_classes=K)
