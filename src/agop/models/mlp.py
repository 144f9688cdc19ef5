"""The MLP of the paper's Section 4 (Appendices B.2, B.3, C): the network, its training, its probes.

- :class:`MLP`: the paper's network, ``depth`` × [Linear without bias, ReLU] and a linear readout.
- :class:`Trainer` / :func:`train`: Adam on the mean squared error to ±1 one-hot targets.
- :func:`probe`: at one moment of training, for every hidden layer l with W_l = U S Vᵀ and layer
  input Φ_l(X), the collapse metrics of Φ_l(X) ("input"), S Vᵀ Φ_l(X) ("right") and
  σ(U S Vᵀ Φ_l(X)) ("output") (Figures 1, 7), and the Neural Feature Ansatz correlations
  ρ(W_lᵀW_l, AGOP_l) and ρ(W_lᵀW_l, AGOP_l^{1/2}) (Figure 8).
- :func:`layer_agops`: the AGOP w.r.t. the input of every Linear layer of a stack, from one
  backward pass per output (the hooked pass of :mod:`agop.models.layers`, which does the same
  for named layers of any model, convolutions included).
- :func:`layer_stages`: the three stages of one layer, the tensors :func:`probe` measures.

The experiment (settings, run folder, checkpoints, headline numbers) is
:mod:`agop.experiments.mlp`; nothing here knows of run folders.

Conventions: samples are rows; the AGOP carries the 1/N of Section 3.3; models compute in float32
(``agop.backend.default_dtype``, TF32 off) and every metric is accumulated in float64; inputs are
the dataset's flattened pixels in [0, 1] with no further preprocessing.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agop import backend
from agop._validate import ArrayLike, as_labels, check_int, check_matrix, check_positive
from agop.collapse import CollapseAccumulator
from agop.linalg import psd_power
from agop.models import layers as _layers
from agop.solve import signed_one_hot

__all__ = [
    "MLP",
    "PRESETS",
    "STAGES",
    "EpochStep",
    "Trainer",
    "correlation",
    "layer_agops",
    "layer_stages",
    "measurement_epochs",
    "probe",
    "train",
]

STAGES = ("input", "right", "output")

#: Training settings the presets fix (explicit arguments override them).
#: "paper": Appendix C. "authors": the authors' job scripts, which also re-created Adam at the
#: start of every epoch (resetting its moment estimates).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"lr": 2e-5, "init_scale": 0.01, "reset_optimizer": False},
    "authors": {"lr": 5e-5, "init_scale": 0.1, "reset_optimizer": True},
}

# Modules that act on each sample and each coordinate separately, so a per-sample Jacobian can be
# read off the gradient of a batch-summed output.
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU,
                nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh,
                nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink, nn.Identity)


# ----------------------------------------------------------------------------- the network
class MLP(nn.Sequential):
    """The paper's MLP (Section 4, Appendix C): ``depth`` × [Linear(bias=False), ReLU], readout.

    Hidden weights: Xavier-uniform with gain ``init_scale`` (0.01 in the paper: the small
    initialization in which the NFA holds). Readout: PyTorch's default ``nn.Linear`` weight
    initialization (Kaiming-uniform with a = √5, i.e. U(±1/√fan_in)) and, like every layer, no
    bias (Appendix C: "MLP networks with no biases"). Shapes: input N × ``in_dim``, output
    N × ``num_classes``. Weights are drawn from ``generator`` (the global RNG if None), on the
    CPU, in layer order, so a seed gives the same network on every device.
    """

    def __init__(self, in_dim: int, num_classes: int, width: int = 512, depth: int = 5,
                 init_scale: float = 0.01, *, generator: torch.Generator | None = None):
        in_dim = check_int(in_dim, "in_dim")
        num_classes = check_int(num_classes, "num_classes", minimum=2)
        width = check_int(width, "width")
        depth = check_int(depth, "depth")
        check_positive(init_scale, "init_scale")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            lin = nn.utils.skip_init(nn.Linear, d, width, bias=False)
            nn.init.xavier_uniform_(lin.weight, gain=float(init_scale), generator=generator)
            layers += [lin, nn.ReLU()]
            d = width
        readout = nn.utils.skip_init(nn.Linear, d, num_classes, bias=False)
        nn.init.kaiming_uniform_(readout.weight, a=math.sqrt(5), generator=generator)
        super().__init__(*layers, readout)

    @property
    def hidden(self) -> list[nn.Linear]:
        """The ``depth`` hidden Linear layers, first to last (W_1 … W_L)."""
        return [m for m in self if isinstance(m, nn.Linear)][:-1]

    @property
    def readout(self) -> nn.Linear:
        """The final Linear layer (K × width)."""
        return self[-1]


def _flatten(model: nn.Module) -> list[nn.Module]:
    """The modules of an ``nn.Sequential`` stack, nested Sequentials expanded, checked."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"model must be an nn.Sequential of Linear layers and elementwise activations; "
            f"got {type(model).__name__}"
        )
    mods: list[nn.Module] = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Sequential):
            mods += _flatten(m)
        elif isinstance(m, (nn.Linear, *_ELEMENTWISE)):
            mods.append(m)
        else:
            # BatchNorm, Dropout, attention...: they couple samples or are random, so the
            # gradient of a batch-summed output is not a per-sample Jacobian.
            raise ValueError(
                f"module {i} of the model is {type(m).__name__}; layer_agops/probe accept only "
                "Linear layers and elementwise activations (no batch-coupling or random layers)"
            )
    if not any(isinstance(m, nn.Linear) for m in mods):
        raise ValueError("model has no Linear layer")
    return mods


