"""Run-time estimates (agop.experiments.estimate): the FLOP model against the terms written out
by hand, the scaling by the calibrated rates, and a (shrunken) calibration of the real code."""

from __future__ import annotations

import math

import pytest

from agop.experiments import estimate as est
from agop.models.mlp import measurement_epochs


def _direct(n, N, K, D):  # the direct AGOP form, from its definition: distances, Wα, gradients
    return 2 * n * N * D + 2 * n * N * K + 2 * n * N * K * D + 2 * n * K * D * D


def test_exact_rfm_flops_are_the_sum_of_the_steps():
    N, d, w, K, t = 300, 50, 40, 10, 20
    first = (2 * N * N * d + N ** 3 / 3 + 2 * t * N * d
             + min(_direct(N, N, K, d), N ** 3 + 4 * N * N * d + 8 * N * N * K + 2 * N * d * d)
             + 9 * d ** 3 + 2 * N * d * w + 6 * N * d * d)
    final = 2 * N * N * w + N ** 3 / 3 + 2 * t * N * w
    assert est.rfm_flops(N, d, 1, width=w, test_n=t, K=K) == pytest.approx(first + final)
    # each further layer runs on the width
    two = est.rfm_flops(N, d, 2, width=w, test_n=t, K=K)
    assert two - (first + final) == pytest.approx(
        2 * N * N * w + N ** 3 / 3 + 2 * t * N * w
        + min(_direct(N, N, K, w), N ** 3 + 4 * N * N * w + 8 * N * N * K + 2 * N * w * w)
        + 9 * w ** 3 + 2 * N * w * w + 6 * N * w * w)


def test_nystrom_flops_grow_linearly_in_n_and_the_agop_sample_cuts_them():
    kw = dict(width=512, solver="nystrom", centers=1000)
    f1 = est.rfm_flops(50_000, 784, 20, **kw)
    f2 = est.rfm_flops(100_000, 784, 20, **kw)
    fixed = 21 * 1000 ** 3 / 3 + 9 * 784 ** 3 + 19 * 9 * 512 ** 3  # Cholesky, M^{1/2}: not in N
    assert (f2 - fixed) / (f1 - fixed) == pytest.approx(2.0, rel=1e-12)
    sampled = est.rfm_flops(50_000, 784, 20, agop_points=5_000, **kw)
    assert sampled < 0.5 * f1
    # 1,000 centers cost less than the exact solve on the same points, by far
    assert f1 < 0.05 * est.rfm_flops(50_000, 784, 20)


def test_mlp_flops_and_the_measurement_schedule():
    epoch, measure = est.mlp_flops(1000, 784, width=512, depth=5, K=10)
    params = 784 * 512 + 4 * 512 * 512 + 512 * 10
    assert epoch == 6 * 1000 * params
    assert measure == 42 * 1000 * params + 6 * 5 * 1000 * 512 ** 2
    cal = est.Calibration("cpu", 2, {"mlp_epoch": 1e9, "mlp_measure": 2e9}, 0.0)
    s = est.estimate_seconds("mlp", {"epochs": 250, "measure_every": 10}, n=1000, d=784,
                             test_n=0, calibration=cal)
    assert len(measurement_epochs(250, 10)) == 26
    assert s == pytest.approx(250 * epoch / 1e9 + 26 * measure / 2e9)


def test_estimates_scale_inversely_with_the_calibrated_rate():
    slow = est.Calibration("cpu", 2, {"rfm_exact": 1e9, "rfm_nystrom": 1e9}, 0.0)
    fast = est.Calibration("cpu", 2, {"rfm_exact": 4e9, "rfm_nystrom": 1e9}, 0.0)
    kw = dict(n=2000, d=784, test_n=1000)
    a = est.estimate_seconds("rfm", {"depth": 20}, calibration=slow, **kw)
    b = est.estimate_seconds("rfm", {"depth": 20}, calibration=fast, **kw)
    assert a == pytest.approx(4 * b)
    assert est.estimate_seconds("rfm", {"depth": 20}, calibration=fast, solver="nystrom",
                                **kw) == est.estimate_seconds(
        "rfm", {"depth": 20}, calibration=slow, solver="nystrom", **kw)
    with pytest.raises(ValueError, match="kind must be"):
        est.estimate_seconds("svm", {}, calibration=slow, **kw)


def test_calibration_times_the_real_code(monkeypatch):
    monkeypatch.setattr(est, "CAL_EXACT", {"n": 120, "d": 20, "width": 16})
    monkeypatch.setattr(est, "CAL_NYSTROM", {"n": 200, "d": 20, "width": 16, "centers": 40})
    monkeypatch.setattr(est, "CAL_MLP", {"n": 256, "d": 20, "width": 32, "depth": 2})
    cal = est.calibrate("cpu")
    assert set(cal.rates) == {"rfm_exact", "rfm_nystrom", "mlp_epoch", "mlp_measure"}
    assert all(math.isfinite(r) and r > 0 for r in cal.rates.values())
    assert cal.seconds > 0 and cal.threads >= 1 and cal.to_dict()["device"] == "cpu"
