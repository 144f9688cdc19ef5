"""Neural-collapse metrics (Section 3.2 of the paper) and a streaming accumulator.

Features ``H`` are N × D (samples as rows, numpy array or torch tensor, any device), labels
``y`` are integers in 0..K−1. Everything is computed in float64 from three per-class sufficient
statistics: counts n_c, means μ_c and within-class sums of squares Σ_{i∈c} ‖x_i − μ_c‖². Only
``nc1_pinv`` needs more (Σ_W restricted to the span of the centered means); no metric builds a
D × D matrix in memory.

Conventions (where the literature disagrees):

- Σ_W = (1/N) Σ_c Σ_{i∈c} (x_i − μ_c)(x_i − μ_c)ᵀ and Σ_B = (1/K) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ,
  as in the paper (Section 3.2).
- μ_G, "the global feature mean", is the mean of the K class means. For balanced classes this
  is the mean of all samples (the paper's setting: n samples per class). For imbalanced classes
  it is the centre that Σ_B's equal 1/K class weights imply (it minimizes Σ_c ‖μ_c − m‖²), the
  only centre for which collapsed features on a simplex ETF give NC2 = 0, and what the standard
  neural-collapse code (Papyan et al. 2020 and its descendants) computes.
- Standard deviations (``equinorm``, ``equiangular``) are population ones (ddof = 0).
- Undefined is never a number: if all class means coincide (tr Σ_B = 0), or a metric needs the
  direction of a vector that is zero (a class mean equal to μ_G for ``nc2``, a class mean equal
  to 0 for ``nc2_orthogonal``, two equal class means for ``cdnv``), a ``ValueError`` says so.
  "Equal" means within the rounding of an average of N values: distance ≤ 4·N·ε·max_c ‖μ_c‖
  (ε the float64 machine epsilon; ‖x_i‖ instead of ‖μ_c‖ for ``gram``).
- Features of magnitude beyond 2^±480 are first multiplied by an exact power of two (every
  metric is scale-invariant), so squares neither overflow nor underflow; the accumulator, which
  cannot rescale what it has summed, refuses such batches.
- ``nc1_pinv`` inverts Σ_B only along the directions that rounding cannot account for: the
  cutoff (:func:`_pinv_cutoff`) is relative to the largest singular value of the centered
  means and allows for the precision of the features handed in (float32 features carry
  rounding-level directions in their class means) and for the rounding of the N-term scatter.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Callable

import numpy as np
import torch

from agop._validate import ArrayLike, as_float64_tensor, as_labels, check_int, to_numpy

__all__ = [
    "nc1",
    "nc1_authors",
    "nc1_pinv",
    "cdnv",
    "nc2",
    "nc2_squared",
    "nc2_orthogonal",
    "within_total",
    "between_total",
    "equinorm",
    "equiangular",
    "measure",
    "gram",
    "CollapseAccumulator",
]

_EPS = float(np.finfo(np.float64).eps)


# Squares of values in [2⁻⁴⁸⁰, 2⁴⁸⁰] and sums of up to 2⁴⁰ of them stay normal float64 numbers.
_SAFE_EXP = 480


def _rescaled(X: torch.Tensor) -> torch.Tensor:
    """X times a power of two that brings max |x| near 1 when it lies outside 2^±480.

    Every metric is scale-invariant and the factor is exact, so this changes no metric; it
    keeps the squares from overflowing (features near 1e300) or underflowing (near 1e-300).
    Features already in range are returned as they are.
    """
    big = float(X.abs().max()) if X.numel() else 0.0
    if big == 0.0 or 2.0**-_SAFE_EXP <= big <= 2.0**_SAFE_EXP:
        return X
    k = -math.frexp(big)[1]  # 2^k · big in [0.5, 1)
    # two exact steps: 2^k alone is not a float64 for |k| > 1023 (subnormal features)
    return X * 2.0 ** (k // 2) * 2.0 ** (k - k // 2)


def _tol(n: int, scale: float) -> float:
    # An average of n float64 values is off by at most about n·ε of their magnitude.
    return 4.0 * n * _EPS * scale


def _grouped(
    X: torch.Tensor, labels: np.ndarray, K: int, shift: torch.Tensor | None = None
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class counts (K,), means (K × D) and Σ_{i∈c} ‖x_i − μ_c‖² (K,) of X − shift[y].

    X is a float64 tensor (any device; the work stays there), labels a host int64 array.
    Also returns the residuals x_i − shift_c − μ_c (N × D, grouped by class, a new tensor).
    Absent classes get count 0, mean 0 and sum 0.
    """
    counts = np.bincount(labels, minlength=K)
    order = torch.from_numpy(np.argsort(labels, kind="stable")).to(X.device)
    R = X[order]  # a copy: class c is one slice, worked in place
    means = X.new_zeros((K, X.shape[1]))
    ss = X.new_zeros(K)
    start = 0
    for c in np.flatnonzero(counts):
        g = R[start : start + counts[c]]
        start += counts[c]
        if shift is not None:
            g -= shift[c]
        means[c] = g.mean(dim=0)
        # Two-pass: squares about the class mean do not cancel when NC1 is tiny.
        g -= means[c]
        ss[c] = torch.sum(g * g)
    return counts, means, ss, R


