"""Deep RFM on CPU as a user runs it, side by side with xrfm, in one process.

Times ``agop.DeepRFM(depth=1, device="cpu").fit(X, y)`` on the first N training points (one
AGOP layer and the final solve: two kernel solves, as ``xrfm.RFM(iters=1).fit`` also makes)
against ``xrfm.RFM(kernel="laplace", bandwidth=2.0, iters=1, solver="cholesky").fit`` given the
same standardized, unit-normalized points, ±1 one-hot targets and a validation set of one point
(the smallest it accepts; it predicts the validation set after each solve). Best of
``--repeats`` runs each, alternating, with the machine's load average printed around them (the
cores may be shared). Prints the ratio; the FLOP floor of the fit (its FLOPs at this machine's
measured fp32 GEMM rate) and the achieved rate; the seconds per step of the fit
(``fit_info_``); and the accuracy of layer 1 against a float64 reference fit (the AGOP, M^{1/2}
and the final predictions).

    AGOP_DATA=../shared/datasets python benchmarks/cpu_layer.py             # MNIST + CIFAR-10, N = 5000
    AGOP_DATA=../shared/datasets python benchmarks/cpu_layer.py --n 2000 --datasets mnist
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from agop import datasets
from agop.agop import agop_cost, resolve_method
from agop.models.deep_rfm import DeepRFM, normalize_rows
from agop.solve import signed_one_hot

WIDTH = 512


def gemm_rate(n: int = 3000, repeats: int = 3) -> float:
    """Measured fp32 GEMM rate of this machine, GFLOP/s (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _load() -> str:
    return "load {:.1f}/{:.1f}".format(*os.getloadavg()[:2])


def fit_flops(N: int, d: int, K: int, width: int = WIDTH) -> dict[str, float]:
    """FLOPs of ``DeepRFM(depth=1).fit`` by step (counted as the fit does them).

    Layer 1: distances 2N²d; Cholesky N³/3 and its solve 2N²K; the AGOP (the form
    :func:`agop.agop.resolve_method` picks; the gram form reuses the kernel's distances, so its
    2N²d for them is not counted twice); M^{1/2}: a symmetric eigendecomposition, ≈ 9d³, and
    the product (VΛ^{1/4})(VΛ^{1/4})ᵀ, d³; features 2Nd² + 2Nd·width. The final solve:
    distances 2N²·width, Cholesky and solve.
    """
    method = resolve_method("auto", N, N, K, d, True)
    agop = agop_cost(N, N, K, d, method) - (2.0 * N * N * d if method == "gram" else 0.0)
    return {
        "kernel": 2.0 * N * N * d,
        "solve": N**3 / 3 + 2.0 * N * N * K,
        "agop": agop,
        "sqrt": 10.0 * d**3,
        "features": 2.0 * N * d * d + 2.0 * N * d * width,
        "final": 2.0 * N * N * width + N**3 / 3 + 2.0 * N * N * K,
    }


def prepare(name: str, n: int):
    """Raw inputs and labels of the first n points, and the inputs DeepRFM's layer 1 sees
    (standardized per feature with the population std, a constant feature set to 0, rows
    normalized) with ±1 one-hot targets, in float32, for xrfm."""
    ds = datasets.load(name, n=n)
    X = torch.from_numpy(ds.X).double()
    X = (X - X.mean(0)) / X.std(0, correction=0)
    X = normalize_rows(torch.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0))
    Y = signed_one_hot(torch.from_numpy(ds.y), ds.num_classes, torch.float32)
    return ds.X, ds.y, X.float(), Y


def ours(X_raw: np.ndarray, y: np.ndarray) -> DeepRFM:
    return DeepRFM(depth=1, device="cpu").fit(X_raw, y)


def peer(X: torch.Tensor, Y: torch.Tensor):
    from xrfm import RFM

    model = RFM(kernel="laplace", bandwidth=2.0, iters=1, solver="cholesky", device=X.device,
                verbose=False)
    model.fit((X, Y), (X[:1], Y[:1]), reg=0.0, return_best_params=False, early_stop_rfm=False)
    return model


