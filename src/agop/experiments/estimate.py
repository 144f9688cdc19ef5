"""How long a run will take on this machine: a short measured calibration, scaled by FLOP counts.

:func:`calibrate` times the real code (the public API, the way the runs call it) on small
synthetic problems: one exact Deep RFM layer, one Nyström Deep RFM layer, one MLP epoch and one
MLP measurement. Each gives an *effective* rate (the FLOP model's count of that small problem
divided by its measured seconds), which folds in everything the model leaves out (memory
traffic, Python, the metrics' small steps). :func:`estimate_seconds` counts the FLOPs of a full
run with the same model and divides by the rate of its kind. Small problems run at a lower
fraction of the machine's peak than large ones, so the estimates lean high; they are for
planning (``agop reproduce --dry-run``), not a benchmark.

The FLOP model, per Deep RFM layer on N points of D features (K classes, random-feature width
w, n_t test points):

- exact: kernel 2N²D, Cholesky N³/3, AGOP ``agop.agop.agop_cost`` (the cheaper of the direct and
  gram forms, as ``agop_method="auto"`` picks), M^{1/2} 9D³, features 2NDw, metrics of the three
  stages 6ND², test predictions 2·n_t·N·D;
- Nyström (M centers, the AGOP at a points): kernel 2NMD, gram NM², Cholesky M³/3, CGLS 12NMK,
  AGOP ``agop_cost(a, M, K, D, "direct")``, M^{1/2}, features, metrics as above, test 2·n_t·M·D;
- then the final solve (kernel and Cholesky, or kernel and gram).

Per MLP epoch 6·N·P (P the parameters: forward and backward), per measurement (2 + 4K)·N·P (a
forward pass, the K backward passes of each layer's AGOP) plus 6·L·N·w² for the metrics of the L
hidden layers; both on the training and the test points.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Calibration", "calibrate", "estimate_seconds", "rfm_flops", "mlp_flops"]

#: Sizes of the calibration problems (synthetic, seeded): a few seconds each on 2 CPU cores.
CAL_EXACT = {"n": 2000, "d": 400, "width": 256}
CAL_NYSTROM = {"n": 6000, "d": 400, "width": 256, "centers": 1000}
CAL_MLP = {"n": 4000, "d": 400, "width": 512, "depth": 5}
_K = 10


@dataclass
class Calibration:
    """Effective FLOP/s of each run kind on this machine, and what they were measured on."""

    device: str
    threads: int
    rates: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _exact_layer(N: int, D: int, K: int, width: int, n_test: int, final: bool = False) -> float:
    from agop.agop import agop_cost

    f = 2.0 * N * N * D + N ** 3 / 3.0 + 2.0 * n_test * N * D
    if not final:
        f += min(agop_cost(N, N, K, D, "direct"), agop_cost(N, N, K, D, "gram"))
        f += 9.0 * D ** 3 + 2.0 * N * D * width + 6.0 * N * D * D
    return f


def _nystrom_layer(N: int, D: int, K: int, width: int, n_test: int, M: int, a: int,
                   final: bool = False) -> float:
    from agop.agop import agop_cost

    f = 2.0 * N * M * D + float(N) * M * M + M ** 3 / 3.0 + 12.0 * N * M * K
    f += 2.0 * n_test * M * D
    if not final:
        f += agop_cost(a, M, K, D, "direct") + 9.0 * D ** 3 + 2.0 * N * D * width
        f += 6.0 * N * D * D
    return f


def rfm_flops(n: int, d: int, depth: int, *, width: int = 512, solver: str = "exact",
              centers: int | None = None, agop_points: int | None = None, test_n: int = 0,
              K: int = _K) -> float:
    """FLOPs of a Deep RFM run: ``depth`` layers (the first on d features, the rest on
    ``width``) and the final solve (module docstring)."""
    if solver == "exact":
        layer = lambda D, final=False: _exact_layer(n, D, K, width, test_n, final)  # noqa: E731
    else:
        M = min(n, 4000 if centers is None else int(centers))
        a = n if agop_points is None else min(n, int(agop_points))
        layer = lambda D, final=False: _nystrom_layer(n, D, K, width, test_n, M, a,  # noqa: E731
                                                      final)
    total = layer(d) + max(depth - 1, 0) * layer(width)
    return total + layer(width if depth else d, final=True)


def mlp_flops(n: int, d: int, *, width: int = 512, depth: int = 5, K: int = _K,
              test_n: int = 0) -> tuple[float, float]:
    """(FLOPs of one training epoch, FLOPs of one measurement) of the paper's MLP."""
    params = d * width + (depth - 1) * width * width + width * K
    epoch = 6.0 * n * params
    measure = (2.0 + 4.0 * K) * (n + test_n) * params + 6.0 * depth * (n + test_n) * width ** 2
    return epoch, measure


