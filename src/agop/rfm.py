"""Deep Recursive Feature Machine (Algorithm 1) and the ``agop rfm`` experiment.

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
from agop.runs import metric_float
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


# ----------------------------------------------------------------------------- the experiment
RFM_DEFAULTS: dict[str, Any] = {
    "dataset": "digits", "n": None, "test_n": None, "depth": 10, "bandwidth": 2.0,
    "width": 512, "ridge": 0.0, "features": "gaussian", "seed": 0, "device": "auto",
    "dtype": "auto", "data_dir": None,
}
# settings that may differ when a run is resumed (the device changes numbers by rounding only)
_FREE_ON_RESUME = ("data_dir", "device")
TEST_N_DEFAULT = 1000  # test_n=None: up to this many test points
GRAM_POINTS = 500  # class-balanced training subset whose Gram matrices are kept (Figure 2)
GRAM_PANELS = 6


def gram_layers(depth: int, panels: int = GRAM_PANELS) -> list[int]:
    """The layers (1..depth+1) whose input Gram matrices are kept: evenly spaced, first and last."""
    return sorted({int(round(v)) for v in np.linspace(1, depth + 1, min(panels, depth + 1))})


def gram_subset(y: np.ndarray, num_classes: int, points: int = GRAM_POINTS) -> np.ndarray:
    """Indices of the first ⌊points/K⌋ training points of each class (file order), sorted."""
    per = max(1, points // num_classes)
    return np.sort(np.concatenate([np.flatnonzero(y == c)[:per] for c in range(num_classes)]))


def _load_data(dataset: str, n: int | None, test_n: int | None, data_dir: Any):
    from agop import datasets

    train = datasets.load(dataset, "train", n=n, root=data_dir)
    if test_n == 0:
        return train, None
    have = datasets.count(dataset, "test", data_dir)  # from the headers: read only what is used
    if have is None and test_n is None:  # the default asks for test points only where there are some
        return train, None
    want = test_n if test_n is not None else min(TEST_N_DEFAULT, have)
    return train, datasets.load(dataset, "test", n=want, root=data_dir)


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    first = ["layer", "stage", "nc1", "nc2"]
    return first + [k for k in rows[0] if k not in first] if rows else first


def _save_gram(run: Any, layer: int, H: torch.Tensor, y: np.ndarray) -> None:
    import io

    from agop.collapse import gram
    from agop.runs import atomic_write_bytes

    G, order = gram(H, y)
    buf = io.BytesIO()
    np.savez(buf, gram=G.astype(np.float32), labels=y[order])
    atomic_write_bytes(run.path / "gram" / f"layer_{layer:03d}.npz", buf.getvalue())


def load_grams(path: Any) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The stored Gram matrices of a run folder: (layer, G, labels in G's order), by layer."""
    from pathlib import Path

    out = []
    for f in sorted((Path(path) / "gram").glob("layer_*.npz")):
        with np.load(f, allow_pickle=False) as z:
            out.append((int(f.stem.split("_")[1]), z["gram"], z["labels"]))
    return out