def _host(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


class _Stats:
    """Per-class sufficient statistics and the shared quantities every metric derives from.

    ``within_quad(V)`` returns diag(Vᵀ Σ_W V) for a D × r matrix V (None: unavailable);
    ``input_eps`` is the machine epsilon of the dtype the features were handed in.
    """

    def __init__(
        self,
        counts: np.ndarray,
        means: np.ndarray,
        ss: np.ndarray,
        within_quad: Callable[[np.ndarray], np.ndarray] | None,
        input_eps: float = _EPS,
    ):
        self.counts = counts  # (K,)
        self.means = means  # (K, D)
        self.ss = ss  # (K,) Σ_{i∈c} ‖x_i − μ_c‖²
        self.within_quad = within_quad
        self.input_eps = input_eps  # machine epsilon of the features' dtype (before float64)
        self.K = len(counts)
        self.n = int(counts.sum())
        self.mean_norms = np.linalg.norm(means, axis=1)
        self.tol = _tol(self.n, float(self.mean_norms.max()))

    @cached_property
    def centered(self) -> np.ndarray:
        """μ_c − μ_G (K × D); raises if all class means coincide."""
        M = self.means - self.means.mean(axis=0)
        if np.linalg.norm(M, axis=1).max() <= self.tol:
            raise ValueError(
                f"all {self.K} class means coincide (to rounding), so tr Σ_B = 0: the features "
                "carry no class information and the collapse metrics are undefined"
            )
        return M

    @cached_property
    def centered_norms(self) -> np.ndarray:
        return np.linalg.norm(self.centered, axis=1)

    @cached_property
    def centered_gram(self) -> np.ndarray:
        """H̄H̄ᵀ (K × K): cosines between the centered class means."""
        norms = self.centered_norms
        bad = np.flatnonzero(norms <= self.tol)
        if bad.size:
            raise ValueError(
                f"the mean of class {int(bad[0])} equals the global mean μ_G (to rounding), so "
                "its direction, needed by nc2, nc2_squared and equiangular, is undefined"
            )
        U = self.centered / norms[:, None]
        return U @ U.T

    @cached_property
    def etf_gap(self) -> np.ndarray:
        """H̄H̄ᵀ − Σ_ETF (K × K)."""
        K = self.K
        etf = (1.0 + 1.0 / (K - 1)) * np.eye(K) - np.full((K, K), 1.0 / (K - 1))
        return self.centered_gram - etf

    @cached_property
    def tr_w(self) -> float:
        return float(self.ss.sum()) / self.n

    @cached_property
    def tr_b(self) -> float:
        return float(np.sum(self.centered**2)) / self.K


def _input_eps(a: ArrayLike) -> float:
    """Machine epsilon of the floating dtype ``a`` holds; float64's for integers, bools, lists.

    The features' own precision bounds how well their class means are known (see
    :func:`_pinv_cutoff`): float32 features carry rounding at 1.2e-7 of their size.
    """
    if isinstance(a, torch.Tensor):
        return float(torch.finfo(a.dtype).eps) if a.is_floating_point() else _EPS
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        return _EPS  # a nested sequence: np.asarray makes float64 or integers
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return _EPS
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else _EPS


def _stats(H: ArrayLike, y: ArrayLike, num_classes: int | None) -> _Stats:
    X = _rescaled(as_float64_tensor(H, "H"))
    labels, K = as_labels(y, X.shape[0], num_classes=num_classes, name="y")
    counts, means, ss, resid = _grouped(X, labels, K)

    def within_quad(V: np.ndarray) -> np.ndarray:
        P = resid @ torch.from_numpy(V).to(resid.device)  # (N, r)
        return _host(torch.sum(P * P, dim=0)) / X.shape[0]

    # only the K × D statistics leave the device; the N × D work stays where H is
    return _Stats(counts, _host(means), _host(ss), within_quad, _input_eps(H))


# --- metrics of the statistics ------------------------------------------------------------


def _nc1(s: _Stats) -> float:
    return s.tr_w / s.tr_b


def _nc1_authors(s: _Stats) -> float:
    return _nc1(s) / s.K


# nc1_pinv drops every direction of Σ_B whose eigenvalue is below (1000·N)·ε of the largest:
# along a kept direction the rounding of the N-term within-class sums (≤ N·ε·tr Σ_W) moves
# its term v_jᵀΣ_W v_j / s_j² by at most 1/1000 of NC1 (see _pinv_cutoff).
_PINV_MARGIN = 1000.0


def _pinv_cutoff(s: _Stats, s_max: float) -> float:
    """Singular values of the centered means at or below this are treated as 0 by nc1_pinv.

    The largest of
    - √(max(D, 1000·N)·ε)·s_max: an eigenvalue s²/K of Σ_B below max(D, 1000·N)·ε of the
      largest. max(D, ·)·ε is the pseudo-inverse's usual relative cutoff (numpy's and torch's
      default for the D × D Σ_B); 1000·N·ε bounds what the rounding of the N-term scatter sums
      (|δ vᵀΣ_W v| ≤ N·ε·tr Σ_W, streamed or not) can add to a kept term: at most NC1/1000;
    - √D·ε_in·r: the rounding of the features handed in (ε_in the machine epsilon of their
      dtype, 1.2e-7 for float32; r² = Σ_c mean_{i∈c} ‖x_i‖²). Rounding every feature moves the
      K × D centered means by at most ε_in·r/2 in spectral norm; √D is a margin for the
      rounding the features picked up while being computed (a length-D dot product);
    - s.tol: the rounding of the means as float64 averages of N values.
    """
    D = s.means.shape[1]
    r = float(np.sqrt(np.sum(s.ss / s.counts + s.mean_norms**2)))
    return max(float(np.sqrt(max(D, _PINV_MARGIN * s.n) * _EPS)) * s_max,
               float(np.sqrt(D)) * s.input_eps * r, s.tol)


def _nc1_pinv(s: _Stats) -> float:
    # Σ_B = MᵀM/K with M = U S Vᵀ (thin SVD of the K × D centered means), so
    # Σ_B⁺ = K V S⁻² Vᵀ and tr(Σ_W Σ_B⁺)/K = Σ_j v_jᵀ Σ_W v_j / s_j².
    _, S, Vt = np.linalg.svd(s.centered, full_matrices=False)
    # Directions below the cutoff are rounding, not between-class directions (this also drops
    # the one that Σ_c (μ_c − μ_G) = 0 leaves only to rounding). Keeping them divides the
    # rounding of Σ_W by s_j² ~ 1e-18: any value, of either sign.
    cutoff = _pinv_cutoff(s, float(S[0]))
    keep = S > cutoff
    if not keep.any():
        raise ValueError(
            f"the class means differ only at the rounding of the features (largest singular "
            f"value of the centered means {S[0]:.3g} ≤ {cutoff:.3g}, the precision of "
            f"{'float64' if s.input_eps <= _EPS else f'features with ε = {s.input_eps:.3g}'}), "
            "so Σ_B has no direction to invert and nc1_pinv is undefined"
        )
    # vᵀΣ_W v ≥ 0; a streamed scatter can give −(rounding) where Σ_W vanishes along v
    q = np.maximum(s.within_quad(Vt[keep].T), 0.0)
    return float(np.sum(q / S[keep] ** 2))


def _cdnv(s: _Stats) -> float:
    var = s.ss / s.counts  # (K,) mean squared distance to the class mean
    M = s.centered  # pair differences are centering-invariant; centered values round less
    total = 0.0
    for c in range(s.K - 1):
        d2 = np.sum((M[c + 1 :] - M[c]) ** 2, axis=1)  # (K − 1 − c,)
        close = np.flatnonzero(d2 <= s.tol**2)
        if close.size:
            raise ValueError(
                f"classes {c} and {c + 1 + int(close[0])} have the same mean (to rounding), "
                "so their class-distance normalized variance is undefined"
            )
        total += float(np.sum((var[c] + var[c + 1 :]) / (2.0 * d2)))
    return total / (s.K * (s.K - 1) / 2)


def _nc2(s: _Stats) -> float:
    return float(np.linalg.norm(s.etf_gap)) / s.K**2


def _nc2_squared(s: _Stats) -> float:
    return float(np.mean(s.etf_gap**2))


def _nc2_orthogonal(s: _Stats) -> float:
    bad = np.flatnonzero(s.mean_norms <= s.tol)
    if bad.size:
        raise ValueError(
            f"the mean of class {int(bad[0])} is 0 (to rounding), so its direction, needed by "
            "nc2_orthogonal, is undefined"
        )
    U = s.means / s.mean_norms[:, None]
    return float(np.linalg.norm(U @ U.T - np.eye(s.K))) / s.K**2


def _within_total(s: _Stats) -> float:
    return s.tr_w / (s.tr_w + s.tr_b)


def _between_total(s: _Stats) -> float:
    return s.tr_b / (s.tr_w + s.tr_b)


def _equinorm(s: _Stats) -> float:
    return float(np.std(s.centered_norms) / np.mean(s.centered_norms))


def _equiangular(s: _Stats) -> float:
    return float(np.std(s.centered_gram[np.triu_indices(s.K, 1)]))


_METRICS: dict[str, Callable[[_Stats], float]] = {
    "nc1": _nc1,
    "nc1_authors": _nc1_authors,
    "nc1_pinv": _nc1_pinv,
    "cdnv": _cdnv,
    "nc2": _nc2,
    "nc2_squared": _nc2_squared,
    "nc2_orthogonal": _nc2_orthogonal,
    "within_total": _within_total,
    "between_total": _between_total,
    "equinorm": _equinorm,
    "equiangular": _equiangular,
}


def _all(s: _Stats, strict: bool = True) -> dict[str, float]:
    out = {}
    for name, f in _METRICS.items():
        if name == "nc1_pinv" and s.within_quad is None:
            continue
        try:
            out[name] = f(s)
        except ValueError:
            if strict:
                raise
            out[name] = float("nan")
    return out


# --- public functions ---------------------------------------------------------------------


def nc1(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """DNC1 metric tr(Σ_W)/tr(Σ_B): the paper's NC1 (Section 3.2; Rangamani et al. 2023).

    H: N × D features, y: N labels in 0..K−1 (K = ``num_classes`` or max(y) + 1). Σ_W divides
    by N, Σ_B by K, μ_G is the mean of the class means (module docstring). 0 means every sample
    sits at its class mean. Raises ValueError if all class means coincide (tr Σ_B = 0).
    """
    return _nc1(_stats(H, y, num_classes))


def nc1_authors(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """NC1 as the authors' scripts print it: Σ_W divided by K·N instead of N, i.e. ``nc1``/K.

    Same inputs and conventions as :func:`nc1` (see the paper notes, "Neural collapse metrics").
    """
    return _nc1_authors(_stats(H, y, num_classes))


def nc1_pinv(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """tr(Σ_W Σ_B⁺)/K, the NC1 of Papyan, Han & Donoho (2020), Σ_B⁺ the pseudo-inverse.

    Computed through the thin SVD of the K × D centered class means (no D × D pseudo-inverse):
    Σ_W is only needed along the at most K − 1 directions the means span. A singular value s_j
    of the centered means counts as zero (its direction is left out of Σ_B⁺) at or below the
    largest of √(max(D, 1000·N)·ε)·s_max, √D·ε_H·r and 4·N·ε·max_c ‖μ_c‖ (ε the float64
    epsilon, ε_H that of H's dtype, r² = Σ_c mean_{i∈c} ‖x_i‖²): such directions are rounding,
    in float32 features especially, and dividing by their s_j² ~ 1e-18 would give any number of
    either sign. The value is ≥ 0; streamed in any batches, merged or computed here it
    agrees to (K − 1)·NC1/1000 by the rounding bound, in practice to ~1e-12·NC1
    (docs/collapse.md). Raises ValueError when no direction is left (the class means differ
    only at the features' rounding). Conventions as :func:`nc1`.
    """
    return _nc1_pinv(_stats(H, y, num_classes))


def cdnv(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """Class-distance normalized variance (Galanti, György & Hutter 2022), averaged over pairs.

    Mean over class pairs c ≠ c' of (Var_c + Var_c') / (2 ‖μ_c − μ_c'‖²), Var_c the mean
    squared distance of class c's samples to μ_c (divides by n_c). Raises ValueError if two
    class means coincide.
    """
    return _cdnv(_stats(H, y, num_classes))


def nc2(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """DNC2 metric (1/K²) ‖H̄H̄ᵀ − Σ_ETF‖_F (Section 3.2 and Figure 3b), not squared.

    H̄ (K × D): class means centered by μ_G (the mean of class means), each scaled to unit
    norm; Σ_ETF = (1 + 1/(K−1)) I − (1/(K−1)) 11ᵀ. 0 means the centered means form a simplex
    ETF (up to scale and rotation). Raises ValueError if a class mean equals μ_G.
    """
    return _nc2(_stats(H, y, num_classes))


def nc2_squared(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """Mean of the squared entries of H̄H̄ᵀ − Σ_ETF: the NC2 the authors' scripts print.

    Equals K²·``nc2``² exactly (‖·‖_F²/K² versus ‖·‖_F/K²). Conventions as :func:`nc2`.
    """
    return _nc2_squared(_stats(H, y, num_classes))


def nc2_orthogonal(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """Orthogonal-frame DNC2 (Section 3.2, "H_lᵀH_l ∝ I_K"): (1/K²) ‖ĤĤᵀ − I‖_F.

    Ĥ (K × D): the class means, NOT centered, each scaled to unit norm. 0 means the class
    means are orthogonal. Raises ValueError if a class mean is 0.
    """
    return _nc2_orthogonal(_stats(H, y, num_classes))


def within_total(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """tr Σ_W / tr Σ_T with Σ_T = Σ_W + Σ_B (Figure 8); equals 1 − ``between_total``."""
    return _within_total(_stats(H, y, num_classes))


def between_total(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """tr Σ_B / tr Σ_T with Σ_T = Σ_W + Σ_B (Figure 8); equals 1 − ``within_total``."""
    return _between_total(_stats(H, y, num_classes))


def equinorm(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """Equinorm of the centered class means (Papyan et al. 2020): std_c ‖μ_c − μ_G‖ / mean_c.

    Coefficient of variation with the population std (ddof = 0; Papyan et al.'s code uses
    ddof = 1, larger by √(K/(K−1))). 0 means all centered means have the same length.
    """
    return _equinorm(_stats(H, y, num_classes))


def equiangular(H: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """Equiangularity (Papyan et al. 2020): std of cos∠(μ_c − μ_G, μ_c' − μ_G) over pairs c < c'.

    Population std (ddof = 0) over the K(K−1)/2 pairs. 0 means all pairs meet at one angle.
    """
    return _equiangular(_stats(H, y, num_classes))


def measure(H: ArrayLike, y: ArrayLike, num_classes: int | None = None, *,
            strict: bool = True) -> dict[str, float]:
    """All collapse metrics of (H, y) at once, sharing one pass over the data.

    H: N × D, y: N labels in 0..K−1. Returns a dict keyed by the metric function names:
    nc1, nc1_authors, nc1_pinv, cdnv, nc2, nc2_squared, nc2_orthogonal, within_total,
    between_total, equinorm, equiangular (conventions in the module docstring). Raises
    ValueError when any of them is undefined for this data; with ``strict=False`` that
    metric is NaN instead and the others are still computed.
    """
    return _all(_stats(H, y, num_classes), strict)


def gram(
    H: ArrayLike, y: ArrayLike, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The Gram matrix of Figure 2: X̄X̄ᵀ, X̄ = H − μ_G with each row scaled to unit norm.

    Rows are reordered by class (stable sort, so file order within a class). Returns
    ``(G, order)``: G (N × N, float64) and ``order`` (N, int64) with G = X̄[order] X̄[order]ᵀ.
    μ_G is the mean of the class means, as in the metrics. A sample equal to μ_G has no
    direction: ValueError naming its row. Memory is N² floats.
    """
    X = _rescaled(as_float64_tensor(H, "H"))
    labels, K = as_labels(y, X.shape[0], num_classes=num_classes, name="y")
    Xc = X - _grouped(X, labels, K)[1].mean(dim=0)
    norms = torch.linalg.vector_norm(Xc, dim=1)
    scale = float(torch.linalg.vector_norm(X, dim=1).max())
    bad = np.flatnonzero(_host(norms) <= _tol(X.shape[0], scale))
    if bad.size:
        raise ValueError(
            f"row {int(bad[0])} of H equals the global mean μ_G (to rounding), so it has no "
            "direction on the unit sphere; drop it or perturb it"
        )
    order = np.argsort(labels, kind="stable")
    idx = torch.from_numpy(order).to(X.device)
    U = Xc[idx] / norms[idx, None]
    return _host(U @ U.T), order


class CollapseAccumulator:
    """Streaming version of :func:`measure`: ``update`` with batches, then ``compute``.

    ``compute()`` returns the dict :func:`measure` gives on the concatenation of all batches
    (equal up to rounding, about 1e-15 relative), whatever the batch sizes, their order, or
    which classes each batch holds. Batches may be numpy arrays or torch tensors on any device;
    the state (float64) lives on the device of the first batch, so GPU batches stay on the GPU.

    State, per class c: the count n_c, a shift s_c (the first sample of c seen), the mean of
    x − s_c and the sum of squared deviations from the class mean, O(K·D) in all. Batches are
    merged with the pairwise update of Chan, Golub & LeVeque (1979); the shift keeps the
    numbers it works on at the scale of the within-class spread, so a tiny NC1 (spread 1e-7
    around means of norm 1e3) does not cancel away as it would with raw sums of squares.

    ``nc1_pinv`` needs Σ_W along the span of the final class means, which is unknown until the
    end, so with ``pinv=True`` (default) the accumulator also keeps the D × D within-class
    scatter (merged the same way): O(D²) memory and O(B·D²) time per batch of B rows. With
    ``pinv=False`` that matrix is not kept and ``compute()`` omits ``"nc1_pinv"``.

    Accumulators combine: ``a.merge(b)`` makes ``a`` hold the statistics of both (as if ``a``
    had also been fed ``b``'s batches), ``a.all_reduce()`` does that over the ranks of a
    ``torch.distributed`` process group, and ``state()`` / ``from_state`` expose the statistics
    as plain float64 tensors (:meth:`state` lists them) for saving or sending elsewhere.
    """

    STATE_KEYS = ("counts", "shifts", "shifted_means", "sum_squares", "scatter", "input_eps")

    def __init__(self, num_classes: int, dim: int, *, pinv: bool = True,
                 device: str | torch.device | None = None):
        self.num_classes = check_int(num_classes, "num_classes", minimum=2)
        self.dim = check_int(dim, "dim", minimum=1)
        self.pinv = bool(pinv)
        self._device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self._counts = np.zeros(self.num_classes, dtype=np.int64)
        self._shift = self._mean = self._ss = self._scatter = None  # allocated by update
        self._input_eps = _EPS  # the coarsest dtype fed so far (float64: nothing coarser)

    def _allocate(self, device: torch.device) -> None:
        K, D = self.num_classes, self.dim
        z = dict(dtype=torch.float64, device=device)
        self._shift = torch.zeros((K, D), **z)
        self._mean = torch.zeros((K, D), **z)  # mean of x − s_c
        self._ss = torch.zeros(K, **z)
        self._scatter = torch.zeros((D, D), **z) if self.pinv else None

    @property
    def count(self) -> int:
        """Number of samples seen since construction or the last ``reset``."""
        return int(self._counts.sum())

    @property
    def class_counts(self) -> np.ndarray:
        """Samples seen per class (K,)."""
        return self._counts.copy()

    @property
    def class_means(self) -> np.ndarray:
        """The class means μ_c seen so far (K × D, float64, on the host); 0 for unseen classes."""
        if self._shift is None:
            return np.zeros((self.num_classes, self.dim))
        return _host(self._shift + self._mean)

    def update(self, H_batch: ArrayLike, y_batch: ArrayLike) -> None:
        """Add a batch: H_batch (B × D features), y_batch (B labels in 0..K−1); B may be 0.

        The state lives on the device of the first batch (or ``device``): GPU batches are
        never copied to the host.
        """
        X = as_float64_tensor(H_batch, "H_batch", min_rows=0)
        if X.shape[1] != self.dim:
            raise ValueError(
                f"H_batch has {X.shape[1]} feature column(s) but the accumulator was built "
                f"with dim = {self.dim}"
            )
        if X.shape[0] == 0:
            if np.size(to_numpy(y_batch)) != 0:
                raise ValueError("H_batch has 0 rows but y_batch is not empty")
            return
        labels, _ = as_labels(
            y_batch, X.shape[0], num_classes=self.num_classes, name="y_batch",
            min_classes=1, require_all=False,
        )
        big = float(X.abs().max())
        if big > 2.0**_SAFE_EXP or 0 < big < 2.0**-_SAFE_EXP:
            raise ValueError(
                f"H_batch has values of magnitude up to {big:.3g}, outside "
                f"[{2.0**-_SAFE_EXP:.2g}, {2.0**_SAFE_EXP:.2g}]: the accumulator's float64 sums "
                "of squares would over- or underflow; rescale the features (no collapse metric "
                "depends on their scale; collapse.measure rescales them itself)"
            )
        self._input_eps = max(self._input_eps, _input_eps(H_batch))
        if self._shift is None:
            self._allocate(self._device or X.device)
        X = X.to(self._shift.device)
        present, first = np.unique(labels, return_index=True)
        unseen = self._counts[present] == 0
        new = torch.from_numpy(present[unseen]).to(X.device)
        self._shift[new] = X[torch.from_numpy(first[unseen]).to(X.device)]
        # x − s_c is exact when x is near s_c (Sterbenz), so no digits are lost to the offset.
        nb, mb, ssb, R = _grouped(X, labels, self.num_classes, shift=self._shift)
        p = torch.from_numpy(present).to(X.device)
        na = self._counts[present]
        n = na + nb[present]
        w = torch.from_numpy(na * nb[present] / n).to(X.device)  # (P,)
        frac = torch.from_numpy(nb[present] / n).to(X.device)
        delta = mb[p] - self._mean[p]  # (P, D)
        self._mean[p] += delta * frac[:, None]
        self._ss[p] += ssb[p] + w * torch.sum(delta * delta, dim=1)
        if self._scatter is not None:
            self._scatter += R.T @ R + (delta.T * w) @ delta
        self._counts[present] = n

    def compute(self, strict: bool = True) -> dict[str, float]:
        """The metrics of all data seen, as :func:`measure` returns them.

        Raises ValueError if some class has no sample yet, or (``strict``, the default) if a
        metric is undefined; with ``strict=False`` an undefined metric is NaN and the others
        are still computed (e.g. NC1 of a layer whose class means all coincide is undefined,
        but nc2_orthogonal may not be).
        """
        empty = np.flatnonzero(self._counts == 0).tolist()
        if empty:
            raise ValueError(
                f"class(es) {empty} have no samples among the {self.count} seen "
                f"(K = {self.num_classes}); every class needs at least one sample"
            )
        quad = None
        if self._scatter is not None:
            S, n = self._scatter, self.count

            def quad(V: np.ndarray) -> np.ndarray:
                Vt = torch.from_numpy(V).to(S.device)
                return _host(torch.sum((S @ Vt) * Vt, dim=0)) / n

        means = _host(self._shift + self._mean)
        return _all(_Stats(self._counts.copy(), means, _host(self._ss), quad, self._input_eps),
                    strict)

    # --- combining accumulators ---------------------------------------------------------

    def _same_shape(self, other: "CollapseAccumulator", what: str) -> None:
        mine = (self.num_classes, self.dim, self.pinv)
        theirs = (other.num_classes, other.dim, other.pinv)
        if mine != theirs:
            raise ValueError(
                f"cannot {what} a CollapseAccumulator with (num_classes, dim, pinv) = {theirs} "
                f"into one with {mine}"
            )

    def state(self) -> dict[str, torch.Tensor]:
        """The sufficient statistics, as new float64 tensors on the accumulator's device.

        Keys (K = ``num_classes``, D = ``dim``; a class not seen yet has all zeros):

        - ``"counts"`` (K,): n_c, the samples seen per class (integers, exact below 2⁵³);
        - ``"shifts"`` (K × D): s_c, a reference point of class c (the first sample seen);
        - ``"shifted_means"`` (K × D): the mean of x − s_c over class c, so μ_c = s_c + this
          (kept relative to s_c so that a tiny spread around a large mean keeps its digits);
        - ``"sum_squares"`` (K,): Σ_{i∈c} ‖x_i − μ_c‖², the within-class sum of squares;
        - ``"scatter"`` (D × D), only with ``pinv=True``: Σ_c Σ_{i∈c} (x_i − μ_c)(x_i − μ_c)ᵀ,
          the within-class scatter (N·Σ_W);
        - ``"input_eps"`` (a 0-d tensor): the machine epsilon of the coarsest dtype fed (2⁻⁵² for
          float64 and integers, 2⁻²³ for float32); ``nc1_pinv``'s cutoff depends on it.

        ``from_state(acc.state())`` is an accumulator equal to ``acc``. Every tensor has the same
        shape on every process with the same (K, D, pinv), so a process group can gather them;
        :meth:`all_reduce` does exactly that.
        """
        if self._shift is None:  # nothing seen: zeros, without fixing the state's device yet
            empty = CollapseAccumulator(self.num_classes, self.dim, pinv=self.pinv)
            empty._allocate(self._device or torch.device("cpu"))
            return empty.state()
        out = {
            "counts": torch.from_numpy(self._counts.astype(np.float64)).to(self._shift.device),
            "shifts": self._shift.clone(),
            "shifted_means": self._mean.clone(),
            "sum_squares": self._ss.clone(),
        }
        if self._scatter is not None:
            out["scatter"] = self._scatter.clone()
        out["input_eps"] = torch.tensor(self._input_eps, dtype=torch.float64,
                                        device=self._shift.device)
        return out

    @classmethod
    def from_state(cls, state: dict[str, ArrayLike], *,
                   device: str | torch.device | None = None) -> "CollapseAccumulator":
        """An accumulator holding the statistics ``state`` (the dict :meth:`state` returns).

        K and D are read from the shapes, ``pinv`` from whether ``"scatter"`` is present.
        ``"shifts"`` may be left out (then s_c = 0 and ``"shifted_means"`` are the class means),
        and ``"input_eps"`` too (then the statistics count as float64 data's).
        Tensors or arrays, any real dtype, are converted to float64; the state lives on
        ``device`` (default: that of ``"shifted_means"``). Raises ValueError on a missing or
        unknown key, a wrong shape, a count that is not a non-negative integer, or a value that
        is not finite.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict of tensors; got {type(state).__name__}")
        unknown = sorted(set(state) - set(cls.STATE_KEYS))
        missing = [k for k in ("counts", "shifted_means", "sum_squares") if k not in state]
        if unknown or missing:
            raise ValueError(
                f"state has unknown key(s) {unknown} / lacks {missing}; expected "
                f"{list(cls.STATE_KEYS)} ('shifts', 'scatter' and 'input_eps' optional)"
            )

        def tensor(key: str) -> torch.Tensor:
            v = state[key]
            t = v.detach() if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
            if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
                raise ValueError(f"state[{key!r}] must hold real numbers; got {t.dtype}")
            t = t.to(torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"state[{key!r}] holds NaN or inf")
            return t

        means = tensor("shifted_means")
        if means.ndim != 2:
            raise ValueError(
                f"state['shifted_means'] must be K × D; got shape {tuple(means.shape)}"
            )
        K, D = means.shape
        dev = torch.device(device) if device is not None else means.device
        shapes = {"counts": (K,), "shifts": (K, D), "sum_squares": (K,), "scatter": (D, D),
                  "input_eps": ()}
        got = {k: tensor(k).to(dev) for k in shapes if k in state}
        for k, t in got.items():
            if tuple(t.shape) != shapes[k]:
                raise ValueError(
                    f"state[{k!r}] has shape {tuple(t.shape)}; with K = {K} classes and D = {D} "
                    f"features it must be {shapes[k]}"
                )
        counts = _host(got["counts"])
        if np.any(counts < 0) or np.any(counts != np.round(counts)):
            raise ValueError(f"state['counts'] must be non-negative integers; got {counts}")
        eps = float(got["input_eps"]) if "input_eps" in got else _EPS
        if not _EPS <= eps < 1:
            raise ValueError(f"state['input_eps'] must be a machine epsilon in [2⁻⁵², 1); "
                             f"got {eps!r}")
        acc = cls(K, D, pinv="scatter" in got, device=dev)
        acc._allocate(dev)
        acc._counts = counts.astype(np.int64)
        seen = torch.from_numpy(acc._counts > 0).to(dev)
        acc._mean[seen] = means.to(dev)[seen]  # unseen classes keep zeros, whatever was passed
        acc._ss[seen] = got["sum_squares"][seen]
        if "shifts" in got:
            acc._shift[seen] = got["shifts"][seen]
        if acc._scatter is not None:
            acc._scatter.copy_(got["scatter"])
        acc._input_eps = eps
        return acc

    def merge(self, other: "CollapseAccumulator") -> "CollapseAccumulator":
        """Add the statistics of ``other`` to this accumulator, in place; returns ``self``.

        Afterwards ``self`` equals (to rounding, about 1e-15 relative) an accumulator fed the
        batches of both, in any order; ``other`` is unchanged. Per class c with counts n_a, n_b,
        means μ_a, μ_b and δ = μ_b − μ_a, the parallel update of Chan, Golub & LeVeque
        ("Updating formulae and a pairwise algorithm for computing sample variances", 1979;
        "Algorithms for computing the sample variance: analysis and recommendations", The
        American Statistician 37, 1983):

            n = n_a + n_b,   μ = μ_a + (n_b/n) δ,   SS = SS_a + SS_b + (n_a n_b/n) ‖δ‖²,

        and the D × D scatter the same way with δδᵀ in place of ‖δ‖². δ is taken between the
        means relative to this accumulator's shift s_c (other's mean plus s_c' − s_c), so the
        precision of :meth:`update` is kept. A class absent from ``other`` is untouched, one
        absent from ``self`` is copied. Raises ValueError unless both have the same
        (num_classes, dim, pinv).
        """
        if not isinstance(other, CollapseAccumulator):
            raise ValueError(f"can only merge a CollapseAccumulator; got {type(other).__name__}")
        self._same_shape(other, "merge")
        if other.count == 0:
            return self
        self._input_eps = max(self._input_eps, other._input_eps)
        if self._shift is None:
            self._allocate(self._device or other._shift.device)
        dev = self._shift.device
        # copies: ``other`` may be ``self``, whose tensors are updated below
        sb, mb, ssb = (t.to(dev, copy=True) for t in (other._shift, other._mean, other._ss))
        present = np.flatnonzero(other._counts)
        nb = other._counts[present]
        na = self._counts[present]
        p = torch.from_numpy(present).to(dev)
        fresh = torch.from_numpy(present[na == 0]).to(dev)
        self._shift[fresh] = sb[fresh]  # then δ is other's mean exactly, and its weight is 0
        n = na + nb
        w = torch.from_numpy(na * nb / n).to(dev)  # (P,)
        frac = torch.from_numpy(nb / n).to(dev)
        delta = (mb[p] + (sb[p] - self._shift[p])) - self._mean[p]  # (P, D)
        self._mean[p] += delta * frac[:, None]
        self._ss[p] += ssb[p] + w * torch.sum(delta * delta, dim=1)
        if self._scatter is not None:
            self._scatter += other._scatter.to(dev) + (delta.T * w) @ delta
        self._counts[present] = n
        return self

    def all_reduce(self, group=None) -> "CollapseAccumulator":
        """Merge the accumulators of all ranks of a ``torch.distributed`` group, in place.

        Every rank of ``group`` (None: the default group) must call this. Afterwards every
        rank holds the same statistics, bit for bit: those of all the batches fed on all ranks
        (equal to one accumulator fed everything, to rounding). Each rank's :meth:`state` is
        gathered (one ``all_gather`` of a flat float64 vector of 2K(D + 1) + 1 (+ D²) numbers per
        rank, so world × that in memory) and the states are merged in rank order with
        :meth:`merge`, on the collective's device (CPU for gloo, the current CUDA device for
        NCCL); the result is moved back to this accumulator's device. Raises ValueError on
        every rank if the ranks' (num_classes, dim, pinv) differ. A no-op when
        ``torch.distributed`` is not initialized. Returns ``self``.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size(group)
        if world == 1:
            return self
        comm = (torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        shape = torch.tensor([self.num_classes, self.dim, int(self.pinv)], device=comm)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape, group=group)
        for r, t in enumerate(shapes):
            K, D, pinv = (int(v) for v in t.tolist())
            if (K, D, bool(pinv)) != (self.num_classes, self.dim, self.pinv):
                raise ValueError(
                    f"all_reduce: rank {r} has a CollapseAccumulator with (num_classes, dim, "
                    f"pinv) = {(K, D, bool(pinv))}, this rank "
                    f"{(self.num_classes, self.dim, self.pinv)}; all ranks must agree"
                )
        home = self._shift.device if self._shift is not None else (self._device or comm)
        keys = [k for k in self.STATE_KEYS if k != "scatter" or self.pinv]
        mine = self.state()
        flat = torch.cat([mine[k].to(comm).reshape(-1) for k in keys])
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat, group=group)
        merged = CollapseAccumulator(self.num_classes, self.dim, pinv=self.pinv, device=comm)
        for part in parts:  # rank order on every rank: the same sums, the same result
            pieces = torch.split(part, [mine[k].numel() for k in keys])
            st = {k: v.reshape(mine[k].shape) for k, v in zip(keys, pieces)}
            merged.merge(CollapseAccumulator.from_state(st, device=comm))
        if merged.count == 0:  # no rank has seen a sample: nothing to change
            return self
        self._counts = merged._counts
        self._input_eps = merged._input_eps
        self._shift, self._mean, self._ss = (t.to(home) for t in
                                             (merged._shift, merged._mean, merged._ss))
        self._scatter = merged._scatter.to(home) if self.pinv else None
        return self