def _select(mods: list[nn.Module], layers: Iterable[int | nn.Module] | None) -> list[int]:
    """Positions in ``mods`` of the selected Linear layers (ints index the Linear layers)."""
    lin_pos = [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)]
    if layers is None:
        return lin_pos
    if isinstance(layers, (int, nn.Module)):
        layers = [layers]
    out = []
    for sel in layers:
        if isinstance(sel, nn.Module):
            hits = [i for i in lin_pos if mods[i] is sel]
            if len(hits) != 1:
                what = "is not a Linear layer of the model" if not hits else "appears twice"
                raise ValueError(f"layers: the module {sel!r} {what}; select it by index")
            out.append(hits[0])
        elif isinstance(sel, (int, np.integer)) and not isinstance(sel, bool):
            if not -len(lin_pos) <= sel < len(lin_pos):
                raise ValueError(f"layers: index {sel} out of range; the model has "
                                 f"{len(lin_pos)} Linear layer(s)")
            out.append(lin_pos[sel])
        else:
            raise ValueError(f"layers must hold Linear modules or integer indices; got {sel!r}")
    return out


def _as_inputs(X: ArrayLike, mods: list[nn.Module], name: str = "X") -> torch.Tensor:
    """``X`` validated (N × D, finite, D = the first Linear's in_features) on the model's device."""
    first = next(m for m in mods if isinstance(m, nn.Linear))
    check_matrix(X, name)
    if X.shape[1] != first.in_features:
        raise ValueError(f"{name} has {X.shape[1]} column(s) but the model's first Linear "
                         f"layer takes {first.in_features} inputs")
    w = first.weight
    return torch.as_tensor(X).to(device=w.device, dtype=w.dtype)


