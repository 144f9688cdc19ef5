"""Tests of agop.models.layers: AGOPs, collapse and the NFA at named layers of any model.

Every AGOP is checked against an independent per-sample computation on float64 models: the
Jacobian by ``torch.func.jacrev`` of a function in which only the layer sees the variable
(so a skip connection around it is excluded), and for convolutions w.r.t. the explicitly
unfolded input patches.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import agop
from agop import collapse
from agop.models import mlp
from agop.models.layers import layer_agops, layer_collapse, nfa, weight_matrix


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> None:
    """Running statistics and affine weights away from their identity defaults."""
    C = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(C, generator=g))
        bn.weight.copy_(1 + 0.5 * torch.randn(C, generator=g))
        bn.bias.copy_(0.3 * torch.randn(C, generator=g))


# ----------------------------------------------------------------------------- models
class ResBlock(nn.Module):
    """inp → BatchNorm → ReLU gives u; then tanh(u + fc(u)) → head: fc sits inside a skip."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        for lin in (self.inp, self.fc, self.head):
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / 2)
                lin.bias.copy_(0.2 * torch.randn(lin.bias.shape, generator=g))
        _randomize_bn(self.bn, g)

    def body(self, x):
        return torch.relu(self.bn(self.inp(x)))

    def forward(self, x):
        u = self.body(x)
        return self.head(torch.tanh(u + self.fc(u)))


class ConvNet(nn.Module):
    """conv0 (reflect padding) → BN → ReLU → conv1 (stride 2, padding, dilation, a 3 × 2
    kernel) → in-place ReLU → BN → flatten → head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv0 = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
        self.bn0 = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 2), dilation=(1, 2))
        self.act = nn.ReLU(inplace=True)
        self.bn1 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)
        for m in (self.conv0, self.conv1, self.head):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / 2)
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        _randomize_bn(self.bn0, g)
        _randomize_bn(self.bn1, g)

    def stem(self, x):
        return torch.relu(self.bn0(self.conv0(x)))

    def tail(self, h1):  # from conv1's output
        return self.head(self.bn1(torch.relu(h1)).flatten(1))

    def forward(self, x):
        return self.head(self.bn1(self.act(self.conv1(self.stem(x)))).flatten(1))


def _images(n=23, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 7, 6, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- references
def _agop_through(fn, Z: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i J_iᵀ J_i with J_i = ∂fn(x_i, z)/∂z at z = z_i (per sample, by jacrev)."""
    M = 0
    for x, z in zip(X, Z):
        J = torch.func.jacrev(lambda v: fn(x[None], v[None])[0])(z)  # K × (z's shape)
        J = J.reshape(J.shape[0], -1)
        M = M + J.T @ J
    return M / X.shape[0]


def _patch_agop(conv: nn.Conv2d, A: torch.Tensor, rest) -> torch.Tensor:
    """Σ over positions of ∇_p f ∇_p fᵀ (averaged over samples), by autograd w.r.t. the
    explicitly unfolded patches p of the conv's input A (N × C_in × H × W)."""
    with torch.no_grad():
        Ho, Wo = conv(A).shape[2:]
    padding = conv.padding
    if conv.padding_mode != "zeros":  # pad by hand the way the layer does, then unfold
        ph, pw = conv.padding
        A = F.pad(A, (pw, pw, ph, ph), mode=conv.padding_mode)
        padding = 0
    P = F.unfold(A, conv.kernel_size, dilation=conv.dilation, padding=padding,
                 stride=conv.stride)  # N × (C_in·kh·kw) × L
    W = conv.weight.reshape(conv.out_channels, -1)

    def f(p):  # one sample's patches (C_in·kh·kw) × L → its K outputs
        h = (W @ p + conv.bias[:, None]).reshape(1, conv.out_channels, Ho, Wo)
        return rest(h)[0]

    M = 0
    for p in P:
        J = torch.func.jacrev(f)(p)  # K × (C_in·kh·kw) × L
        M = M + torch.einsum("kdl,kel->de", J, J)
    return M / A.shape[0]


