"""Collapse, AGOP and the Neural Feature Ansatz at any layer of any PyTorch network.

- :func:`layer_agops`: the AGOP of a model's outputs w.r.t. the input of named ``nn.Linear``
  layers, and w.r.t. the input *patches* of named ``nn.Conv2d`` layers.
- :func:`layer_collapse`: the collapse metrics (``agop.collapse``) of named modules' outputs,
  streamed over arrays or a ``torch.utils.data.DataLoader``.
- :func:`nfa`: the Neural Feature Ansatz correlations ρ(WᵀW, AGOP) and ρ(WᵀW, AGOP^{1/2}) of
  named Linear and Conv2d layers (Section 4 of the paper; for convolutions, Radhakrishnan et
  al., "Mechanism of feature learning in convolutional neural networks": filter covariances
  WᵀW against the AGOP over input patches).

Layers are named as ``model.named_modules()`` names them (``"layer3.1.conv2"``; ``""`` is the
model itself) or passed as the module objects; results are keyed by name. Everything is found
with forward hooks, so any ``forward`` works: residual blocks, BatchNorm, pooling, functional
calls. One forward and K backward passes per batch serve every selected layer (K the number of
outputs per sample); batches are planned from free memory (``agop.backend.plan_rows``).

A model must be a per-sample function: the output for a sample may not depend on the other
samples of its batch, or the gradient of a batch-summed output would not be a per-sample
Jacobian and batch features would not be the sample's features. In eval mode (BatchNorm on its
running statistics, Dropout off) ordinary networks are; a model in training mode is refused
unless every module in it behaves the same in both modes (Linear, convolutions, pooling,
elementwise activations, ...), and a model whose output still depends on the batch is refused
after a check: one sample of a batch is perturbed and the others' outputs must not move.

Conventions: samples are rows (inputs N × …, any shape the model takes); the AGOP carries the
1/N of Section 3.3; models compute in their own dtype; Gram sums, AGOPs, correlations and
collapse metrics are float64. The MLP study (:mod:`agop.models.mlp`) runs its gradients through
the same hooked pass.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from agop import backend
from agop._validate import ArrayLike, as_labels, check_finite, check_int
from agop.collapse import CollapseAccumulator
from agop.linalg import psd_power

__all__ = ["layer_agops", "layer_collapse", "nfa", "weight_matrix"]

Layers = Iterable["str | nn.Module"] | str | nn.Module | None

#: Layers whose AGOP is defined here (a Conv2d needs groups = 1).
AGOP_LAYERS = (nn.Linear, nn.Conv2d)

# Module types whose forward ignores ``self.training``: a model built only of these may be
# measured in training mode (the paper's MLP is created in it). Anything else (BatchNorm,
# Dropout, RReLU, a custom forward that may read self.training) must be in eval mode.
_MODE_FREE = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.Softmax, nn.LogSoftmax,
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU,
    nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softsign, nn.Tanhshrink,
)

_CHECK_ROWS = 8  # samples in the batch-dependence check


# ----------------------------------------------------------------------------- checks
def _mode_free(m: nn.Module) -> bool:
    return any(isinstance(m, c) and type(m).forward is c.forward for c in _MODE_FREE)


def _check_mode(model: nn.Module) -> None:
    """Refuse a model in training mode unless none of its modules can tell the modes apart."""
    for name, m in model.named_modules():
        if m.training and not _mode_free(m):
            where = f"{type(m).__name__} {name!r}" if name else type(m).__name__
            raise ValueError(
                f"the model is in training mode ({where} may behave differently in training: "
                "BatchNorm uses batch statistics, Dropout is random); call model.eval() first")


def _home(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """Device and floating dtype of the model's first floating parameter or buffer."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), None


