"""Deep RFM (Algorithm 1): the estimator against a hand-built layer, determinism, resume,
precision, memory planning, and the ``agop rfm`` experiment end to end."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from agop import collapse, datasets
from agop.agop import kernel_agop
from agop.cli import main
from agop.kernels import LaplaceKernel, class_groups
from agop.linalg import psd_power
from agop.experiments.records import read_csv, read_json
from agop.experiments.rfm import run_rfm
from agop.models.deep_rfm import (DeepRFM, apply_layer, kernel_matrix, layer_memory,
                                  normalize_rows, random_weights)
from agop.solve import kernel_ridge

METRICS = ("nc1", "nc2", "nc1_authors", "nc1_pinv", "cdnv", "nc2_squared", "nc2_orthogonal",
           "within_total", "between_total", "equinorm", "equiangular")


@pytest.fixture(scope="module")
def digits():
    train = datasets.load("digits", n=200)
    test = datasets.load("digits", split="test", n=60)
    return train.X, train.y, test.X, test.y


def _numbers(rows):
    """History rows without the timings (which differ run to run)."""
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def test_layer_matches_hand_computation(digits):
    """Layer 1 and the final solve, rebuilt from kernel/kernel_ridge/kernel_agop/psd_power."""
    X, y, _, _ = digits
    model = DeepRFM(1, width=64, seed=3, dtype="float64", device="cpu").fit(X, y)

    X64 = X.astype(np.float64)
    mean, std = X64.mean(axis=0), X64.std(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        Z0 = np.nan_to_num((X64 - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)
    X1 = torch.as_tensor(Z0 / np.linalg.norm(Z0, axis=1, keepdims=True))
    Y = -torch.ones(len(y), 10, dtype=torch.float64)
    Y[torch.arange(len(y)), torch.as_tensor(y)] = 1.0
    kernel = LaplaceKernel(2.0)
    alpha = kernel_ridge(kernel(X1), Y).coef
    S = psd_power(kernel_agop(kernel, X1, alpha), 0.5)
    W = random_weights(64, X.shape[1], "gaussian", torch.Generator().manual_seed(3))
    A = X1 @ S
    F = torch.relu(A @ W.T)
    X2 = F / F.norm(dim=1, keepdim=True)
    alpha2 = kernel_ridge(kernel(X2), Y).coef

    assert torch.equal(model.weights_[0], W)
    assert float((model.sqrt_agops_[0] - S).norm() / S.norm()) < 1e-8
    assert float((model.X_fit_ - X2).norm() / X2.norm()) < 1e-8
    assert float((model.coef_ - alpha2).norm() / alpha2.norm()) < 1e-6
    stages = {(r["layer"], r["stage"]): r for r in model.history_}
    assert sorted(stages) == [(1, "agop"), (1, "features"), (1, "input"), (2, "input")]
    for (layer, stage), H in {(1, "input"): X1, (1, "agop"): A, (1, "features"): F,
                              (2, "input"): X2}.items():
        want = collapse.measure(H, y)
        assert set(METRICS) <= set(stages[layer, stage])
        for key in METRICS:
            assert stages[layer, stage][key] == pytest.approx(want[key], rel=1e-7), (layer, stage, key)
    # a constant pixel (std 0) is set to 0, not NaN, so the preprocessing stays finite
    assert (std == 0).any()


def test_stages_show_agop_collapse(digits):
    """Sections 5.1–5.2 on a small set: M^{1/2} lowers NC1 in every layer, features do not."""
    X, y, Xt, yt = digits
    model = DeepRFM(3, device="cpu").fit(X, y, Xt, yt)
    by = {(r["layer"], r["stage"]): r for r in model.history_}
    assert len(model.history_) == 3 * 3 + 1
    for l in range(1, 4):
        assert by[l, "agop"]["nc1"] < by[l, "input"]["nc1"]
        assert by[l, "features"]["nc1"] >= by[l, "agop"]["nc1"]
        assert by[l, "input"]["train_acc"] == 1.0  # ridgeless interpolation
        assert 0.5 < by[l, "input"]["test_acc"] <= 1.0
        assert {"kernel", "solve", "agop", "sqrt", "features", "predict", "metrics"} <= {
            k[8:] for k, v in by[l, "input"].items() if k.startswith("seconds_") and v is not None}
    assert by[4, "input"]["nc1"] < by[1, "input"]["nc1"] / 5


def test_deterministic_for_a_seed(digits):
    X, y, Xt, yt = digits
    a = DeepRFM(2, width=128, seed=7, device="cpu").fit(X, y, Xt, yt)
    b = DeepRFM(2, width=128, seed=7, device="cpu").fit(X, y, Xt, yt)
    c = DeepRFM(2, width=128, seed=8, device="cpu").fit(X, y, Xt, yt)
    assert _numbers(a.history_) == _numbers(b.history_)
    assert np.array_equal(a.predict(Xt), b.predict(Xt))
    assert torch.equal(a.decision_function(Xt), b.decision_function(Xt))
    assert not torch.equal(a.weights_[0], c.weights_[0])
    assert _numbers(a.history_)[3:] != _numbers(c.history_)[3:]


def test_estimator_resume_from_state_dict_is_exact(digits):
    X, y, Xt, yt = digits
    full = DeepRFM(3, width=96, seed=1, device="cpu").fit(X, y, Xt, yt)

    part = DeepRFM(3, width=96, seed=1, device="cpu")
    steps = part.fit_iter(X, y, Xt, yt)
    for step in steps:
        if step.layer == 2:
            break
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    del part, steps  # the interrupted process is gone
    buf.seek(0)
    resumed = DeepRFM.from_state_dict(torch.load(buf, weights_only=True))
    assert resumed.layers_done_ == 2
    for _ in resumed.resume_iter():
        pass
    assert _numbers(resumed.history_) == _numbers(full.history_)
    assert torch.equal(resumed.coef_, full.coef_)
    assert np.array_equal(resumed.predict(Xt), full.predict(Xt))


def test_transform_predict_score_agree_with_fit(digits):
    X, y, Xt, yt = digits
    labels, labels_t = y + 3, yt + 3  # labels need not be 0..K-1
    model = DeepRFM(2, width=128, device="cpu").fit(X, labels, Xt, labels_t)
    final = model.history_[-1]
    assert final["layer"] == 3 and final["stage"] == "input"
    assert model.score(X, labels) == final["train_acc"]
    assert model.score(Xt, labels_t) == final["test_acc"]
    assert np.array_equal(model.classes_, np.arange(3, 13))
    pred = model.predict(Xt)
    assert np.array_equal(pred, model.classes_[model.decision_function(Xt).argmax(1).numpy()])
    assert set(np.unique(pred)) <= set(model.classes_)
    # transform(X, l) is the input of layer l; its metrics are the recorded "input" rows
    by = {(r["layer"], r["stage"]): r for r in model.history_}
    for l in (1, 2, 3):
        H = model.transform(X, layer=l)
        assert H.norm(dim=1).sub(1).abs().max() < 1e-5
        assert collapse.nc1(H, y) == pytest.approx(by[l, "input"]["nc1"], rel=1e-12)
    assert torch.equal(model.transform(X), model.X_fit_)
    # a test label never seen in training is simply never predicted
    unseen = labels_t.copy()
    unseen[:10] = 99
    hits = pred == labels_t
    assert model.score(Xt, unseen) == pytest.approx(hits[10:].sum() / len(hits))


def test_float32_default_matches_float64_over_8_layers():
    """The default dtype (float32 on CPU) gives the float64 per-layer NC1 within 1%.

    8 layers collapse digits by > 100×: same-class distances fall to ~1e-3, where float32
    distances by ‖x‖² + ‖z‖² − 2xᵀz alone would break the ridgeless solve (see agop.kernels.pairwise_distances).
    """
    train = datasets.load("digits", n=500)
    runs = {dt: DeepRFM(8, device="cpu", dtype=dt).fit(train.X, train.y) for dt in ("auto", "float64")}
    assert runs["auto"].dtype_ == torch.float32
    a, b = runs["auto"].history_, runs["float64"].history_
    assert [(r["layer"], r["stage"]) for r in a] == [(r["layer"], r["stage"]) for r in b]
    rel = [abs(r["nc1"] - s["nc1"]) / s["nc1"] for r, s in zip(a, b)]
    assert max(rel) < 0.01, rel
    assert b[-1]["nc1"] < b[0]["nc1"] / 100


def test_shifted_distances_keep_collapsed_kernel_positive_definite():
    """Tight classes (spread 1e-4): float32 k(X, X) with class-shifted distances stays within
    float32 rounding of the float64 matrix and factors; the plain formula does neither."""
    g = torch.Generator().manual_seed(0)
    K, per, D = 5, 40, 64
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    noise = torch.randn(K * per, D, generator=g, dtype=torch.float64)
    X = means.repeat_interleave(per, 0) + 1e-4 * noise
    X = X / X.norm(dim=1, keepdim=True)
    y = torch.arange(K).repeat_interleave(per)
    kernel = LaplaceKernel(2.0)
    exact = kernel_matrix(kernel, X)
    groups = class_groups(y, K)
    shifted = kernel_matrix(kernel, X.float(), groups).double()
    plain = kernel_matrix(kernel, X.float()).double()
    lam_min = float(torch.linalg.eigvalsh(exact)[0])
    err_shifted = float(torch.linalg.matrix_norm(shifted - exact, 2))
    err_plain = float(torch.linalg.matrix_norm(plain - exact, 2))
    assert err_shifted < 1e-5 < lam_min < err_plain
    assert int(torch.linalg.cholesky_ex(shifted)[1]) == 0
    assert torch.equal(torch.diagonal(shifted), torch.ones(K * per, dtype=torch.float64))


def test_scaling_the_agop_changes_nothing(digits):
    """M → cM (the authors divide M by its max entry) only rescales X M^{1/2} and σ(·):
    ReLU is positively homogeneous and the next layer normalizes."""
    X, y, _, _ = digits
    X1 = normalize_rows(torch.as_tensor(X, dtype=torch.float64) + 0.01)
    g = torch.Generator().manual_seed(0)
    B = torch.randn(X1.shape[1], X1.shape[1], generator=g, dtype=torch.float64)
    S = psd_power(B @ B.T, 0.5)
    W = random_weights(32, X1.shape[1], "gaussian", g)
    A1, F1 = apply_layer(X1, S, W)
    A2, F2 = apply_layer(X1, S * 1e-3**0.5, W)  # M/1000
    assert torch.allclose(normalize_rows(F1), normalize_rows(F2), rtol=0, atol=1e-12)
    for key in METRICS:
        assert collapse.measure(A1, y)[key] == pytest.approx(collapse.measure(A2, y)[key], rel=1e-9)


def test_uniform_features_follow_nn_linear_bounds():
    g = torch.Generator().manual_seed(0)
    W = random_weights(512, 100, "uniform", g)
    assert W.abs().max() <= 0.1 and W.abs().max() > 0.099
    G = random_weights(2000, 100, "gaussian", g)
    assert float(G.var()) == pytest.approx(2 / 2000, rel=0.02)


@pytest.mark.parametrize("change, message", [
    (lambda X, y, Xt, yt: (np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), y,
                           None, None), "non-finite"),
    (lambda X, y, Xt, yt: (X, np.zeros_like(y), None, None), "at least 2 classes"),
    (lambda X, y, Xt, yt: (X, y[:-1], None, None), "label"),
    (lambda X, y, Xt, yt: (X, y, Xt, None), "together"),
    (lambda X, y, Xt, yt: (X[:0], y[:0], None, None), "at least 2 row"),
    (lambda X, y, Xt, yt: (X, y, Xt[:, :10], yt), "feature"),
])
def test_bad_input_raises(digits, change, message):
    X, y, Xt, yt = change(*digits)
    with pytest.raises(ValueError, match=message):
        DeepRFM(1, width=8, device="cpu").fit(X, y, Xt, yt)


@pytest.mark.parametrize("params, message", [
    ({"features": "relu"}, "features"), ({"depth": 0}, "depth"), ({"width": 0}, "width"),
    ({"ridge": -1.0}, "ridge"), ({"bandwidth": 0.0}, "bandwidth"), ({"kernel": "rbf"}, "kernel"),
    ({"dtype": "float16"}, "dtype"), ({"agop_method": "fast"}, "agop_method"),
])
def test_bad_parameters_raise_at_fit(digits, params, message):
    X, y, _, _ = digits
    model = DeepRFM(**{"depth": 1, "device": "cpu", **params})  # __init__ only stores
    with pytest.raises(ValueError, match=message):
        model.fit(X, y)


def test_unfitted_and_out_of_range_use_raise(digits):
    X, y, _, _ = digits
    with pytest.raises(ValueError, match="not fitted"):
        DeepRFM(1).predict(X)
    model = DeepRFM(1, width=16, device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="layer must be in 1..2"):
        model.transform(X, layer=3)


def test_memory_is_checked_before_the_first_layer(digits, monkeypatch):
    X, y, _, _ = digits
    monkeypatch.setenv("AGOP_MEMORY_GB", "0.0001")
    model = DeepRFM(2, device="cpu")
    with pytest.raises(MemoryError, match=r"needs about .*MiB on cpu"):
        model.fit(X, y)
    assert not getattr(model, "history_", [])
    # the estimate grows as n² (kernel matrix and factor) and counts the ridge's copies
    small, big = layer_memory(10_000, 512, 10, 512), layer_memory(20_000, 512, 10, 512)
    assert 3.5 < big / small < 4.1
    assert small >= 2 * 10_000**2 * 4
    assert layer_memory(10_000, 512, 10, 512, ridge=1e-3) >= small + 10_000**2 * 4


# ----------------------------------------------------------------------------- the experiment
SMALL = dict(n=200, test_n=60, depth=3, width=128, device="cpu")


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]


def test_run_rfm_resume_after_interruption_is_exact(tmp_path, monkeypatch):
    full = run_rfm(tmp_path / "full", progress=False, **SMALL)

    calls = {"n": 0}
    original = DeepRFM._step

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 3:  # the process dies inside layer 3
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(DeepRFM, "_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_rfm(tmp_path / "cut", progress=False, **SMALL)
    monkeypatch.setattr(DeepRFM, "_step", original)
    cut = tmp_path / "cut"
    assert {r["layer"] for r in read_csv(cut / "metrics.csv")} == {1, 2}
    assert not (cut / "summary.json").exists()

    resumed = run_rfm(resume=cut, progress=False)
    assert _strip(read_csv(resumed.path / "metrics.csv")) == _strip(read_csv(full.path / "metrics.csv"))
    a, b = full.read_summary(), resumed.read_summary()
    for key in ("nc1_first_input", "nc1_last_input", "share_agop", "final_test_acc", "gram_last"):
        assert a[key] == b[key]
    for name in ("layer_001.npz", "layer_004.npz"):
        assert np.array_equal(np.load(full.path / "gram" / name)["gram"],
                              np.load(cut / "gram" / name)["gram"])
    models = [DeepRFM.from_state_dict(r.load_checkpoint()["model"]) for r in (full, resumed)]
    Xt = datasets.load("digits", split="test", n=60).X
    assert np.array_equal(models[0].predict(Xt), models[1].predict(Xt))


def test_resume_rejects_different_settings(tmp_path):
    run_rfm(tmp_path / "r", progress=False, **{**SMALL, "depth": 1})
    with pytest.raises(ValueError, match="depth"):
        run_rfm(resume=tmp_path / "r", progress=False, depth=5)
    # a value that equals the library default is still a value the run does not have
    with pytest.raises(ValueError, match="depth: run has 1, given 10"):
        run_rfm(resume=tmp_path / "r", progress=False, depth=10)


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["rfm", "--n", "200", "--test-n", "60", "--depth", "2", "--width", "64",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "NC1 of the layer input" in capsys.readouterr().out
    config = read_json(out / "config.json")
    assert config["kind"] == "rfm" and config["device"] == "cpu" and config["dtype"] == "float32"
    assert config["settings"]["depth"] == 2 and config["settings"]["dataset"] == "digits"
    assert config["data"]["train"] == 200 and config["data"]["test"] == 60
    rows = read_csv(out / "metrics.csv")
    required = {"layer", "stage", *METRICS, "train_acc", "test_acc", "seconds", "jitter"}
    assert required <= set(rows[0])
    assert [(r["layer"], r["stage"]) for r in rows] == [
        (1, "input"), (1, "agop"), (1, "features"), (2, "input"), (2, "agop"),
        (2, "features"), (3, "input")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert summary["nc1_first_input"] == rows[0]["nc1"] and summary["nc1_last_input"] == rows[-1]["nc1"]
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    shares = summary["share_agop"] + summary["share_features"] + summary["share_normalize"]
    assert shares == pytest.approx(1.0)
    assert (out / "figures" / "collapse.png").stat().st_size > 0
    assert (out / "figures" / "gram.png").stat().st_size > 0
    assert main(["rfm", "--resume", str(out), "--depth", "4", "--no-progress"]) == 2


def test_cli_help_defaults_match_run_rfm():
    import inspect

    from agop.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["rfm"]
    from agop.experiments.rfm import RFM_DEFAULTS

    helps = {a.dest: a.help for a in sub._actions}
    for name, param in inspect.signature(run_rfm).parameters.items():
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            assert name in RFM_DEFAULTS or name == "pdf", name
        if name in ("depth", "bandwidth", "width", "seed"):
            assert f"default: {RFM_DEFAULTS[name]}" in helps[name], name


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_matches_cpu_on_mnist_2000(data_root):
    """Issue 7: a CUDA run uses the same W and gives the CPU run's per-layer NC1 within 1%."""
    train = datasets.load("mnist", n=2000, root=data_root)
    cpu = DeepRFM(10, device="cpu").fit(train.X, train.y)
    gpu = DeepRFM(10, device="cuda").fit(train.X, train.y)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu.weights_, cpu.weights_))
    for r, s in zip(gpu.history_, cpu.history_):
        assert (r["layer"], r["stage"]) == (s["layer"], s["stage"])
        assert r["nc1"] == pytest.approx(s["nc1"], rel=0.01), (r["layer"], r["stage"])


@pytest.mark.gpu
def test_cuda_run_fits_in_its_memory_estimate(data_root, monkeypatch):
    """With the budget capped at memory_needed, chunks are planned inside it: the run neither
    raises nor peaks far above the estimate (n = 10,000: the n² terms dominate)."""
    train = datasets.load("mnist", n=10_000, root=data_root)
    model = DeepRFM(1, device="cuda")
    need = model.memory_needed(10_000, 784, 10)
    monkeypatch.setenv("AGOP_MEMORY_GB", str(need / 1024**3))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model.fit(train.X, train.y)
    assert torch.cuda.max_memory_allocated() <= 1.25 * need