def _positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers of a Deep RFM run from its metrics rows (Figures 3, 6; Section 5.2).

    ``rows``: ``agop rfm`` metrics rows (``layer`` from 1, ``stage`` in input/agop/features,
    ``nc1``, ``nc2``, ``train_acc``, ``test_acc``). With m the last layer that has an input row
    (L + 1 for a finished run), log NC1(X_1) − log NC1(X_m) is the sum over l < m of three
    steps: input → agop (M^{1/2}), agop → features (random features and ReLU), features → next
    input (row normalization); ``share_*`` is each step's sum over that total (a negative share
    raised NC1). Counts are over the layers with both stages.
    """
    by = {(r.get("layer"), r.get("stage")): r for r in rows}
    inputs = sorted(l for l, s in by if s == "input")
    if not inputs:
        return {}
    m = inputs[-1]
    nc1 = {k: metric_float(r.get("nc1")) for k, r in by.items()}
    staged = [l for l in range(1, m) if all((l, s) in by for s in ("input", "agop", "features"))
              and (l + 1, "input") in by]
    out: dict[str, Any] = {
        "layers": len([l for l in inputs if (l, "agop") in by]),
        "last_layer": m,
        "nc1_first": nc1[(inputs[0], "input")],
        "nc1_last": nc1[(m, "input")],
        "nc2_first": metric_float(by[(inputs[0], "input")].get("nc2")),
        "nc2_last": metric_float(by[(m, "input")].get("nc2")),
        "train_acc": metric_float(by[(m, "input")].get("train_acc")),
        "test_acc": metric_float(by[(m, "input")].get("test_acc")),
    }
    out["nc1_reduction"] = (out["nc1_first"] / out["nc1_last"]
                            if _positive(out["nc1_first"], out["nc1_last"]) else math.nan)
    both = [l for l in inputs if (l, "agop") in by]
    out["agop_below_input"] = sum(nc1[(l, "agop")] < nc1[(l, "input")] for l in both)
    with_features = [l for l in both if (l, "features") in by]
    out["features_not_below_agop"] = sum(nc1[(l, "features")] >= nc1[(l, "agop")]
                                         for l in with_features)
    out["layers_with_features"] = len(with_features)
    values = [nc1[(l, s)] for l in staged for s in ("input", "agop", "features")]
    if staged and staged == list(range(1, m)) and _positive(*values, out["nc1_last"]):
        lg = {k: math.log(v) for k, v in nc1.items() if _positive(v)}
        total = lg[(1, "input")] - lg[(m, "input")]
        steps = {
            "agop": sum(lg[(l, "input")] - lg[(l, "agop")] for l in staged),
            "features": sum(lg[(l, "agop")] - lg[(l, "features")] for l in staged),
            "normalize": sum(lg[(l, "features")] - lg[(l + 1, "input")] for l in staged),
        }
        for k, v in steps.items():  # a share of an increase would read backwards
            out[f"share_{k}"] = v / total if total > 0 else math.nan
    else:
        out.update(share_agop=math.nan, share_features=math.nan, share_normalize=math.nan)
    return out


def gram_summary(grams: list[tuple[int, np.ndarray, np.ndarray]],
                 num_classes: int | None = None) -> dict[str, Any] | None:
    """The last stored Gram matrix (Figure 2) against the collapsed one: mean same-class and
    other-class entries (ideal 1 and −1/(K−1)) and the RMS distance. None without Grams."""
    if not grams:
        return None
    layer, G, labels = grams[-1]
    K = num_classes or len(np.unique(labels))
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    ideal = np.where(same, 1.0, -1.0 / (K - 1))
    return {
        "layer": layer,
        "points": int(len(labels)),
        "same_class_mean": float(G[same & off].mean()),
        "other_class_mean": float(G[~same].mean()),
        "other_class_ideal": -1.0 / (K - 1),
        "rms_from_collapsed": float(np.sqrt(np.mean((G - ideal)[off] ** 2))),
    }


def summarize(rows: list[dict[str, Any]], grams: list[tuple[int, np.ndarray, np.ndarray]],
              num_classes: int) -> dict[str, Any]:
    """summary.json of a finished run: :func:`headline` under the run's names, the seconds,
    the precision fallbacks and :func:`gram_summary`."""
    h = headline(rows)
    depth = h["last_layer"] - 1
    inputs = [r for r in rows if r["stage"] == "input"]
    out: dict[str, Any] = {
        "depth": depth,
        "nc1_first_input": h["nc1_first"],
        "nc1_last_input": h["nc1_last"],
        "nc1_reduction": h["nc1_reduction"],
        **{k: h[k] for k in ("share_agop", "share_features", "share_normalize")},
        "layers_agop_below_input": h["agop_below_input"],
        "layers_features_not_below_agop": h["features_not_below_agop"],
        "nc2_first_input": h["nc2_first"],
        "nc2_last_input": h["nc2_last"],
        "final_train_acc": h["train_acc"],
        "final_test_acc": inputs[-1]["test_acc"],
        "layer_seconds": sum(r["seconds"] for r in inputs),
        "metric_seconds": sum(r["seconds_metrics"] for r in inputs),
        "fallbacks": [{"layer": r["layer"], "kernel_dtype": r["kernel_dtype"],
                       "solve_dtype": r["solve_dtype"], "jitter": r["jitter"]}
                      for r in inputs if r["jitter"] or r["solve_dtype"] != r["dtype"]
                      or r["kernel_dtype"] != r["dtype"]],
    }
    gram = gram_summary(grams, num_classes)
    if gram is not None:
        out["gram_last"] = gram
    return out


def summary_text(summary: dict[str, Any]) -> str:
    """A few lines for the terminal from :func:`summarize`'s dict."""
    s = summary
    lines = [
        f"NC1 of the layer input: {s['nc1_first_input']:.3g} (layer 1) -> "
        f"{s['nc1_last_input']:.3g} (layer {s['depth'] + 1}), x{s['nc1_reduction']:.3g} smaller",
        f"share of the log-NC1 reduction: agop {s['share_agop']:+.2f}, features "
        f"{s['share_features']:+.2f}, normalization {s['share_normalize']:+.2f}",
        f"agop stage below input in {s['layers_agop_below_input']}/{s['depth']} layers; "
        f"features stage not below agop in {s['layers_features_not_below_agop']}/{s['depth']}",
        f"NC2: {s['nc2_first_input']:.3g} -> {s['nc2_last_input']:.3g}",
        f"final train accuracy {s['final_train_acc']:.4f}"
        + ("" if s["final_test_acc"] is None else f", test accuracy {s['final_test_acc']:.4f}"),
        f"{s['layer_seconds']:.1f} s in the layers, {s['metric_seconds']:.1f} s in metrics",
    ]
    if "gram_last" in s:
        g = s["gram_last"]
        lines.append(f"Gram of layer {g['layer']} ({g['points']} points): same class "
                     f"{g['same_class_mean']:.3f} (ideal 1), other classes "
                     f"{g['other_class_mean']:.3f} (ideal {g['other_class_ideal']:.3f})")
    if s["fallbacks"]:
        lines.append(f"precision fallbacks: {s['fallbacks']}")
    return "\n".join(lines)