def _forward_grams(mods: list[nn.Module], positions: list[int], xb: torch.Tensor
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One batch: (outputs B × K, the inputs of the selected layers, Σ_i J_{h_l,i}ᵀ J_{h_l,i}).

    J_{h_l,i} (K × out_l) is the Jacobian of sample i's outputs w.r.t. the pre-activation
    h_l = W_l x_l. Samples are independent (checked by :func:`_flatten`), so the gradient of the
    batch sum of output k w.r.t. h_l has row i equal to ∂f_k(x_i)/∂h_{l,i}: K backward passes
    give every layer's Jacobians. The pass is :mod:`agop.models.layers`' hooked one, shared with
    any model; ``positions`` must be distinct. The Gram sums are float64.
    """
    out, inputs, grams = _layers._forward_grams(nn.Sequential(*mods), [mods[p] for p in positions],
                                                xb, inputs=True)
    if out.ndim != 2:
        raise ValueError("the model must map N × D to N × K; got outputs of shape "
                         f"{tuple(out.shape)}")
    return out, inputs, grams


def _row_bytes(mods: list[nn.Module], itemsize: int) -> int:
    """Working bytes per sample of a forward + K backward passes plus float64 stage copies."""
    widths = [m.out_features + m.in_features for m in mods if isinstance(m, nn.Linear)]
    return 4 * itemsize * sum(widths) + 3 * 8 * sum(widths)


def layer_agops(model: nn.Module, X: ArrayLike, layers: Iterable[int | nn.Module] | None = None,
                batch_size: int | None = None) -> list[torch.Tensor]:
    """AGOP of the model's outputs w.r.t. the input of each selected Linear layer (Section 3.3).

    AGOP_l = (1/N) Σ_i (∂f(x_i)/∂x_l)ᵀ (∂f(x_i)/∂x_l), computed as W_lᵀ (Σ_i J_{h_l,i}ᵀ J_{h_l,i})
    W_l / N with h_l = W_l x_l (+ b_l) the pre-activation, since ∂f/∂x_l = (∂f/∂h_l) W_l: one
    forward and K backward passes per batch serve every layer. Streams over batches of
    ``batch_size`` rows (default: planned from free memory), so memory does not grow with N.

    Parameters
    ----------
    model : nn.Sequential
        Nested ones allowed, of ``nn.Linear`` layers (with or without bias) and elementwise
        activations, mapping N × D to N × K. Anything that couples samples or is random
        (BatchNorm, Dropout) is refused.
    X : array_like
        N × D inputs, converted to the model's dtype and device.
    layers : iterable of int or nn.Linear, optional
        Which Linear layers: modules of the model or indices into the list of its Linear
        layers (negative allowed; −1 is the readout). Default: all.
    batch_size : int, optional
        Rows per batch (default: planned from free memory).

    Returns
    -------
    list of torch.Tensor
        One float64 D_l × D_l tensor per selected layer (D_l its in_features), in the order
        selected, on the model's device.
    """
    mods = _flatten(model)
    positions = _select(mods, layers)
    X = _as_inputs(X, mods)
    N = X.shape[0]
    if batch_size is None:
        batch_size = backend.plan_rows(_row_bytes(mods, X.element_size()), N, X.device,
                                       fraction=0.25)
    batch_size = check_int(batch_size, "batch_size")
    distinct = list(dict.fromkeys(positions))  # each layer once, in the order selected
    totals = None
    for i0 in range(0, N, batch_size):
        _, _, grams = _forward_grams(mods, distinct, X[i0:i0 + batch_size])
        totals = grams if totals is None else [t.add_(g) for t, g in zip(totals, grams)]
    out = []
    for p in positions:
        W = mods[p].weight.detach().to(torch.float64)
        out.append(W.T @ totals[distinct.index(p)] @ W / N)
    return out


# ----------------------------------------------------------------------------- probes
def correlation(A: ArrayLike, B: ArrayLike) -> float:
    """Pearson correlation of the entries of two equally shaped matrices, in float64.

    The NFA correlation of Figure 8: subtract each matrix's mean entry, then take the cosine of
    the flattened matrices. Invariant to positive scaling of either argument; ρ(A, A) = 1,
    ρ(A, −A) = −1. NaN when either matrix is constant (no variation to correlate).
    """
    a = torch.as_tensor(A).detach().to(torch.float64)
    b = torch.as_tensor(B).detach().to(device=a.device, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"correlation needs matrices of one shape; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    a = a.flatten() - a.mean()
    b = b.flatten() - b.mean()
    den = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return float(a @ b) / den if den > 0 else math.nan


def _svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᵀ) of W = U S Vᵀ, thin SVD in float64: U out × r, S (r,), Vᵀ r × in, r = min."""
    return torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)


def _nfa(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, G: torch.Tensor, N: int
         ) -> dict[str, float]:
    """ρ(WᵀW, AGOP) and ρ(WᵀW, AGOP^{1/2}) of a layer W = U S Vᵀ from G = Σ_i J_{h,i}ᵀ J_{h,i}.

    AGOP = Wᵀ G W / N = V C Vᵀ with C = S Uᵀ G U S / N (r × r), and WᵀW = V S² Vᵀ. V has
    orthonormal columns, so AGOP^{1/2} = V C^{1/2} Vᵀ, ⟨V A Vᵀ, V B Vᵀ⟩_F = ⟨A, B⟩_F and the
    entry sum of V A Vᵀ is vᵀ A v with v = Vᵀ1: the Pearson correlation of the D × D matrices
    comes from r × r ones, with an r × r instead of a D × D eigendecomposition (D = 3,072 for
    CIFAR-10's first layer).
    """
    C = S[:, None] * (U.T @ G @ U) * S[None, :] / N
    v = Vh.sum(dim=1)
    n = Vh.shape[1] ** 2

    def rho(A: torch.Tensor, B: torch.Tensor) -> float:
        sa, sb = v @ A @ v, v @ B @ v
        var = ((A * A).sum() - sa * sa / n) * ((B * B).sum() - sb * sb / n)
        return float(((A * B).sum() - sa * sb / n) / var.sqrt()) if var > 0 else math.nan

    nfm = torch.diag(S * S)
    return {"nfa": rho(nfm, C), "nfa_sqrt": rho(nfm, psd_power(C, 0.5))}