# ----------------------------------------------------------------------------- layer_agops
def test_linear_inside_a_residual_block_matches_jacrev_through_the_layer():
    model = ResBlock().double().eval()
    X = torch.randn(19, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = layer_agops(model, X, layers=["fc", model.inp, "head"], batch_size=7)
    assert list(got) == ["fc", "inp", "head"]
    with torch.no_grad():
        U = model.body(X)
    # fc's input enters only through fc: the skip u + … is held at the sample's value
    ref_fc = _agop_through(lambda x, z: model.head(torch.tanh(model.body(x) + model.fc(z))), U, X)
    assert got["fc"].dtype == torch.float64 and got["fc"].shape == (8, 8)
    assert _rel(got["fc"], ref_fc) < 1e-8
    # with the skip included the AGOP is another matrix: the test can tell them apart
    full = _agop_through(lambda x, z: model.head(torch.tanh(z + model.fc(z))), U, X)
    assert _rel(full, ref_fc) > 0.1
    # the first layer: the AGOP w.r.t. the model's input (BatchNorm on running statistics)
    ref_inp = _agop_through(lambda x, z: model(z), X, X)
    assert _rel(got["inp"], ref_inp) < 1e-8
    # a linear readout R: its AGOP is RᵀR
    R = model.head.weight.detach()
    assert _rel(got["head"], R.T @ R) < 1e-12


def test_conv2d_patch_agop_matches_autograd_wrt_unfolded_patches():
    model = ConvNet().double().eval()
    X = _images()
    got = layer_agops(model, X, layers=["conv1", "conv0"], batch_size=5)
    with torch.no_grad():
        A1 = model.stem(X)
    ref1 = _patch_agop(model.conv1, A1, model.tail)
    assert got["conv1"].shape == (3 * 3 * 2,) * 2
    assert _rel(got["conv1"], ref1) < 1e-8
    # conv0 pads by reflection: its patches come from the reflected input
    ref0 = _patch_agop(model.conv0, X,
                       lambda h: model.tail(model.conv1(torch.relu(model.bn0(h)))))
    assert got["conv0"].shape == (2 * 3 * 3,) * 2
    assert _rel(got["conv0"], ref0) < 1e-8
    # the in-place ReLU after conv1 did not leak into the gradient (the reference has none)
    assert model.act.inplace


def test_linear_on_tokens_sums_over_positions():
    """A Linear on N × T × D inputs: the patch convention, AGOP = (1/N) Σ_i Σ_t J_itᵀ J_it."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 2)).double()
    X = torch.randn(11, 3, 4, dtype=torch.float64)
    got = layer_agops(model, X, layers="0")["0"]
    M = 0
    for x in X:
        J = torch.func.jacrev(lambda v: model(v[None])[0])(x)  # 2 × 3 × 4
        M = M + torch.einsum("ktd,kte->de", J, J)
    assert _rel(got, M / X.shape[0]) < 1e-10


def test_default_layers_and_a_dataloader_give_the_same_agops():
    model = ConvNet().double().eval()
    X = _images()
    arrays = layer_agops(model, X.numpy(), batch_size=4)
    assert list(arrays) == ["conv0", "conv1", "head"]
    y = torch.arange(len(X)) % 3
    loaded = layer_agops(model, DataLoader(TensorDataset(X, y), batch_size=6))
    for name in arrays:
        assert _rel(loaded[name], arrays[name]) < 1e-12
    # model dtype wins: float32 inputs run in float64 here
    assert _rel(layer_agops(model, X.float(), layers="conv1")["conv1"], arrays["conv1"]) < 1e-6


def test_mlp_form_and_numbers_unchanged():
    """Integer layers keep the MLP API (a list); the hooked pass reproduces, bit for bit, the
    pre-hook implementation (the stack walked by hand, one autograd.grad per output)."""
    net = mlp.MLP(5, 3, width=7, depth=3, init_scale=1.0,
                  generator=torch.Generator().manual_seed(2))  # training mode: mode-free
    X = torch.randn(37, 5, generator=torch.Generator().manual_seed(3))
    listed = agop.layer_agops(net, X, layers=[0, -1], batch_size=10)
    assert isinstance(listed, list) and len(listed) == 2
    old = mlp.layer_agops(net, X, layers=[0, -1], batch_size=10)
    assert all(torch.equal(a, b) for a, b in zip(listed, old))

    def by_hand(xb):
        mods = list(net)
        x, pre = xb.detach().requires_grad_(True), []
        for m in mods:
            x = m(x)
            if isinstance(m, nn.Linear):
                pre.append(x)
        grams = [torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64) for h in pre]
        for k in range(x.shape[1]):
            for G, g in zip(grams, torch.autograd.grad(x[:, k].sum(), pre, retain_graph=True)):
                G.addmm_(g.double().T, g.double())
        return grams

    totals = None
    for i0 in range(0, len(X), 10):
        grams = by_hand(X[i0:i0 + 10])
        totals = grams if totals is None else [t.add_(g) for t, g in zip(totals, grams)]
    lin = [m for m in net if isinstance(m, nn.Linear)]
    for A, p in zip(listed, (0, -1)):
        W = lin[p].weight.detach().double()
        assert torch.equal(A, W.T @ totals[p] @ W / len(X))
    # the named form gives the same matrices; out-of-order and repeated selections line up
    named = agop.layer_agops(net, X, layers=["0", "6"], batch_size=10)
    assert torch.equal(named["0"], listed[0]) and torch.equal(named["6"], listed[1])
    mixed = mlp.layer_agops(net, X, layers=[-1, 0, -1], batch_size=10)
    assert torch.equal(mixed[0], listed[1]) and torch.equal(mixed[1], listed[0])
    assert torch.equal(mixed[2], listed[1])


# ----------------------------------------------------------------------------- NFA
def _np_corr(A, B) -> float:
    return float(np.corrcoef(np.ravel(A), np.ravel(B))[0, 1])


def _np_sqrt(A) -> np.ndarray:
    w, V = np.linalg.eigh((A + A.T) / 2)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def test_nfa_equals_correlations_of_the_reshaped_weights():
    model = ConvNet().double().eval()
    X = _images()
    got = nfa(model, X, batch_size=9)
    agops = layer_agops(model, X)
    for name, m in (("conv0", model.conv0), ("conv1", model.conv1), ("head", model.head)):
        W = m.weight.detach().numpy().reshape(m.weight.shape[0], -1)  # C_out × C_in·kh·kw
        A = agops[name].numpy()
        F_ = W.T @ W
        assert got[name]["nfa"] == pytest.approx(_np_corr(F_, A), abs=1e-10)
        assert got[name]["nfa_sqrt"] == pytest.approx(_np_corr(F_, _np_sqrt(A)), abs=1e-9)
    assert torch.equal(weight_matrix(model.conv1),
                       model.conv1.weight.detach().reshape(4, 18))
    # from AGOPs already computed: the same numbers, no inputs needed
    again = nfa(model, agops=agops)
    assert list(again) == list(got)
    assert all(again[n] == pytest.approx(got[n], abs=1e-9) for n in got)  # √ of a low rank
    assert list(nfa(model, layers=["conv1"], agops=agops)) == ["conv1"]


# ----------------------------------------------------------------------------- collapse
def _labels(n=30, k=3):
    return torch.arange(n) % k


@pytest.mark.parametrize("pool", [False, True])
def test_layer_collapse_streamed_equals_measure_on_full_features(pool):
    model = ConvNet().double().eval()
    X, y = _images(30, seed=5), _labels()
    with torch.no_grad():
        a0 = model.bn0(model.conv0(X))
        h1 = model.conv1(model.stem(X))  # conv1's own output, before the in-place ReLU
        out = model(X)

    def feats(t):
        return (t.mean(dim=(2, 3)) if pool and t.ndim == 4 else t).reshape(len(t), -1)

    refs = {"bn0": feats(a0), "conv1": feats(h1), "": out}
    loader = DataLoader(TensorDataset(X, y), batch_size=7)
    got = layer_collapse(model, loader, ["bn0", model.conv1, ""], pool=pool, pinv=True,
                         num_classes=3)
    arrays = layer_collapse(model, X, ["bn0", "conv1", ""], y.numpy(), pool=pool, batch_size=4)
    assert list(got) == ["bn0", "conv1", ""]
    for name, H in refs.items():
        ref = collapse.measure(H, y)
        assert got[name].keys() == ref.keys()
        for key, v in ref.items():
            assert got[name][key] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, key)
        assert "nc1_pinv" not in arrays[name]  # only when asked
        for key, v in arrays[name].items():
            assert v == pytest.approx(ref[key], rel=1e-9, abs=1e-12), (name, key)


def test_layer_collapse_reports_an_undefined_layer_as_nan():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU output is 0: all class means coincide
    X, y = torch.randn(12, 4), _labels(12, 2)
    with pytest.warns(UserWarning, match="undefined at layer '1'"):
        got = layer_collapse(model, X, ["1", "0"], y)
    assert np.isnan(got["1"]["nc1"]) and np.isfinite(got["0"]["nc1"])


# ----------------------------------------------------------------------------- refusals
class Centered(nn.Module):
    """Subtracts the batch mean: the output for a sample depends on its batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x - x.mean(dim=0, keepdim=True))