def _figures(run: Any, rows: list[dict[str, Any]], classes: list[str] | None, title: str,
             pdf: bool) -> None:
    from agop import figures

    figures.rfm_collapse(rows, run.figures_dir / "collapse", title=title, pdf=pdf)
    grams = load_grams(run.path)
    if grams:
        figures.rfm_gram(grams, run.figures_dir / "gram", classes=classes, title=title, pdf=pdf)


def run_rfm(out: Any = None, resume: Any = None, progress: bool = True, *,
            dataset: str | None = None, n: int | None = None, test_n: int | None = None,
            depth: int | None = None, bandwidth: float | None = None, width: int | None = None,
            ridge: float | None = None, features: str | None = None, seed: int | None = None,
            device: str | None = None, dtype: str | None = None, data_dir: Any = None,
            pdf: bool = False) -> Any:
    """The ``agop rfm`` experiment: Deep RFM on a dataset, measured per layer and stage.

    Sections 5.1–5.2, Figures 2, 3, 6. Trains on the first ``n`` training points (all if
    None), records f_l's accuracy on the first ``test_n`` test points (None: up to 1,000 where
    the dataset has a test split; 0: none). Writes into the run folder ``out`` (default
    ``runs/rfm-<time>``): config.json, metrics.csv and checkpoint.pt after every layer,
    gram/layer_XXX.npz (the Figure 2 Gram of a class-balanced subset of ≤ 500 training
    points at a few layers), figures/ and summary.json at the end.

    Settings left None take :data:`RFM_DEFAULTS` (digits, depth 10, bandwidth 2, width 512,
    ridgeless, Gaussian features, seed 0, device and dtype "auto").

    ``resume=DIR`` continues an interrupted run from its last finished layer and ends with
    exactly the numbers of an uninterrupted run (times aside). Settings passed with a resume
    must equal the run's, except ``data_dir`` and ``device`` (a run continued on another
    device than it started on warns: its numbers then differ by rounding). Returns the
    :class:`agop.runs.RunDir`.
    """
    from pathlib import Path

    from tqdm.auto import tqdm

    from agop.runs import RunDir, default_run_dir

    given = dict(dataset=dataset, n=n, test_n=test_n, depth=depth, bandwidth=bandwidth,
                 width=width, ridge=ridge, features=features, seed=seed, device=device,
                 dtype=dtype, data_dir=None if data_dir is None else str(data_dir))
    explicit = {k: v for k, v in given.items() if v is not None}
    ckpt = None
    if resume is not None:
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise ValueError(f"give either out or resume, not both ({out} vs {resume})")
        run = RunDir.resume(resume, "rfm")
        RunDir.check_settings(run.settings, {k: v for k, v in explicit.items()
                                             if k not in _FREE_ON_RESUME})
        settings = {**RFM_DEFAULTS, **run.settings,
                    **{k: v for k, v in explicit.items() if k in _FREE_ON_RESUME}}
        ckpt = run.load_checkpoint()
    else:
        settings = {**RFM_DEFAULTS, **explicit}
    for key in ("n", "test_n"):
        if settings[key] is not None:
            check_int(settings[key], key, minimum=0 if key == "test_n" else 2)
    model = DeepRFM(settings["depth"], settings["bandwidth"], settings["width"],
                    settings["ridge"], settings["features"], settings["seed"],
                    settings["device"], dtype=settings["dtype"])
    model._check_params()
    if resume is not None and run.config.get("device") not in (None, str(model.device_)):
        warnings.warn(f"{resume} started on {run.config['device']} and continues on "
                      f"{model.device_}: its numbers will differ from an uninterrupted run by "
                      "rounding", stacklevel=2)
        run.update_config(device=str(model.device_))
    started = time.perf_counter()
    if model.device_.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device_)

    if ckpt is None:
        train, test = _load_data(settings["dataset"], settings["n"], settings["test_n"],
                                 settings["data_dir"])
        steps = model.fit_iter(train.X, train.y, None if test is None else test.X,
                               None if test is None else test.y)  # checks memory first
        if resume is None:
            run = RunDir.create(out if out is not None else default_run_dir("rfm"), "rfm", settings)
        n_test = 0 if test is None else len(test)
        run.update_config(
            device=str(model.device_), dtype=dtype_name(model.dtype_),
            threads=torch.get_num_threads(),
            data={"name": train.name, "train": len(train), "test": n_test,
                  "dim": int(train.X.shape[1]), "classes": len(model.classes_),
                  "class_names": [train.classes[c] for c in model.classes_],
                  "image_shape": list(train.image_shape)},
            memory_needed_bytes=model.memory_needed(len(train), int(train.X.shape[1]),
                                                    len(model.classes_), n_test),
            gram={"layers": gram_layers(model.depth),
                  "points_per_class": max(1, GRAM_POINTS // len(model.classes_))},
        )
    else:
        model = DeepRFM.from_state_dict(ckpt["model"], device=settings["device"])
        steps = model.resume_iter() if model.layers_done_ <= model.depth else iter(())
    data = run.config["data"]
    title = f"{data['name']}, N = {data['train']:,}"
    y = to_numpy(model._y)  # class indices of the training points
    subset = gram_subset(y, len(model.classes_))
    keep = set(gram_layers(model.depth))

    bar = tqdm(total=model.depth + 1, initial=model.layers_done_, disable=not progress,
               desc="agop rfm", unit="layer")
    try:
        for step in steps:
            if step.layer in keep:
                rows_idx = torch.as_tensor(subset, device=step.inputs.device)
                _save_gram(run, step.layer, step.inputs[rows_idx], y[subset])
            run.write_metrics(model.history_, _metric_columns(model.history_))
            run.save_checkpoint({"model": model.state_dict()})
            bar.update(1)
            bar.set_postfix(nc1=f"{step.rows[0]['nc1']:.3g}")
    finally:
        bar.close()

    rows = model.history_
    _figures(run, rows, data["class_names"], title, pdf)
    summary = summarize(rows, load_grams(run.path), len(model.classes_))
    summary["wall_seconds"] = time.perf_counter() - started  # this invocation, data loading included
    if model.device_.type == "cuda":
        summary["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(model.device_))
    run.write_summary(summary)
    return run
