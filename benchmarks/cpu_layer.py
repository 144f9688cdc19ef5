"""One Deep RFM layer on CPU, side by side with xrfm, in one process.

A layer = kernel matrix, ridgeless solve, AGOP, M^{1/2}, random features, on the first N
training points (standardized, unit-normalized), Laplace kernel L = 2. The peer is xrfm
(`pip install xrfm==0.4.5`): ``RFM(kernel='laplace', bandwidth=2.0, iters=1).fit`` followed by
the same square root and features. Prints each time, the ratio, the AGOP agreement with a
float64 reference, and the achieved GFLOP/s against this machine's measured fp32 GEMM rate.

    AGOP_DATA=../shared/datasets python benchmarks/cpu_layer.py            # MNIST + CIFAR-10, N = 5000
    AGOP_DATA=../shared/datasets python benchmarks/cpu_layer.py --n 2000 --datasets mnist
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from agop import datasets
from agop.agop import agop_cost, kernel_agop, resolve_method
from agop.kernels import LaplaceKernel, class_groups
from agop.models.deep_rfm import apply_layer, fit_layer, normalize_rows, random_weights
from agop.solve import kernel_ridge, signed_one_hot


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


def prepare(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First n training points, standardized per feature, unit-normalized; ±1 one-hot targets."""
    ds = datasets.load(name, n=n)
    X = torch.from_numpy(ds.X).double()
    X = (X - X.mean(0)) / X.std(0)
    X = torch.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
    X = normalize_rows(X)
    y = torch.from_numpy(ds.y)
    Y = signed_one_hot(y, ds.num_classes, torch.float64)
    return X, y, Y


def layer_flops(N: int, D: int, K: int, width: int) -> float:
    method = resolve_method("auto", N, N, K, D, True)
    return (2 * N * N * D            # kernel matrix
            + N**3 / 3 + 2 * N * N * K  # Cholesky + solves
            + agop_cost(N, N, K, D, method)
            + 2 * N * D * D + 2 * N * D * width)  # X M^{1/2}, features


def ours(X: torch.Tensor, y: torch.Tensor, Y: torch.Tensor, W: torch.Tensor):
    fit = fit_layer(X, Y, LaplaceKernel(2.0), groups=class_groups(y))
    _, feats = apply_layer(X, fit.sqrt_agop, W)
    return fit.agop, feats


def peer(X: torch.Tensor, Y: torch.Tensor, W: torch.Tensor):
    from xrfm import RFM

    model = RFM(kernel="laplace", bandwidth=2.0, iters=1, device=X.device, verbose=False)
    model.fit((X, Y), (X, Y), reg=0.0, return_best_params=False, early_stop_rfm=False)
    sqrt_m = model.sqrtM  # xrfm's M, divided by its largest entry, and its square root
    _, feats = apply_layer(X, sqrt_m.double(), W)
    return model.M, feats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--datasets", default="mnist,cifar10")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs each; the best is kept")
    args = ap.parse_args()

    torch.manual_seed(0)
    rate = gemm_rate()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; fp32 GEMM {rate:.0f} GFLOP/s")
    header = f"{'dataset':<8} {'N':>6} {'D':>5} {'method':>6} {'agop s':>7} {'layer s':>8} " \
             f"{'xrfm s':>7} {'ratio':>6} {'GFLOP/s':>8} {'%GEMM':>6} {'agop rel err':>13} {'vs xrfm':>8}"
    print(header)
    for name in args.datasets.split(","):
        X64, y, Y64 = prepare(name, args.n)
        N, D = X64.shape
        K = Y64.shape[1]
        W = random_weights(512, D, "gaussian", torch.Generator().manual_seed(0))
        X, Y = X64.float(), Y64.float()

        # float64 reference AGOP (same algorithm, float64 throughout)
        sol = kernel_ridge(LaplaceKernel(2.0)(X64), Y64)
        M_ref = kernel_agop(LaplaceKernel(2.0), X64, sol.coef)

        t_ours, t_peer = [], []
        for _ in range(args.repeats):
            (M, _), t = _timed(lambda: ours(X, y, Y, W))
            t_ours.append(t)
            fit = fit_layer(X, Y, LaplaceKernel(2.0), groups=class_groups(y))  # per-step seconds
            (M_x, _), t = _timed(lambda: peer(X, Y, W))
            t_peer.append(t)
        best, best_peer = min(t_ours), min(t_peer)
        flops = layer_flops(N, D, K, 512)
        err = rel(M.double(), M_ref)
        err_x = rel(M_x.double() / M_x.double().max(), M_ref / M_ref.max())
        method = resolve_method("auto", N, N, K, D, True)
        print(f"{name:<8} {N:>6} {D:>5} {method:>6} "
              f"{fit.seconds['agop']:>7.2f} {best:>8.2f} {best_peer:>7.2f} {best_peer / best:>5.1f}x "
              f"{flops / best / 1e9:>8.0f} {100 * flops / best / 1e9 / rate:>5.0f}% {err:>13.1e} {err_x:>8.1e}")
        print("#   steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in fit.seconds.items()))


if __name__ == "__main__":
    main()
