"""Deep RFM and the MLP study at the paper's scale on one GPU, side by side with xrfm.

One prepared script for a single device call (about 4 minutes on an H200; see
benchmarks/README.md for how it is carried there). It prints, and writes to ``--out``:

1. the machine's rates: fp32 GEMM (TF32 off), TF32 GEMM, fp64 GEMM, fp32 and fp64 Cholesky;
2. ``agop rfm --dataset mnist --n 50000 --depth 20 --device cuda`` as a user runs it
   (a subprocess, so wall time includes start-up): per-layer seconds, their sum, the wall
   time, the peak memory, and the goals (≤ 30 s in the layers, ≤ 45 s wall, ≤ 25 GB);
3. xrfm 0.4.5 on the same data, one RFM iteration (solve, AGOP, solve) plus the same
   M^{1/2} and random features, and the ratio;
4. the TF32 question: one layer's AGOP with TF32 matmuls against fp32 (relative difference);
5. GPU against CPU: per-layer NC1 of Deep RFM on the first 2,000 points, same seed;
6. ``agop mlp --dataset mnist --n 50000`` for a few epochs (measurements every 10), with the
   seconds per epoch and per measurement extrapolated to the paper's 250 epochs.

    python benchmarks/gpu.py --data DIR [--out DIR] [--device cuda] [--n 50000] [--depth 20]

On a machine without a GPU, ``--device cpu --n 2000 --depth 3 --mlp-n 1000`` runs every part
at a small size (that is how it is tested before a device call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from agop import datasets
from agop.agop import kernel_agop
from agop.backend import fp32_matmul, strict_fp32, synchronize
from agop.kernels import LaplaceKernel, class_groups
from agop.models.deep_rfm import DeepRFM, apply_layer, fit_layer, normalize_rows, random_weights
from agop.experiments.records import atomic_write_json, read_csv, read_json
from agop.experiments.rfm import measure_fit
from agop.solve import signed_one_hot

RESULTS: dict = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def _best(fn, device, repeats=3):
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def rates(device: torch.device, n_gemm: int, n_chol: int) -> dict:
    """GEMM and Cholesky rates of this device (best of 3)."""
    out = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("fp64", torch.float64, False)):
        if tf32 and device.type != "cuda":
            continue
        a = torch.randn(n_gemm, n_gemm, device=device, dtype=dtype)
        b = torch.randn(n_gemm, n_gemm, device=device, dtype=dtype)
        with fp32_matmul("tf32" if tf32 else "ieee"):
            s = _best(lambda: a @ b, device)
        out[f"gemm_{name}_tflops"] = 2 * n_gemm**3 / s / 1e12
        del a, b
    for name, dtype, n in (("fp32", torch.float32, n_chol), ("fp64", torch.float64, min(n_chol, 30000))):
        x = torch.randn(n, 256, device=device, dtype=dtype)
        A = x @ x.T
        A.diagonal().add_(n)
        s = _best(lambda: torch.linalg.cholesky_ex(A), device, repeats=2)
        out[f"cholesky_{name}_n"] = n
        out[f"cholesky_{name}_seconds"] = s
        del x, A
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _agop_cli(args: list[str]) -> tuple[float, str | None]:
    """Run ``agop ARGS --no-progress`` as a user would; (wall seconds, error text or None)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "agop", *args, "--no-progress"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    log(proc.stdout[-3000:])
    if proc.returncode:
        log(proc.stderr[-3000:])
        return wall, proc.stderr[-500:]
    return wall, None


def rfm_cli(data: str, n: int, depth: int, device: str, workdir: Path) -> dict:
    """``agop rfm`` as a user runs it, in a subprocess; numbers from its run folder."""
    out = workdir / f"rfm-mnist-{n}"
    wall, error = _agop_cli(["rfm", "--dataset", "mnist", "--n", str(n), "--depth", str(depth),
                             "--device", device, "--data-dir", data, "--out", str(out)])
    if error:
        return {"error": error, "wall_seconds": wall}
    rows = read_csv(out / "metrics.csv")
    summary = read_json(out / "summary.json")
    per_layer = [r for r in rows if r["stage"] == "input"]
    steps = ("kernel", "solve", "agop", "sqrt", "features")
    return {
        "wall_seconds": wall,
        "layer_seconds": [r["seconds"] for r in per_layer],
        "sum_layer_seconds": sum(r["seconds"] for r in per_layer),
        "step_seconds": {s: sum(r[f"seconds_{s}"] or 0 for r in per_layer) for s in steps},
        "metric_seconds": summary.get("metric_seconds"),
        "peak_memory_gb": (summary.get("peak_memory_bytes") or 0) / 1e9,
        "nc1_input": [r["nc1"] for r in per_layer],
        "agop_methods": [r["agop_method"] for r in per_layer],
        "fallbacks": summary.get("fallbacks"),
        "test_acc": summary.get("final_test_acc"),
    }


def prepare(data: str, n: int, device: torch.device):
    ds = datasets.load("mnist", n=n, root=data)
    X = torch.from_numpy(ds.X).to(device)
    X = torch.nan_to_num((X - X.mean(0)) / X.std(0), nan=0.0, posinf=0.0, neginf=0.0)
    X = normalize_rows(X)
    y = torch.from_numpy(ds.y).to(device)
    Y = signed_one_hot(y, ds.num_classes)
    return X, y, Y