def _stages(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], H: torch.Tensor,
            activation: Callable) -> dict[str, torch.Tensor]:
    """:func:`layer_stages` from the layer's SVD (U, S, Vᵀ) and float64 inputs H (N × in)."""
    U, S, Vh = svd
    right = (H @ Vh.T) * S  # (N, r)
    return {"input": H, "right": right, "output": activation(right @ U.T)}


def layer_stages(W: ArrayLike, H: ArrayLike, activation: Callable = torch.relu
                 ) -> dict[str, torch.Tensor]:
    """The three stages of one bias-free layer (Section 4, Figure 1) for inputs H, in float64.

    With W = U S Vᵀ (thin SVD): ``"input"`` H, ``"right"`` H V S (the rows of S Vᵀ Φ(X)),
    ``"output"`` σ(H V S Uᵀ) = σ(H Wᵀ). U has orthonormal columns, so NC1 of H Wᵀ before σ
    equals NC1 of ``"right"``. :func:`probe` measures exactly these tensors.

    Parameters
    ----------
    W : array_like
        The layer's weight, out × in.
    H : array_like
        The layer's inputs Φ(X), N × in (moved to W's device, float64).
    activation : callable
        σ, applied elementwise (default ReLU).

    Returns
    -------
    dict of str to torch.Tensor
        ``"input"`` N × in, ``"right"`` N × r with r = min(out, in), ``"output"`` N × out.
    """
    W = torch.as_tensor(W)
    H = torch.as_tensor(H).to(device=W.device, dtype=torch.float64)
    return _stages(_svd(W), H, activation)


def _mlp_layout(model: nn.Module) -> tuple[list[nn.Module], list[int]]:
    """Modules and hidden-Linear positions of an MLP-shaped stack [Linear, act]* Linear."""
    mods = _flatten(model)
    kinds = ["L" if isinstance(m, nn.Linear) else "a" for m in mods]
    depth = (len(kinds) - 1) // 2
    if depth < 1 or kinds != ["L", "a"] * depth + ["L"]:
        raise ValueError("probe needs an MLP-shaped stack: [Linear, activation] × depth (≥ 1), "
                         f"then a Linear readout; got {[type(m).__name__ for m in mods]}")
    hidden = [2 * j for j in range(depth)]
    biased = [j + 1 for j, p in enumerate(hidden) if mods[p].bias is not None]
    if biased:
        raise ValueError(f"hidden layer(s) {biased} have a bias; the stages S Vᵀ Φ(X) and "
                         "σ(U S Vᵀ Φ(X)) of Section 4 are defined for bias-free layers")
    return mods, hidden


def _metrics(acc: CollapseAccumulator, where: str) -> dict[str, float]:
    values = acc.compute(strict=False)  # e.g. a dead layer: all class means equal
    undefined = sorted(k for k, v in values.items() if math.isnan(v))
    if undefined:
        warnings.warn(f"collapse metrics {undefined} undefined at {where}; recorded as NaN",
                      stacklevel=3)
    return values