def _as_batch(x: Any, device: torch.device, dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """Inputs with a leading sample axis, on the model's device (floating ones in its dtype)."""
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be a numeric array or tensor; got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a leading sample axis and at least one feature axis "
                         f"(N × …, N ≥ 1); got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name} must be real-valued; got dtype {x.dtype}")
    check_finite(x, name)
    x = x.detach()
    if x.is_floating_point() and dtype is not None:
        return x.to(device=device, dtype=dtype)
    return x.to(device)


def _output(out: Any, rows: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return a tensor (N × …); got {type(out).__name__}")
    if out.ndim < 1 or out.shape[0] != rows:
        raise ValueError(f"the model's output has shape {tuple(out.shape)} for a batch of "
                         f"{rows}: its first axis must be the samples")
    return out


def _probe(model: nn.Module, xb: torch.Tensor, targets: Mapping[str, nn.Module]
           ) -> tuple[int, dict[str, int]]:
    """Check that the model is per-sample on ``xb``; measure what one sample costs.

    Runs the model on up to 8 rows of ``xb``, then again with row 0 perturbed: the outputs of
    the other rows must not move beyond rounding (1000 ε of the output scale), else the model
    couples samples (BatchNorm in training mode, a batch mean in ``forward``...) and is refused.
    Returns the elements per sample of every leaf module's output (the activations a forward
    keeps) and of each target's output.
    """
    xb = xb[:_CHECK_ROWS]
    B = xb.shape[0]
    sizes = {"leaves": 0}
    per_target: dict[str, int] = {}

    def count(m, args, out):
        if isinstance(out, torch.Tensor):
            sizes["leaves"] += out.numel()

    def measure(name):
        def hook(m, args, out):
            if isinstance(out, torch.Tensor):
                per_target[name] = out.numel() // max(out.shape[0], 1) if out.ndim else 1
        return hook

    handles = [m.register_forward_hook(count) for m in model.modules() if not any(m.children())]
    handles += [m.register_forward_hook(measure(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            out = _output(model(xb), B)
    finally:
        for h in handles:
            h.remove()
    if B >= 2:
        xp = xb.clone()
        if xp.is_floating_point():
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(xp[0].shape, generator=g, dtype=torch.float64)
            xp[0] += noise.to(xp) * (1.0 + float(xb.abs().max()))
        else:  # indices (an embedding's input): another sample's, valid by construction
            xp[0] = xb[-1]
        with torch.no_grad():
            moved = _output(model(xp), B)
        a, b = out[1:].to(torch.float64), moved[1:].to(torch.float64)
        if not bool(torch.isfinite(a).all()):
            raise ValueError("the model's outputs on the first rows of the data are not finite")
        diff = float((a - b).abs().max())
        scale = float(a.abs().max())
        eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
        if not diff <= 1000 * eps * scale:  # NaN counts as moved
            raise ValueError(
                f"the model's output for a sample depends on the other samples of its batch "
                f"(changing one sample moved the others' outputs by {diff:.3g}, scale "
                f"{scale:.3g}); per-sample AGOPs and features need model.eval() and no layer "
                "that mixes samples")
    return sizes["leaves"] // B, per_target


# ----------------------------------------------------------------------------- selection
def _resolve(model: nn.Module, layers: Layers, *, agop: bool) -> dict[str, nn.Module]:
    """The selected modules by name (``named_modules`` names), in the order given.

    None: every Linear and Conv2d layer. With ``agop`` each must be a Linear or a Conv2d with
    groups = 1.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    by_name = dict(model.named_modules())
    if layers is None:
        found = {n: m for n, m in by_name.items() if isinstance(m, AGOP_LAYERS)}
        if not found:
            raise ValueError("the model has no Linear or Conv2d layer; name the layers to use")
    else:
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        by_id = {id(m): n for n, m in by_name.items()}  # named_modules lists each module once
        found = {}
        for sel in layers:
            if isinstance(sel, str):
                if sel not in by_name:
                    some = [n for n in by_name if n][:6]
                    raise ValueError(f"layers: the model has no module named {sel!r} (names "
                                     f"are model.named_modules() names, e.g. {some})")
                found[sel] = by_name[sel]
            elif isinstance(sel, nn.Module):
                if id(sel) not in by_id:
                    raise ValueError(f"layers: a {type(sel).__name__} that is not a module "
                                     "of the model")
                found[by_id[id(sel)]] = sel
            else:
                raise ValueError(f"layers must hold module names (str) or modules of the "
                                 f"model; got {sel!r}")
        if not found:
            raise ValueError("layers is empty; name at least one module")
    if agop:
        for n, m in found.items():
            if not isinstance(m, AGOP_LAYERS):
                raise ValueError(f"layer {n!r} is {type(m).__name__}; AGOPs and the NFA are "
                                 "defined here for nn.Linear and nn.Conv2d layers")
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"layer {n!r} is a Conv2d with groups = {m.groups}; only "
                                 "groups = 1 is supported (one patch AGOP per layer)")
    return found


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as the matrix acting on one input (patch), float64: out × in for a Linear,
    C_out × (C_in·k_h·k_w) for a Conv2d (the order of ``torch.nn.functional.unfold``)."""
    w = layer.weight.detach().to(torch.float64)
    return w.reshape(w.shape[0], -1)


# ----------------------------------------------------------------------------- data
class _Data:
    """Batches of inputs (and labels) from arrays or a DataLoader, on the model's device."""

    def __init__(self, model: nn.Module, data: Any, y: ArrayLike | None = None, *,
                 labels: bool = False, num_classes: int | None = None, name: str = "X"):
        self.device, self.dtype = _home(model)
        self.name = name
        self.labels = labels
        self.num_classes = num_classes
        if isinstance(data, DataLoader):
            self.loader, self.X, self.y = data, None, None
            if y is not None:
                raise ValueError("y must be None when the data is a DataLoader: its batches "
                                 "carry the labels as (inputs, labels)")
            if labels and num_classes is None:
                raise ValueError("num_classes is needed with a DataLoader (its labels are "
                                 "seen one batch at a time)")
            if num_classes is not None:
                self.num_classes = check_int(num_classes, "num_classes", minimum=2)
        else:
            self.loader = None
            self.X = _as_batch(data, self.device, self.dtype, name)
            self.y = None
            if labels:
                if y is None:
                    raise ValueError(f"y (N labels) is needed with array {name}")
                arr, self.num_classes = as_labels(y, self.X.shape[0], num_classes=num_classes)
                self.y = torch.from_numpy(arr)

    def _split(self, item: Any, i: int) -> tuple[torch.Tensor, Any]:
        if isinstance(item, (tuple, list)) and len(item) >= 1:
            x, yb = item[0], (item[1] if len(item) >= 2 else None)
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            x, yb = item, None
        else:
            raise ValueError(f"batch {i} of the DataLoader is a {type(item).__name__}; "
                             "expected inputs or (inputs, labels)")
        if self.labels and yb is None:
            raise ValueError(f"batch {i} of the DataLoader has no labels; collapse needs "
                             "(inputs, labels) batches")
        return _as_batch(x, self.device, self.dtype, f"batch {i} of the data"), yb

    def first(self) -> torch.Tensor:
        if self.loader is None:
            return self.X[:_CHECK_ROWS]
        for item in self.loader:
            return self._split(item, 0)[0]
        raise ValueError("the DataLoader yields no batch")

    def batches(self, batch_size: int | None) -> Iterator[tuple[torch.Tensor, Any]]:
        if self.loader is not None:
            for i, item in enumerate(self.loader):
                yield self._split(item, i)
            return
        N = self.X.shape[0]
        for i0 in range(0, N, batch_size):
            yield self.X[i0:i0 + batch_size], (None if self.y is None
                                               else self.y[i0:i0 + batch_size])

    def plan(self, batch_size: int | None, bytes_per_row: int, fixed_bytes: int = 0) -> int | None:
        """Rows per batch for arrays (``batch_size`` or planned; None for a DataLoader, whose
        batches are its own); checks that ``fixed_bytes`` fit either way."""
        N = self.X.shape[0] if self.loader is None else 1
        planned = backend.plan_rows(bytes_per_row, N, self.device, fixed_bytes=fixed_bytes,
                                    fraction=0.25)
        if self.loader is not None:
            if batch_size is not None:
                raise ValueError("batch_size must be None with a DataLoader (it has its own)")
            return None
        return check_int(batch_size, "batch_size") if batch_size is not None else planned


# ----------------------------------------------------------------------------- AGOP
def _gram_rows(layer: nn.Module, g: torch.Tensor, name: str) -> torch.Tensor:
    """∂f/∂h as rows, one per sample and position: (B·positions) × out."""
    if isinstance(layer, nn.Conv2d):
        if g.ndim != 4:
            raise ValueError(f"Conv2d {name!r} produced an output of shape {tuple(g.shape)}; "
                             "expected batched N × C × H × W")
        return g.movedim(1, -1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def _forward_grams(model: nn.Module, layers: list[nn.Module], xb: torch.Tensor, *,
                   names: list[str] | None = None, inputs: bool = False
                   ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor]]:
    """One batch: (outputs, the layers' inputs if asked, Σ g gᵀ per layer in float64).

    g runs over ∂f_k(x_i)/∂h_{l,i,p} for every output k, sample i and position p (one position
    for a Linear on N × D inputs, H'·W' for a Conv2d), h_l the layer's output; the model must be
    per-sample, so the gradient of the batch sum of output k w.r.t. h_l holds those rows, and K
    backward passes serve every layer. Each layer's output is captured by a forward hook and
    replaced by a copy, so that a later in-place op (``ReLU(inplace=True)``) cannot change the
    tensor the gradient is taken w.r.t. A layer must run exactly once per forward pass.
    """
    names = names if names is not None else [type(m).__name__ for m in layers]
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    ins: list[torch.Tensor | None] = [None] * len(layers)

    def hook_for(j: int):
        def hook(m, args, out):
            captured[j].append(out)
            if inputs:
                ins[j] = args[0].detach()
            return out.clone()
        return hook

    x = xb.detach()
    if x.is_floating_point():
        x.requires_grad_(True)  # so that every h_l is in the graph even if the model is frozen
    handles = [m.register_forward_hook(hook_for(j)) for j, m in enumerate(layers)]
    try:
        with torch.enable_grad():
            out = _output(model(x), xb.shape[0])
    finally:
        for h in handles:
            h.remove()
    for name, c in zip(names, captured):
        if len(c) != 1:
            raise ValueError(f"layer {name!r} ran {len(c)} times in one forward pass; its "
                             "input is ambiguous (select a layer that runs once)")
        if not c[0].requires_grad:
            raise ValueError(f"the output of layer {name!r} does not depend on anything "
                             "differentiable; cannot take gradients through it")
    hs = [c[0] for c in captured]
    f = out.reshape(out.shape[0], -1)
    grams = []
    for h, m in zip(hs, layers):
        C = h.shape[1] if isinstance(m, nn.Conv2d) else h.shape[-1]  # out features / channels
        grams.append(torch.zeros((C, C), dtype=torch.float64, device=h.device))
    K = f.shape[1]
    for k in range(K):
        grads = torch.autograd.grad(f[:, k].sum(), hs, retain_graph=k < K - 1,
                                    allow_unused=True)
        for G, g, m, name in zip(grams, grads, layers, names):
            if g is None:  # the layer does not reach this output
                continue
            g = _gram_rows(m, g.to(torch.float64), name)
            G.addmm_(g.T, g)
    return out.detach(), (ins if inputs else None), grams


def layer_agops(model: nn.Module, X: ArrayLike | DataLoader, layers: Layers | Iterable[int] = None,
                batch_size: int | None = None
                ) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """AGOP of the model's outputs w.r.t. the input of named Linear and Conv2d layers.

    Section 3.3's AGOP, (1/N) Σ_i J_iᵀ J_i with J_i the Jacobian of sample i's K outputs,
    taken w.r.t. a layer's input *through that layer*: ∂f/∂x_l = (∂f/∂h_l) W_l with h_l the
    layer's output, so a skip connection around the layer does not enter (the quantity the
    Neural Feature Ansatz compares with W_lᵀW_l; for a plain stack it is the full gradient).

    - ``nn.Linear`` (D_l inputs): AGOP_l = W_lᵀ (Σ_i J_{h,i}ᵀ J_{h,i}) W_l / N, D_l × D_l. On
      inputs with extra axes (N × T × D_l, tokens) the T positions are summed as for a Conv2d.
    - ``nn.Conv2d`` (any stride, padding, dilation, padding mode; groups = 1): the patch AGOP,
      the average over samples of the sum over output positions p of ∇_{x_p} f ∇_{x_p} fᵀ with
      x_p the input patch (C_in·k_h·k_w, the order of ``torch.nn.functional.unfold``) that
      position p sees: W_flatᵀ (Σ_{i,p} g_{i,p} g_{i,p}ᵀ) W_flat / N with g_{i,p} = ∂f/∂h at
      (i, p) and W_flat the C_out × C_in·k_h·k_w weight. The input is never unfolded.

    One forward and K backward passes per batch serve every layer; Gram sums are float64.
    The model must be a per-sample function (module docstring): a model in training mode with
    a module that behaves differently in training, or one whose output for a sample depends on
    the rest of its batch, is refused with ValueError.

    Parameters
    ----------
    model : nn.Module
        Maps a batch N × … to outputs N × … (flattened per sample to K outputs).
    X : array_like or DataLoader
        Inputs N × … (the shape the model takes), converted to the model's floating dtype and
        device; or a ``torch.utils.data.DataLoader`` of inputs or (inputs, labels) batches.
    layers : str, nn.Module, or an iterable of them, optional
        Linear / Conv2d layers by ``named_modules()`` name or as modules; default: every Linear
        and Conv2d layer. The MLP form, integer indices into an ``nn.Sequential``'s Linear
        layers (modules may be mixed in), is :func:`agop.models.mlp.layer_agops`' and returns
        its list.
    batch_size : int, optional
        Rows per batch for array inputs (default: planned from free memory).

    Returns
    -------
    dict of str to torch.Tensor
        ``{name: AGOP}``, float64 on the model's device, D_l × D_l for a Linear (D_l its
        in_features) and (C_in·k_h·k_w)² for a Conv2d; a list when ``layers`` holds integers.
    """
    if layers is not None and not isinstance(layers, (str, nn.Module)):
        layers = list(layers)
        if any(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in layers):
            if not isinstance(model, nn.Sequential):
                raise ValueError("integer layers index the Linear layers of an nn.Sequential "
                                 f"(the MLP form); name the layers of a {type(model).__name__}")
            from agop.models.mlp import layer_agops as sequential_agops

            return sequential_agops(model, X, layers, batch_size)
    targets = _resolve(model, layers, agop=True)
    _check_mode(model)
    data = _Data(model, X)
    with backend.strict_fp32():
        first = data.first()
        leaf_elems, out_elems = _probe(model, first, targets)
        item = first.element_size()
        per_row = (first[0].numel() * item + 3 * item * leaf_elems
                   + sum(out_elems.values()) * (item + 16))
        rows = data.plan(batch_size, per_row)
        names, mods = list(targets), list(targets.values())
        totals, N = None, 0
        for xb, _ in data.batches(rows):
            _, _, grams = _forward_grams(model, mods, xb, names=names)
            totals = grams if totals is None else [t.add_(g) for t, g in zip(totals, grams)]
            N += xb.shape[0]
    out = {}
    for name, m, G in zip(names, mods, totals):
        W = weight_matrix(m).to(G.device)
        out[name] = W.T @ G @ W / N
    return out


# ----------------------------------------------------------------------------- NFA
def nfa(model: nn.Module, X: ArrayLike | DataLoader | None = None, layers: Layers = None, *,
        agops: Mapping[str, torch.Tensor] | None = None, batch_size: int | None = None
        ) -> dict[str, dict[str, float]]:
    """Neural Feature Ansatz correlations of named Linear and Conv2d layers, in float64.

    Per layer, with W the weight as a matrix (:func:`weight_matrix`: out × in, or C_out ×
    C_in·k_h·k_w for a Conv2d) and AGOP its :func:`layer_agops` matrix: ``"nfa"`` =
    ρ(WᵀW, AGOP) and ``"nfa_sqrt"`` = ρ(WᵀW, AGOP^{1/2}), ρ the Pearson correlation of the
    entries (:func:`agop.models.mlp.correlation`, Figure 8), the square root by
    ``agop.linalg.psd_power``. For a Conv2d this is the convolutional ansatz of Radhakrishnan
    et al.: the filter covariance against the AGOP over input patches.

    Parameters
    ----------
    model : nn.Module
        As for :func:`layer_agops`.
    X : array_like or DataLoader, optional
        Inputs for the AGOPs (not needed when ``agops`` is given).
    layers : str, nn.Module or an iterable of them, optional
        As for :func:`layer_agops` (default: every Linear and Conv2d layer, or the keys of
        ``agops``).
    agops : mapping of str to tensor, optional
        AGOPs already computed (:func:`layer_agops`' result), keyed by layer name.
    batch_size : int, optional
        Rows per batch for array inputs.

    Returns
    -------
    dict of str to dict
        ``{name: {"nfa": ρ(WᵀW, AGOP), "nfa_sqrt": ρ(WᵀW, AGOP^{1/2})}}``; NaN where a matrix is
        constant.
    """
    from agop.models.mlp import correlation  # mlp imports this module: imported at call time

    if agops is None:
        if X is None:
            raise ValueError("nfa needs inputs X (or the AGOPs, agops=)")
        targets = _resolve(model, layers, agop=True)
        agops = layer_agops(model, X, list(targets.values()), batch_size)
    else:
        targets = _resolve(model, list(agops) if layers is None else layers, agop=True)
    out = {}
    for name, m in targets.items():
        if name not in agops:
            raise ValueError(f"agops has no entry for layer {name!r}")
        A = torch.as_tensor(agops[name]).to(torch.float64)
        W = weight_matrix(m).to(A.device)
        if A.shape != (W.shape[1], W.shape[1]):
            raise ValueError(f"agops[{name!r}] has shape {tuple(A.shape)}; layer {name!r} "
                             f"takes {W.shape[1]} inputs per position")
        F = W.T @ W
        out[name] = {"nfa": correlation(F, A), "nfa_sqrt": correlation(F, psd_power(A, 0.5))}
    return out


# ----------------------------------------------------------------------------- collapse
def _features(out: torch.Tensor, pool: bool) -> torch.Tensor:
    """A module's output as float64 features N × D: flattened, or with ``pool`` averaged over
    the axes after the channel axis (N × C × H × W → N × C)."""
    H = out.detach().to(torch.float64)
    if pool and H.ndim > 2:
        H = H.mean(dim=tuple(range(2, H.ndim)))
    return H.reshape(H.shape[0], -1)


def layer_collapse(model: nn.Module, data: ArrayLike | DataLoader, layers: Layers = None,
                   y: ArrayLike | None = None, *, pool: bool = False, pinv: bool = False,
                   num_classes: int | None = None, batch_size: int | None = None
                   ) -> dict[str, dict[str, float]]:
    """Collapse metrics (NC1, NC2, ...) of the outputs of named modules, streamed.

    For each selected module, its output on every sample, flattened to N × D (or, with
    ``pool``, averaged over the spatial axes of a feature map: N × C × H × W → N × C), is fed
    batch by batch to one :class:`agop.collapse.CollapseAccumulator` (memory K × D per layer,
    never N × D); the result equals ``agop.collapse.measure`` on the full feature matrix. One
    forward pass (no gradients) per batch serves every layer. The model must be a per-sample
    function (module docstring), as for :func:`layer_agops`.

    Parameters
    ----------
    model : nn.Module
        Any module; the selected modules may be of any kind (blocks, activations, the model
        itself as ``""``) and must each run once per forward pass.
    data : array_like or DataLoader
        Inputs N × … with labels ``y``; or a ``torch.utils.data.DataLoader`` of
        (inputs, labels) batches (then ``y`` is None and ``num_classes`` is required).
    layers : str, nn.Module or an iterable of them, optional
        Modules by ``named_modules()`` name or as modules (default: every Linear and Conv2d).
    y : array_like, optional
        N labels in 0..K−1 for array data.
    pool : bool
        Average feature maps over their spatial axes (channel pooling) instead of flattening.
    pinv : bool
        Also compute ``nc1_pinv``, which keeps a D × D scatter per layer (refused with
        MemoryError when that does not fit).
    num_classes : int, optional
        K (default, for arrays: max(y) + 1).
    batch_size : int, optional
        Rows per batch for array data (default: planned from free memory).

    Returns
    -------
    dict of str to dict
        ``{name: metrics}``, the keys of ``agop.collapse.measure`` (without ``nc1_pinv``
        unless ``pinv``); a metric undefined at some layer (e.g. all class means equal) is NaN,
        with a warning.
    """
    targets = _resolve(model, layers, agop=False)
    _check_mode(model)
    src = _Data(model, data, y, labels=True, num_classes=num_classes, name="data")
    accs: dict[str, CollapseAccumulator] = {}
    calls = dict.fromkeys(targets, 0)
    current: dict[str, Any] = {}

    def hook_for(name: str):
        def hook(m, args, out):
            calls[name] += 1
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"module {name!r} returns a {type(out).__name__}, not a "
                                 "tensor; select a module whose output is the features")
            H = _features(out, pool)
            if name not in accs:
                accs[name] = CollapseAccumulator(src.num_classes, H.shape[1], pinv=pinv)
            accs[name].update(H, current["y"])
        return hook

    with backend.strict_fp32():
        first = src.first()
        leaf_elems, out_elems = _probe(model, first, targets)
        item = first.element_size()
        dims = list(out_elems.values())
        per_row = first[0].numel() * item + item * leaf_elems + 3 * 8 * sum(dims)
        fixed = 2 * 8 * src.num_classes * sum(dims) + (8 * sum(d * d for d in dims) if pinv else 0)
        rows = src.plan(batch_size, per_row, fixed)
        handles = [m.register_forward_hook(hook_for(n)) for n, m in targets.items()]
        try:
            with torch.no_grad():
                for xb, yb in src.batches(rows):
                    calls.update(dict.fromkeys(calls, 0))
                    current["y"] = yb
                    _output(model(xb), xb.shape[0])
                    for name, c in calls.items():
                        if c != 1:
                            raise ValueError(f"module {name!r} ran {c} times in one forward "
                                             "pass; select a module that runs once")
        finally:
            for h in handles:
                h.remove()
    results = {}
    for name in targets:
        values = accs[name].compute(strict=False)
        undefined = sorted(k for k, v in values.items() if math.isnan(v))
        if undefined:
            warnings.warn(f"collapse metrics {undefined} undefined at layer {name!r}; "
                          "recorded as NaN", stacklevel=2)
        results[name] = values
    return results