def _data(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % _K
    centers = rng.standard_normal((_K, d))
    X = centers[y] + 0.5 * rng.standard_normal((n, d))
    return X.astype(np.float32), y


def calibrate(device: str = "cpu") -> Calibration:
    """Time one small run of each kind (exact and Nyström Deep RFM layers, an MLP epoch and a
    measurement) and return their effective rates (module docstring). About 10–20 s on 2 CPU
    cores."""
    import torch

    from agop.models.deep_rfm import DeepRFM
    from agop.models.mlp import MLP, Trainer, probe

    started = time.perf_counter()
    rates: dict[str, float] = {}

    c = CAL_EXACT
    X, y = _data(c["n"], c["d"])
    t = time.perf_counter()
    DeepRFM(depth=1, width=c["width"], solver="exact", device=device).fit(X, y)
    rates["rfm_exact"] = rfm_flops(c["n"], c["d"], 1, width=c["width"]) / (
        time.perf_counter() - t)

    c = CAL_NYSTROM
    X, y = _data(c["n"], c["d"], seed=1)
    t = time.perf_counter()
    DeepRFM(depth=1, width=c["width"], solver="nystrom", centers=c["centers"],
            device=device).fit(X, y)
    rates["rfm_nystrom"] = rfm_flops(c["n"], c["d"], 1, width=c["width"], solver="nystrom",
                                     centers=c["centers"]) / (time.perf_counter() - t)

    c = CAL_MLP
    X, y = _data(c["n"], c["d"], seed=2)
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    model = MLP(c["d"], _K, width=c["width"], depth=c["depth"]).to(dev)
    Xt, yt = torch.as_tensor(X, device=dev), torch.as_tensor(y, device=dev)
    trainer = Trainer(model, Xt, yt, num_classes=_K, lr=2e-5, batch_size=128)
    epoch, measure = mlp_flops(c["n"], c["d"], width=c["width"], depth=c["depth"])
    t = time.perf_counter()
    trainer.train_epoch()
    rates["mlp_epoch"] = epoch / (time.perf_counter() - t)
    t = time.perf_counter()
    probe(model, Xt, yt, num_classes=_K)
    rates["mlp_measure"] = measure / (time.perf_counter() - t)
    return Calibration(device=str(device), threads=torch.get_num_threads(), rates=rates,
                       seconds=time.perf_counter() - started)


def estimate_seconds(kind: str, settings: dict[str, Any], *, n: int, d: int, test_n: int,
                     calibration: Calibration, solver: str = "exact", K: int = _K) -> float:
    """Estimated wall seconds of one run (``kind`` "rfm" or "mlp") with its ``settings`` on
    ``n`` training and ``test_n`` test points of dimension ``d``; ``solver`` the Deep RFM solver
    that will run ("exact" or "nystrom")."""
    rates = calibration.rates
    if kind == "rfm":
        flops = rfm_flops(n, d, int(settings.get("depth", 10)),
                          width=int(settings.get("width", 512)), solver=solver,
                          centers=settings.get("centers"),
                          agop_points=settings.get("agop_points"), test_n=test_n, K=K)
        return flops / rates["rfm_exact" if solver == "exact" else "rfm_nystrom"]
    if kind == "mlp":
        from agop.models.mlp import measurement_epochs

        epochs = int(settings.get("epochs", 250))
        every = int(settings.get("measure_every", 10))
        epoch, measure = mlp_flops(n, d, width=int(settings.get("width", 512)),
                                   depth=int(settings.get("depth", 5)), K=K, test_n=test_n)
        return (epochs * epoch / rates["mlp_epoch"]
                + len(measurement_epochs(epochs, every)) * measure / rates["mlp_measure"])
    if kind == "theory":
        return 30.0  # a few small eigenproblems and a short digits run (docs/theory.md)
    raise ValueError(f"kind must be 'rfm', 'mlp' or 'theory'; got {kind!r}")