def test_models_that_are_not_per_sample_are_refused():
    X, y = torch.randn(10, 4), _labels(10, 2)
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    for call in (lambda m: layer_agops(m, X), lambda m: layer_collapse(m, X, None, y),
                 lambda m: nfa(m, X)):
        with pytest.raises(ValueError, match="training mode.*BatchNorm1d '1'.*model.eval()"):
            call(bn.train())
        call(bn.eval())  # accepted in eval mode
        with pytest.raises(ValueError, match="depends on the other samples of its batch"):
            call(Centered().eval())
    # a stack of mode-free modules may stay in training mode, with the same numbers
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    a = layer_agops(net.train(), X)
    b = layer_agops(net.eval(), X)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_selections_and_inputs_raise_clear_errors():
    model = ConvNet().double().eval()
    X = _images(6)
    with pytest.raises(ValueError, match="no module named 'conv9'"):
        layer_agops(model, X, layers="conv9")
    with pytest.raises(ValueError, match="not a module of the model"):
        layer_agops(model, X, layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="'bn0' is BatchNorm2d"):
        layer_agops(model, X, layers="bn0")
    with pytest.raises(ValueError, match="integer layers"):
        layer_agops(model, X, layers=[0])
    with pytest.raises(ValueError, match="groups = 2"):
        layer_agops(nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)), X.float(), layers="0")
    with pytest.raises(ValueError, match="non-finite"):
        layer_agops(model, X.masked_fill(X > 2, float("nan")))
    twice = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="ran 2 times"):
        layer_agops(nn.Sequential(twice, nn.Tanh(), twice), torch.randn(5, 3), layers=[twice])
    loader = DataLoader(TensorDataset(X, _labels(6)), batch_size=3)
    with pytest.raises(ValueError, match="num_classes is needed"):
        layer_collapse(model, loader, ["bn0"])
    with pytest.raises(ValueError, match="y must be None"):
        layer_collapse(model, loader, ["bn0"], y=_labels(6), num_classes=3)
    with pytest.raises(ValueError, match="y .* is needed"):
        layer_collapse(model, X, ["bn0"])
    with pytest.raises(ValueError, match="has 5 label"):
        layer_collapse(model, X, ["bn0"], _labels(5))
    with pytest.raises(ValueError, match="agops has no entry for layer 'conv1'"):
        nfa(model, layers="conv1", agops={})