def accuracy(X_raw: np.ndarray, y: np.ndarray, X_test: np.ndarray) -> dict[str, float]:
    """Layer 1 of the default (float32) fit against a float64 reference fit: relative
    Frobenius differences of the AGOP and M^{1/2}, and the agreement of the predictions."""
    layer1 = {}
    models = {}
    for dtype in ("auto", "float64"):
        model = DeepRFM(depth=1, device="cpu", dtype=dtype)
        step = list(model.fit_iter(X_raw, y))[0]
        layer1[dtype] = (step.fit.agop.double(), step.fit.sqrt_agop.double(),
                         step.info.get("sqrt_precision", "float64"), step.info["agop_precision"])
        models[dtype] = model
    (M, S, sp, ap), (M64, S64, _, _) = layer1["auto"], layer1["float64"]
    pred, pred64 = models["auto"].predict(X_test), models["float64"].predict(X_test)
    return {"agop": float((M - M64).norm() / M64.norm()),
            "sqrt": float((S - S64).norm() / S64.norm()),
            "sqrt_precision": sp, "agop_precision": ap,
            "predictions_agree": float(np.mean(pred == pred64))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--datasets", default="mnist,cifar10")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs each; the best is kept")
    ap.add_argument("--test-n", type=int, default=1000, help="test points for the agreement")
    args = ap.parse_args()

    torch.manual_seed(0)
    rate = gemm_rate()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; fp32 GEMM {rate:.0f} GFLOP/s; {_load()}")
    rows = []
    for name in args.datasets.split(","):
        X_raw, y, X, Y = prepare(name, args.n)
        N, d = X.shape
        K = Y.shape[1]
        t_ours, t_peer, fits = [], [], []
        for _ in range(args.repeats):
            before = _load()
            model, t = _timed(lambda: ours(X_raw, y))
            t_ours.append(t)
            fits.append((t, model.fit_info_))
            _, t = _timed(lambda: peer(X, Y))
            t_peer.append(t)
            print(f"#   {name}: agop {t_ours[-1]:.2f} s, xrfm {t_peer[-1]:.2f} s "
                  f"({before} before, {_load()} after)", flush=True)
        best, best_peer = min(t_ours), min(t_peer)
        info = min(fits, key=lambda f: f[0])[1]
        flops = fit_flops(N, d, K)
        total = sum(flops.values())
        steps = {k: v for k, v in info[0]["seconds"].items()}
        steps["final"] = sum(info[1]["seconds"].values())
        test = datasets.load(name, split="test", n=args.test_n)
        acc = accuracy(X_raw, y, test.X)
        rows.append((name, N, d, best, best_peer, total, acc))
        print(f"#   {name} steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
              + f"; rest of fit {best - sum(steps.values()):.2f}")
        print(f"#   {name} step rates (GFLOP/s): " + ", ".join(
            f"{k} {flops[k] / v / 1e9:.0f}" for k, v in steps.items() if v > 0))
        res = [i.get("solve_residual") for i in info]
        print(f"#   {name} layer 1: AGOP form {info[0]['agop_method']} in "
              f"{acc['agop_precision']}, M^1/2 in {acc['sqrt_precision']}; solve residuals "
              f"{res}, refinements {[i.get('refinements') for i in info]}")
    print(f"{'dataset':<8} {'N':>6} {'D':>5} {'agop s':>7} {'xrfm s':>7} {'ratio':>6} "
          f"{'floor s':>7} {'GFLOP/s':>8} {'%GEMM':>6} {'AGOP err':>9} {'M^1/2 err':>9} "
          f"{'pred. agree':>11}")
    for name, N, d, best, best_peer, total, acc in rows:
        print(f"{name:<8} {N:>6} {d:>5} {best:>7.2f} {best_peer:>7.2f} {best_peer / best:>5.2f}x "
              f"{total / rate / 1e9:>7.2f} {total / best / 1e9:>8.0f} "
              f"{100 * total / best / 1e9 / rate:>5.0f}% {acc['agop']:>9.1e} {acc['sqrt']:>9.1e} "
              f"{acc['predictions_agree']:>11.3f}")


if __name__ == "__main__":
    main()
