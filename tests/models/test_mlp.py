"""Tests of agop.models.mlp: the MLP, layer_agops, the probes and training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agop import collapse
from agop.agop import model_agop
from agop.linalg import psd_power
from agop.models.mlp import (MLP, PRESETS, Trainer, correlation, layer_agops, layer_stages,
                             measurement_epochs, probe, train)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _clusters(n=90, d=10, k=3, seed=0):
    """Gaussian clusters: float32 N × D features and labels 0..K−1 (every class present)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    X = rng.normal(size=(k, d))[y] + 0.8 * rng.normal(size=(n, d))
    return X.astype(np.float32), y


def _generic_net() -> nn.Sequential:
    """Not the paper's MLP: biases, Tanh/GELU/SiLU, a nested Sequential, varying widths."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4, bias=False), nn.GELU(),
                         nn.Sequential(nn.Linear(4, 6), nn.SiLU()), nn.Linear(6, 3)).double()


def _paper_net() -> nn.Sequential:
    return MLP(5, 3, width=7, depth=3, init_scale=1.0,
               generator=torch.Generator().manual_seed(2)).double()


# ----------------------------------------------------------------------------- the network
def test_mlp_structure_and_init():
    g = torch.Generator().manual_seed(5)
    model = MLP(12, 4, width=9, depth=1, init_scale=0.01, generator=g)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(m.bias is None for m in model if isinstance(m, nn.Linear))
    assert model.hidden == [model[0]] and model.readout is model[2]
    # The same draws from the global RNG: Xavier-uniform for the hidden layer, then PyTorch's
    # own default nn.Linear initialization for the readout.
    torch.manual_seed(5)
    w1 = nn.init.xavier_uniform_(torch.empty(9, 12), gain=0.01)
    readout = nn.Linear(9, 4, bias=False)
    assert torch.equal(model[0].weight, w1)
    assert torch.equal(model.readout.weight, readout.weight)
    assert float(w1.abs().max()) <= 0.01 * math.sqrt(6 / (12 + 9))
    deep = MLP(12, 4, width=9, depth=5)
    assert len(deep.hidden) == 5 and deep(torch.zeros(2, 12)).shape == (2, 4)


# ----------------------------------------------------------------------------- layer_agops
@pytest.mark.parametrize("make", [_generic_net, _paper_net])
def test_layer_agops_equals_autograd_agop_of_each_subnetwork(make):
    model = make()
    X = torch.randn(37, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mods = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
    agops = layer_agops(model, X, batch_size=10)  # several batches, the last one partial
    positions = [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)]
    assert len(agops) == len(positions)
    for p, A in zip(positions, agops):
        head, tail = nn.Sequential(*mods[:p]), nn.Sequential(*mods[p:])
        with torch.no_grad():
            Xl = head(X)
        ref = model_agop(tail, Xl)
        assert A.dtype == torch.float64 and A.shape == (Xl.shape[1],) * 2
        assert _rel(A, ref) < 1e-8
    # selection by module and by negative index gives the same matrices, batching does not matter
    lin = [mods[p] for p in positions]
    sel = layer_agops(model, X, layers=[lin[1], -1])
    assert _rel(sel[0], agops[1]) < 1e-12 and _rel(sel[1], agops[-1]) < 1e-12


def test_readout_agop_is_readout_gram():
    """The AGOP w.r.t. the input of a linear readout R is RᵀR (with the 1/N convention)."""
    model = _generic_net()
    X = torch.randn(23, 5, dtype=torch.float64)
    R = model[-1].weight.detach()
    (A,) = layer_agops(model, X, layers=[model[-1]], batch_size=4)
    assert _rel(A, R.T @ R) < 1e-13


def test_layer_agops_refuses_batch_coupling_and_bad_selection():
    X = torch.randn(8, 5)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        layer_agops(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), X)
    with pytest.raises(ValueError, match="Dropout"):
        layer_agops(nn.Sequential(nn.Linear(5, 4), nn.Dropout(), nn.Linear(4, 2)), X)
    with pytest.raises(ValueError, match="out of range"):
        layer_agops(nn.Sequential(nn.Linear(5, 2)), X, layers=[3])
    with pytest.raises(ValueError, match="not a Linear layer of the model"):
        layer_agops(nn.Sequential(nn.Linear(5, 2)), X, layers=[nn.Linear(5, 2)])
    with pytest.raises(ValueError, match="3 column"):
        layer_agops(nn.Sequential(nn.Linear(5, 2)), torch.randn(8, 3))


# ----------------------------------------------------------------------------- correlation
def test_correlation_is_pearson_of_entries():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    assert correlation(A, A) == pytest.approx(1.0, abs=1e-15)
    assert correlation(A, -A) == pytest.approx(-1.0, abs=1e-15)
    rho = correlation(A, B)
    assert rho == pytest.approx(np.corrcoef(A.numpy().ravel(), B.numpy().ravel())[0, 1], abs=1e-14)
    assert correlation(3.0 * A, B) == pytest.approx(rho, abs=1e-15)
    assert correlation(A, 0.01 * B + 5.0) == pytest.approx(rho, abs=1e-14)
    assert math.isnan(correlation(torch.ones(3, 3), A[:3, :3]))
    with pytest.raises(ValueError, match="one shape"):
        correlation(A, B[:5])


# ----------------------------------------------------------------------------- probes
@pytest.fixture(scope="module")
def trained():
    """A small MLP trained for a few epochs with a large step, so its weights have structure."""
    X, y = _clusters()
    model = MLP(10, 3, width=16, depth=2, init_scale=1.0,
                generator=torch.Generator().manual_seed(0))
    trainer = Trainer(model, X, y, lr=1e-2, batch_size=16)
    for _ in range(5):
        trainer.train_epoch()
    return model, X, y


def test_right_stage_nc1_equals_full_linear_layer(trained):
    """U is orthonormal, so NC1 of W Φ(X) before σ equals NC1 of S Vᵀ Φ(X) (Section 4)."""
    model, X, y = trained
    W2 = model.hidden[1].weight.detach().double()
    with torch.no_grad():
        Phi = torch.relu(torch.as_tensor(X).double() @ model.hidden[0].weight.double().T)
    st = layer_stages(W2, Phi)
    pre = Phi @ W2.T
    assert st["right"].shape == (len(X), 16)
    assert collapse.nc1(st["right"], y) == pytest.approx(collapse.nc1(pre, y), rel=1e-10)
    assert torch.allclose(st["output"], torch.relu(pre), atol=1e-12, rtol=0)
    # a wide first layer (D = 10 < width 16): S Vᵀ has r = 10 rows
    W1 = model.hidden[0].weight.detach().double()
    st1 = layer_stages(W1, torch.as_tensor(X).double())
    assert st1["right"].shape == (len(X), 10)
    assert collapse.nc1(st1["right"], y) == pytest.approx(
        collapse.nc1(torch.as_tensor(X).double() @ W1.T, y), rel=1e-10)


def test_probe_rows_agree_with_direct_computations(trained):
    model, X, y = trained
    Xs, ys = _clusters(n=30, seed=1)
    rows = probe(model, X, y, X_test=Xs, y_test=ys, batch_size=7)
    assert [(r["layer"], r["stage"]) for r in rows] == [
        (j, s) for j in (1, 2) for s in ("input", "right", "output")]
    Xt = torch.as_tensor(X)
    with torch.no_grad():
        out = model(Xt)
        Phi2 = torch.relu(Xt @ model.hidden[0].weight.T)
    T = torch.where(F.one_hot(torch.as_tensor(y), 3) > 0, 1.0, -1.0)
    r = rows[0]
    assert r["loss"] == pytest.approx(float(F.mse_loss(out.double(), T.double())), rel=1e-12)
    hits = out.argmax(1) == torch.as_tensor(y)
    assert r["train_acc"] == pytest.approx(float(hits.double().mean()))
    with torch.no_grad():
        assert r["test_acc"] == pytest.approx(
            float((model(torch.as_tensor(Xs)).argmax(1) == torch.as_tensor(ys)).double().mean()))
    # streamed metrics equal the whole-matrix metrics of the stages
    st = layer_stages(model.hidden[1].weight, Phi2)
    for row in rows[3:]:
        ref = collapse.measure(st[row["stage"]], y)
        for key in ("nc1", "nc2", "within_total", "between_total"):
            assert row[key] == pytest.approx(ref[key], rel=1e-9), (row["stage"], key)
    # NFA correlations against layer_agops and an eigendecomposition square root
    agops = layer_agops(model, X, layers=model.hidden)
    for j, A in enumerate(agops, start=1):
        W = model.hidden[j - 1].weight.detach().double()
        row = rows[3 * (j - 1)]
        assert row["nfa"] == pytest.approx(correlation(W.T @ W, A), abs=1e-10)
        assert row["nfa_sqrt"] == pytest.approx(correlation(W.T @ W, psd_power(A, 0.5)), abs=1e-10)


def test_nfa_of_a_narrowing_layer_equals_full_matrix_correlation():
    """r = width < D: the r × r shortcut of the NFA correlations still equals the D × D one."""
    X, y = _clusters(n=60, d=20, k=3)
    model = MLP(20, 3, width=6, depth=2, init_scale=1.0, generator=torch.Generator().manual_seed(4))
    rows = probe(model, X, y, batch_size=25)
    for j, A in enumerate(layer_agops(model, X, layers=model.hidden), start=1):
        W = model.hidden[j - 1].weight.detach().double()
        row = rows[3 * (j - 1)]
        assert row["nfa"] == pytest.approx(correlation(W.T @ W, A), abs=1e-10)
        assert row["nfa_sqrt"] == pytest.approx(correlation(W.T @ W, psd_power(A, 0.5)), abs=1e-10)


# ----------------------------------------------------------------------------- training
def _fresh(seed=0, **kw):
    return MLP(10, 3, width=12, depth=2, init_scale=0.5,
               generator=torch.Generator().manual_seed(seed), **kw)


def test_training_is_deterministic_for_a_seed():
    X, y = _clusters()
    runs = []
    for _ in range(2):
        model = _fresh()
        rows = train(model, X, y, epochs=3, lr=1e-3, batch_size=32, measure_every=2,
                     generator=torch.Generator().manual_seed(7))
        runs.append((model, rows))
    (m1, r1), (m2, r2) = runs
    assert [r["epoch"] for r in r1[::6]] == [0, 2, 3] == measurement_epochs(3, 2)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert r1 == r2
    m3 = _fresh()
    train(m3, X, y, epochs=3, lr=1e-3, batch_size=32, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(m3[0].weight, m1[0].weight)  # another batch order, other weights
    assert r1[-1]["loss"] < r1[0]["loss"]


def test_authors_preset_resets_adam_every_epoch():
    X, y = _clusters()
    trainer = Trainer(_fresh(), X, y, lr=1e-3, reset_optimizer=True)
    trainer.train_epoch()
    first = trainer.optimizer
    trainer.train_epoch()
    assert trainer.optimizer is not first
    assert PRESETS["authors"] == {"lr": 5e-5, "init_scale": 0.1, "reset_optimizer": True}
    assert PRESETS["paper"] == {"lr": 2e-5, "init_scale": 0.01, "reset_optimizer": False}


def test_bad_input_raises_clear_errors():
    X, y = _clusters()
    Xnan = X.copy()
    Xnan[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\(4, 2\)"):
        Trainer(_fresh(), Xnan, y)
    with pytest.raises(ValueError, match="non-finite"):
        layer_agops(_fresh(), Xnan)
    with pytest.raises(ValueError, match="at least 2 classes"):
        Trainer(_fresh(), X, np.zeros(len(X), dtype=int), num_classes=3)
    with pytest.raises(ValueError, match="must match"):
        Trainer(_fresh(), X, y[:-1])
    with pytest.raises(ValueError, match="3 outputs"):
        Trainer(_fresh(), X, np.arange(len(X)) % 4)
    with pytest.raises(ValueError, match="lr"):
        Trainer(_fresh(), X, y, lr=-1.0)
    with pytest.raises(ValueError, match="MLP-shaped"):
        probe(nn.Sequential(nn.Linear(10, 3)), X, y)
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] have a bias"):
        probe(nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 3)), X, y)



def test_iter_epochs_steps_through_what_fit_records():
    """Stepping a trainer epoch by epoch gives fit's rows and weights, measured on schedule."""
    X, y = _clusters()

    def trainer():
        return Trainer(_fresh(), X, y, lr=1e-3, batch_size=32,
                       generator=torch.Generator().manual_seed(7))

    a, b = trainer(), trainer()
    rows = a.fit(5, measure_every=2)
    stepped = b.measure()  # epoch 0 is not a step
    steps = list(b.iter_epochs(5, measure_every=2))
    assert [s.epoch for s in steps] == [1, 2, 3, 4, 5]
    assert [s.epoch for s in steps if s.rows] == [2, 4, 5]
    assert stepped + [r for s in steps for r in s.rows] == rows
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    with pytest.raises(ValueError, match="already at epoch 5"):
        b.iter_epochs(3)  # at the call, not at the first step


@pytest.mark.gpu
def test_cuda_run_matches_cpu_run():
    """Same seed, same data: the GPU run's records match the CPU run's (float32 rounding only)."""
    X, y = _clusters(n=200, d=10, k=3)
    rows = {}
    for dev in ("cpu", "cuda"):
        model = _fresh().to(dev)
        rows[dev] = train(model, X, y, epochs=2, lr=1e-3, batch_size=32, measure_every=1,
                          generator=torch.Generator().manual_seed(7))
        assert all(p.device.type == dev for p in model.parameters())
    for a, b in zip(rows["cpu"], rows["cuda"]):
        for key in ("nc1", "nc2", "nfa", "nfa_sqrt", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), key