def one_layer(X, y, Y, W, device) -> dict:
    """This project's layer against xrfm's (one RFM iteration), same data and features."""
    out = {}
    with strict_fp32():
        t = time.perf_counter()
        fit = fit_layer(X, Y, LaplaceKernel(2.0), groups=class_groups(y))
        apply_layer(X, fit.sqrt_agop, W)
        synchronize(device)
        out["ours_seconds"] = time.perf_counter() - t
        out["ours_steps"] = fit.seconds
    try:
        from xrfm import RFM
    except ImportError:
        out["xrfm"] = "not installed"
        return out
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    model = RFM(kernel="laplace", bandwidth=2.0, iters=1, device=device, verbose=False)
    model.fit((X, Y), (X, Y), reg=0.0, return_best_params=False, early_stop_rfm=False)
    apply_layer(X, model.sqrtM.double(), W)
    synchronize(device)
    out["xrfm_seconds"] = time.perf_counter() - t
    if device.type == "cuda":
        out["xrfm_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    M = fit.agop.double()
    Mx = model.M.double()
    out["agop_rel_diff_vs_xrfm"] = float((M / M.max() - Mx / Mx.max()).norm() / (M / M.max()).norm())
    out["speedup_vs_xrfm"] = out["xrfm_seconds"] / out["ours_seconds"]
    return out


def tf32_check(X, y, Y, device) -> dict:
    """One layer's AGOP with TF32 matmuls against fp32 (the precision policy's question)."""
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    kernel = LaplaceKernel(2.0)
    groups = class_groups(y)
    with strict_fp32():
        fit = fit_layer(X, Y, kernel, groups=groups)
        ref = fit.agop.double()
    with fp32_matmul("tf32"):
        t = time.perf_counter()
        M = kernel_agop(kernel, X, fit.coef.to(X.dtype), groups=groups).double()
        synchronize(device)
        seconds = time.perf_counter() - t
    return {"agop_rel_diff": float((M - ref).norm() / ref.norm()),
            "tf32_agop_seconds": seconds, "fp32_agop_seconds": fit.seconds["agop"]}


def gpu_vs_cpu(data: str, n: int, depth: int, device: torch.device) -> dict:
    ds = datasets.load("mnist", n=n, root=data)
    out = {}
    for dev in ("cpu", str(device)):
        rows = measure_fit(DeepRFM(depth=depth, device=dev), ds.X, ds.y)
        out[dev] = [r["nc1"] for r in rows if r["stage"] == "input"]
    a, b = np.array(out["cpu"]), np.array(out[str(device)])
    out["max_rel_diff"] = float(np.max(np.abs(b / a - 1)))
    return out


def mlp_cli(data: str, n: int, epochs: int, device: str, workdir: Path) -> dict:
    out = workdir / f"mlp-mnist-{n}"
    wall, error = _agop_cli(["mlp", "--dataset", "mnist", "--n", str(n), "--epochs", str(epochs),
                             "--measure-every", "10", "--device", device, "--data-dir", data,
                             "--out", str(out)])
    if error:
        return {"error": error, "wall_seconds": wall}
    summary = read_json(out / "summary.json")
    sec = summary.get("seconds", {})
    measurements = len({r["epoch"] for r in read_csv(out / "metrics.csv")})
    res = {"wall_seconds": wall, "epochs": epochs, "train_seconds": sec.get("train"),
           "measure_seconds": sec.get("measure"), "measurements": measurements,
           "train_acc": summary.get("train_acc"), "test_acc": summary.get("test_acc")}
    if sec.get("train") is not None and epochs:
        # the paper's schedule: 250 epochs, 26 measurements (epoch 0 and every 10)
        res["extrapolated_250_epochs_seconds"] = (sec["train"] / epochs * 250
                                                  + sec["measure"] / measurements * 26)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("AGOP_DATA"), help="datasets root")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="where results.json goes")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--check-n", type=int, default=2000)
    ap.add_argument("--check-depth", type=int, default=8)
    ap.add_argument("--mlp-n", type=int, default=50000)
    ap.add_argument("--mlp-epochs", type=int, default=20)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: "
                    "rates,rfm,layer,tf32,check,mlp")
    args = ap.parse_args()
    if not args.data:
        ap.error("--data (or $AGOP_DATA) must name the datasets root")
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    RESULTS["machine"] = {"device": name, "torch": torch.__version__,
                          "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    log(f"# {name}, torch {torch.__version__}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def part(key, fn):
        if key in skip:
            return
        t = time.perf_counter()
        try:
            RESULTS[key] = fn()
        except Exception as exc:  # report and go on: one device call must return everything
            RESULTS[key] = {"error": f"{type(exc).__name__}: {exc}"}
        RESULTS[key + "_part_seconds"] = time.perf_counter() - t
        log(f"## {key} ({RESULTS[key + '_part_seconds']:.1f} s)\n{json.dumps(RESULTS[key], indent=1, default=str)}")
        atomic_write_json(out_dir / "results.json", RESULTS)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    small = device.type != "cuda"
    part("rates", lambda: rates(device, 2048 if small else 8192, 2000 if small else args.n))
    with tempfile.TemporaryDirectory() as tmp:
        part("rfm", lambda: rfm_cli(args.data, args.n, args.depth, args.device, Path(tmp)))
        if not {"layer", "tf32"} <= skip:
            X, y, Y = prepare(args.data, args.n, device)
            W = random_weights(512, X.shape[1], "gaussian", torch.Generator().manual_seed(0)).to(device)
            part("layer", lambda: one_layer(X, y, Y, W, device))
            part("tf32", lambda: tf32_check(X, y, Y, device))
            del X, y, Y, W
        part("check", lambda: gpu_vs_cpu(args.data, args.check_n, args.check_depth, device))
        part("mlp", lambda: mlp_cli(args.data, args.mlp_n, args.mlp_epochs, args.device, Path(tmp)))
    log(f"results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