def _probe(mods: list[nn.Module], hidden: list[int], X: torch.Tensor, y: torch.Tensor,
           K: int, batch_size: int, X_test: torch.Tensor | None = None,
           y_test: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """:func:`probe` on validated tensors already on the model's device."""
    N, dev = X.shape[0], X.device
    svds = [_svd(mods[p].weight) for p in hidden]
    accs = [{"input": CollapseAccumulator(K, mods[p].in_features),
             "right": CollapseAccumulator(K, S.shape[0]),
             "output": CollapseAccumulator(K, mods[p].out_features)}
            for p, (_, S, _) in zip(hidden, svds)]
    grams = None
    sse = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    for i0 in range(0, N, batch_size):
        yb = y[i0:i0 + batch_size]
        out, inputs, G = _forward_grams(mods, hidden, X[i0:i0 + batch_size])
        grams = G if grams is None else [t.add_(g) for t, g in zip(grams, G)]
        sse += (out.to(torch.float64) - signed_one_hot(yb, K, torch.float64)).square().sum()
        correct += (out.argmax(dim=1) == yb).sum()
        with torch.no_grad():
            for p, x, svd, acc in zip(hidden, inputs, svds, accs):
                for stage, H in _stages(svd, x.to(torch.float64), mods[p + 1]).items():
                    acc[stage].update(H, yb)
    test_acc = None
    if X_test is not None:
        hits = torch.zeros((), dtype=torch.int64, device=dev)
        net = nn.Sequential(*mods)
        with torch.no_grad():
            for i0 in range(0, X_test.shape[0], batch_size):
                hits += (net(X_test[i0:i0 + batch_size]).argmax(dim=1)
                         == y_test[i0:i0 + batch_size]).sum()
        test_acc = float(hits) / X_test.shape[0]
    common = {"loss": float(sse) / (N * K), "train_acc": float(correct) / N, "test_acc": test_acc}
    rows = []
    for j, (svd, G, acc) in enumerate(zip(svds, grams, accs), start=1):
        nfa = _nfa(*svd, G, N)
        for stage in STAGES:
            rows.append({"layer": j, "stage": stage, **_metrics(acc[stage], f"layer {j} {stage}"),
                         **nfa, **common})
    return rows


def _as_data(mods: list[nn.Module], X: ArrayLike, y: ArrayLike, num_classes: int | None,
             name: str = "X", require_all: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    Xt = _as_inputs(X, mods, name)
    labels, K = as_labels(y, Xt.shape[0], num_classes=num_classes,
                          name="y" if name == "X" else f"y_{name[2:]}",
                          require_all=require_all, min_classes=2 if require_all else 1)
    readout = [m for m in mods if isinstance(m, nn.Linear)][-1]
    if K != readout.out_features:
        raise ValueError(f"the labels have K = {K} classes but the model has "
                         f"{readout.out_features} outputs")
    return Xt, torch.as_tensor(labels, device=Xt.device), K


def probe(model: nn.Module, X: ArrayLike, y: ArrayLike, *, num_classes: int | None = None,
          X_test: ArrayLike | None = None, y_test: ArrayLike | None = None,
          batch_size: int | None = None) -> list[dict[str, Any]]:
    """Every measurement of Section 4 / Appendix B at the model's current weights.

    One row per hidden layer l (from 1) and stage ("input" Φ_l(X), "right" S Vᵀ Φ_l(X),
    "output" σ(U S Vᵀ Φ_l(X)); Figures 1, 7) holding the ``agop.collapse.measure`` metrics of that
    stage (including tr Σ_W/tr Σ_T and tr Σ_B/tr Σ_T of Figure 8), the NFA correlations
    ``nfa`` = ρ(W_lᵀW_l, AGOP_l) and ``nfa_sqrt`` = ρ(W_lᵀW_l, AGOP_l^{1/2}) (Figure 8, AGOP_l
    w.r.t. the input of layer l over X, square root by ``agop.linalg.psd_power``), the training
    ``loss`` (mean squared error over all N·K entries against ±1 one-hot targets), ``train_acc``
    and ``test_acc`` (None without a test set). Streams over batches of ``batch_size`` rows.

    Parameters
    ----------
    model : nn.Module
        MLP-shaped: [bias-free Linear, elementwise activation] × depth, then a Linear readout.
    X, y : array_like
        Training inputs N × D and labels (N,) in 0..K−1.
    num_classes : int, optional
        K (default: from the labels; must equal the readout's outputs).
    X_test, y_test : array_like, optional
        A test set for ``test_acc`` (any subset of the classes).
    batch_size : int, optional
        Rows per batch (default: planned from free memory).

    Returns
    -------
    list of dict
        One row per hidden layer (from 1) and stage, in that order.
    """
    mods, hidden = _mlp_layout(model)
    Xt, yt, K = _as_data(mods, X, y, num_classes)
    Xs = ys = None
    if X_test is not None:
        Xs, ys, _ = _as_data(mods, X_test, y_test, K, "X_test", require_all=False)
    if batch_size is None:
        batch_size = backend.plan_rows(_row_bytes(mods, Xt.element_size()), Xt.shape[0],
                                       Xt.device, fraction=0.25)
    with backend.strict_fp32():
        return _probe(mods, hidden, Xt, yt, K, check_int(batch_size, "batch_size"), Xs, ys)


# ----------------------------------------------------------------------------- training
def measurement_epochs(epochs: int, every: int) -> list[int]:
    """The epochs measured: 0 (before training), every ``every``-th, and the last."""
    return sorted(set(range(0, epochs + 1, every)) | {epochs})


class EpochStep(NamedTuple):
    """One epoch of :meth:`Trainer.iter_epochs`: its number (from 1), mean batch loss and the
    :meth:`Trainer.measure` rows taken after it (empty off the measurement schedule)."""

    epoch: int
    loss: float
    rows: list[dict[str, Any]]


class Trainer:
    """Adam on the MSE to ±1 one-hot targets (Section 4, Appendix C), one epoch at a time.

    Loss: the mean of the squared errors over the batch's B·K entries (``torch.nn.MSELoss``'s
    "mean"). Each epoch visits the N points in a random order drawn from ``generator`` (a CPU
    ``torch.Generator``; its state is part of :meth:`state_dict`, so a resumed run draws the same
    orders) in batches of ``batch_size`` (the last one may be smaller). No weight decay.
    ``reset_optimizer`` re-creates Adam at the start of every epoch, as the authors' scripts did.
    The model computes in its own dtype and device; ``X`` (N × D) and ``y`` move there.
    """

    def __init__(self, model: nn.Module, X: ArrayLike, y: ArrayLike, *,
                 num_classes: int | None = None, lr: float = 2e-5, batch_size: int = 128,
                 reset_optimizer: bool = False, generator: torch.Generator | None = None,
                 X_test: ArrayLike | None = None, y_test: ArrayLike | None = None,
                 measure_batch_size: int | None = None):
        self.model = model
        self._mods, self._hidden = _mlp_layout(model)
        self.X, self.y, self.num_classes = _as_data(self._mods, X, y, num_classes)
        self.T = signed_one_hot(self.y, self.num_classes, self.X.dtype)
        self.X_test = self.y_test = None
        if X_test is not None:
            self.X_test, self.y_test, _ = _as_data(self._mods, X_test, y_test, self.num_classes,
                                                   "X_test", require_all=False)
        check_positive(lr, "lr")
        self.lr = float(lr)
        self.batch_size = check_int(batch_size, "batch_size")
        self.reset_optimizer = bool(reset_optimizer)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if self.generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (shuffling is drawn on the "
                             "CPU so that every device sees the same order)")
        if measure_batch_size is None:
            measure_batch_size = backend.plan_rows(
                _row_bytes(self._mods, self.X.element_size()), self.X.shape[0], self.X.device,
                fraction=0.25)
        self.measure_batch_size = check_int(measure_batch_size, "measure_batch_size")
        self.epoch = 0
        self.optimizer = self._new_optimizer()
        #: wall seconds spent training and measuring by this object (not checkpointed)
        self.seconds = {"train": 0.0, "measure": 0.0}

    def _new_optimizer(self) -> torch.optim.Adam:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=0.0)

    def train_epoch(self) -> float:
        """One pass over the data; returns the mean of the batch losses weighted by batch size."""
        started = time.perf_counter()
        if self.reset_optimizer:
            self.optimizer = self._new_optimizer()
        N, B = self.X.shape[0], self.batch_size
        order = torch.randperm(N, generator=self.generator).to(self.X.device)
        total = torch.zeros((), dtype=torch.float64, device=self.X.device)
        for i0 in range(0, N, B):
            idx = order[i0:i0 + B]
            loss = F.mse_loss(self.model(self.X[idx]), self.T[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach().to(torch.float64) * idx.shape[0]
        self.epoch += 1
        mean = float(total) / N  # synchronizes the device: the time below is real
        self.seconds["train"] += time.perf_counter() - started
        return mean

    def measure(self) -> list[dict[str, Any]]:
        """:func:`probe` rows at the current weights, each with ``"epoch"`` first."""
        started = time.perf_counter()
        rows = _probe(self._mods, self._hidden, self.X, self.y, self.num_classes,
                      self.measure_batch_size, self.X_test, self.y_test)
        self.seconds["measure"] += time.perf_counter() - started
        return [{"epoch": self.epoch, **r} for r in rows]

    def iter_epochs(self, epochs: int, measure_every: int = 10) -> Iterator["EpochStep"]:
        """Train from the current epoch up to ``epochs``, one :class:`EpochStep` per epoch.

        A step's ``rows`` are :meth:`measure`'s at that epoch when it is one of
        :func:`measurement_epochs` (else empty). Epoch 0 is not a step: measure it first
        (:meth:`fit` does). The caller may save a checkpoint between steps (:meth:`state_dict`).

        Parameters
        ----------
        epochs : int
            The epoch to train up to (≥ the current one).
        measure_every : int
            Measure every ``measure_every``-th epoch, and the last.

        Yields
        ------
        EpochStep
            ``epoch`` (just finished, from 1), ``loss`` (its mean batch loss), ``rows``.
        """
        epochs = check_int(epochs, "epochs", minimum=0)
        if epochs < self.epoch:
            raise ValueError(f"epochs = {epochs} but training is already at epoch {self.epoch}")
        schedule = set(measurement_epochs(epochs, check_int(measure_every, "measure_every")))

        def steps() -> Iterator[EpochStep]:
            while self.epoch < epochs:
                loss = self.train_epoch()
                yield EpochStep(self.epoch, loss,
                                self.measure() if self.epoch in schedule else [])

        return steps()  # a generator of its own, so that bad arguments raise at the call

    def fit(self, epochs: int, measure_every: int = 10,
            on_measure: Callable[["Trainer", list[dict[str, Any]]], None] | None = None,
            progress: bool = False) -> list[dict[str, Any]]:
        """Train from the current epoch up to ``epochs``, measuring on :func:`measurement_epochs`.

        Epoch 0 is measured first if training has not started.

        Parameters
        ----------
        epochs : int
            The epoch to train up to.
        measure_every : int
            Measure every ``measure_every``-th epoch, and the last.
        on_measure : callable, optional
            ``on_measure(trainer, rows)``, called after each measurement (e.g. to save
            records and a checkpoint).
        progress : bool
            Show a progress bar (tqdm, on stderr).

        Returns
        -------
        list of dict
            The rows measured by this call.
        """
        steps = self.iter_epochs(epochs, measure_every)  # checks the arguments
        rows: list[dict[str, Any]] = []

        def measured(new: list[dict[str, Any]]) -> None:
            rows.extend(new)
            if on_measure is not None:
                on_measure(self, new)

        if self.epoch == 0:
            measured(self.measure())
        from tqdm.auto import tqdm

        with tqdm(total=epochs, initial=self.epoch, disable=not progress, unit="epoch",
                  desc="mlp", dynamic_ncols=True) as bar:
            for step in steps:
                bar.update(1)
                bar.set_postfix(loss=f"{step.loss:.4g}")
                if step.rows:
                    measured(step.rows)
        return rows

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: epoch, model, optimizer, shuffling RNG."""
        return {"epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "model", "optimizer", "generator"} - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)}; it is not an MLP checkpoint")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])


def train(model: nn.Module, X: ArrayLike, y: ArrayLike, *, num_classes: int | None = None,
          epochs: int = 250, lr: float = 2e-5, batch_size: int = 128,
          reset_optimizer: bool = False, measure_every: int = 10,
          X_test: ArrayLike | None = None, y_test: ArrayLike | None = None,
          generator: torch.Generator | None = None, progress: bool = False
          ) -> list[dict[str, Any]]:
    """Train ``model`` in place (Appendix C defaults) and return the :func:`probe` rows.

    See :class:`Trainer` for the loss, batching and ``generator`` (default: seeded with 0);
    the arguments are its own and :meth:`Trainer.fit`'s.

    Returns
    -------
    list of dict
        :func:`probe` rows with ``"epoch"`` first, at :func:`measurement_epochs` (epoch 0
        included).
    """
    trainer = Trainer(model, X, y, num_classes=num_classes, lr=lr, batch_size=batch_size,
                      reset_optimizer=reset_optimizer, generator=generator, X_test=X_test,
                      y_test=y_test)
    with backend.strict_fp32():
        return trainer.fit(epochs, measure_every, progress=progress)
